"""GLM-4.5 / 4.6 / 4.5-Air (``model_type`` glm4_moe): GQA attention with q/k/v bias
(``attention_bias``) and optional per-head q/k RMSNorm (``use_qk_norm``), partial rotary
(``partial_rotary_factor``, megatron's ``rotary_percent``), the first ``first_k_dense_replace``
layers dense, then DeepSeek-V3's MoE: sigmoid router with ``e_score_correction_bias`` as megatron's
expert bias, group-limited top-k, ``routed_scaling_factor``, shared experts. MTP layers
(``num_nextn_predict_layers``) are skipped with a logged note, as for DeepSeek-V3."""

from megatron_swift.model.families import ModelFamily
from megatron_swift.model.hf_fields import sigmoid_group_moe_fields

from ..mapping import attention, dense_mlp, embeddings
from .deepseek_v3 import SIGMOID_MOE_RULES, mtp_layer


def config_fields(hf):
    return dict(sigmoid_group_moe_fields(hf), qk_layernorm=bool(getattr(hf, "use_qk_norm", False)))


def tp_split(cfg: dict) -> dict:
    out = {"num_attention_heads": cfg["num_attention_heads"],
           "num_key_value_heads": cfg.get("num_key_value_heads") or cfg["num_attention_heads"]}
    if cfg.get("first_k_dense_replace"):
        out["intermediate_size"] = cfg["intermediate_size"]
    return out


FAMILY = ModelFamily(
    "glm4_moe", ("glm4_moe",), architectures=("Glm4MoeForCausalLM",), qkv_bias="attention_bias",
    config_fields=config_fields,
    rules=embeddings() + attention(qkv_bias=True, qk_norm=True) + dense_mlp() + SIGMOID_MOE_RULES,
    tiny=dict(num_hidden_layers=3, head_dim=16, attention_bias=True, use_qk_norm=True,
              rope_parameters=dict(rope_theta=10000.0, partial_rotary_factor=0.5, rope_type="default"),
              n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
              moe_intermediate_size=32, first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
              num_nextn_predict_layers=0),
    template=None,
    layouts=frozenset({"tp", "sp", "pp", "vpp", "ep", "etp"}),
    tp_split=tp_split,
    ignore_hf=mtp_layer,
    ignore_reason="multi-token-prediction (MTP) layers are not converted",
    hf_ids="zai-org/GLM-4.5, GLM-4.5-Air, GLM-4.6 (and -Base/-FP8 layouts in bf16)",
    notes="no built-in chat template (pass --template or use the tokenizer's); MTP dropped; no context parallel",
)
