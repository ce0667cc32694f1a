"""DeepSeek-V3 / V3.1 / R1, Kimi-K2, Moonlight (``model_type`` deepseek_v3).

* Multi-head latent attention on megatron-core's own ``MLASelfAttention`` (``MLATransformerConfig``):
  ``q_a_proj`` / ``q_a_layernorm`` / ``q_b_proj`` (or ``q_proj`` when ``q_lora_rank`` is None),
  ``kv_a_proj_with_mqa`` / ``kv_a_layernorm`` / ``kv_b_proj``, ``o_proj``; rope or YaRN (mscale).
  Under TP the up projections split by heads; the down projections are replicated (Transformer
  Engine's spec, and the local spec as the builder sets it up); their rules follow the parameter's
  own partition (``tp_follows_model``). Training at TP > 1 needs sequence parallelism.
* MoE from layer ``first_k_dense_replace`` on: sigmoid router, ``e_score_correction_bias`` ->
  ``mlp.router.expert_bias`` (megatron's aux-loss-free balancing), group-limited top-k,
  ``routed_scaling_factor``; ``n_shared_experts`` shared experts (no gate).
* MTP layers (``num_nextn_predict_layers``; HF layers numbered from ``num_hidden_layers`` on) are
  not built: their tensors are skipped with a logged note and not written back.
"""

from megatron_swift.model.families import ModelFamily
from megatron_swift.model.hf_fields import mla_fields, sigmoid_group_moe_fields

from ..mapping import (HF_LAYER, L, Rule, attention_norm, dense_mlp, embeddings, routed_experts, src,
                       swiglu)

A = HF_LAYER + "self_attn."
S = L + "self_attention."

MLA_RULES = attention_norm() + (
    Rule(S + "linear_q_proj.weight", (src(A + "q_proj.weight"),), tp_dim=0),
    Rule(S + "linear_q_down_proj.weight", (src(A + "q_a_proj.weight"),), tp_follows_model=True),
    Rule(S + "q_layernorm.weight", (src(A + "q_a_layernorm.weight"),)),
    Rule(S + "linear_q_up_proj.weight", (src(A + "q_b_proj.weight"),), tp_dim=0),
    Rule(S + "linear_kv_down_proj.weight", (src(A + "kv_a_proj_with_mqa.weight"),), tp_follows_model=True),
    Rule(S + "kv_layernorm.weight", (src(A + "kv_a_layernorm.weight"),)),
    Rule(S + "linear_kv_up_proj.weight", (src(A + "kv_b_proj.weight"),), tp_dim=0),
    Rule(S + "linear_proj.weight", (src(A + "o_proj.weight"),), tp_dim=1),
)

SIGMOID_MOE_RULES = routed_experts() + (
    Rule(L + "mlp.router.expert_bias", (src(HF_LAYER + "mlp.gate.e_score_correction_bias"),)),
    *swiglu(L + "mlp.shared_experts.", HF_LAYER + "mlp.shared_experts."),
)


def mla_tp_split(cfg: dict) -> dict:
    """What TP splits in an MLA model: the heads (up projections, o_proj) and a dense first layer's
    FFN (the down projections are replicated)."""
    out = {"num_attention_heads": cfg["num_attention_heads"]}
    if cfg.get("first_k_dense_replace"):
        out["intermediate_size"] = cfg["intermediate_size"]
    return out


def mtp_layer(config, key: str) -> bool:
    """HF tensors of the MTP layers (layer index >= num_layers)."""
    if not key.startswith("model.layers."):
        return False
    return int(key.split(".")[2]) >= config.num_layers


def _check(hf):
    heads, kv = hf.num_attention_heads, getattr(hf, "num_key_value_heads", None)
    if kv not in (None, heads):
        raise ValueError(f"config.json: num_key_value_heads={kv} != num_attention_heads={heads} is not supported "
                         f"with multi-latent attention")


FAMILY = ModelFamily(
    "deepseek_v3", ("deepseek_v3", "kimi_k2"), architectures=("DeepseekV3ForCausalLM",),
    config_class="mla", qkv_bias=False, check_config=_check,
    config_fields=lambda hf: dict(mla_fields(hf), **sigmoid_group_moe_fields(hf)),
    rules=embeddings() + MLA_RULES + dense_mlp() + SIGMOID_MOE_RULES,
    tiny=dict(num_hidden_layers=3, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
              qk_rope_head_dim=8, head_dim=8, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2,
              n_group=2, topk_group=1, n_shared_experts=1, moe_intermediate_size=32, first_k_dense_replace=1,
              routed_scaling_factor=2.5, norm_topk_prob=True, num_nextn_predict_layers=0,
              rope_theta=10000.0),
    template="deepseek_r1",
    layouts=frozenset({"tp", "sp", "pp", "vpp", "ep", "etp"}),
    tp_split=mla_tp_split, tp_needs_sp=True,
    ignore_hf=mtp_layer,
    ignore_reason="multi-token-prediction (MTP) layers are not converted",
    hf_ids="deepseek-ai/DeepSeek-V3, V3-0324, V3.1, R1, R1-0528; moonshotai/Kimi-K2-*, Moonlight-16B-A3B",
    notes="MTP layers dropped (logged); no context parallel; n_group>1 needs num_experts_per_tok/topk_group == 2",
)
