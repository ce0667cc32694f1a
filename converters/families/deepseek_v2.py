"""DeepSeek-V2 / V2-Lite / V2.5 (``model_type`` deepseek_v2): DeepSeek-V3's multi-latent attention
and layer layout (dense first ``first_k_dense_replace`` layers, shared experts), with a softmax
router: scores over all experts, top-k (``greedy``) or group-limited (``group_limited_greedy``:
a group scores its best expert), weights NOT renormalised unless ``norm_topk_prob``, times
``routed_scaling_factor``; no expert bias."""

from megatron_swift.model.families import ModelFamily
from megatron_swift.model.hf_fields import mla_fields, moe_layer_pattern, softmax_moe_fields

from ..mapping import HF_LAYER, L, dense_mlp, embeddings, routed_experts, swiglu
from .deepseek_v3 import MLA_RULES, _check as _check_mla, mla_tp_split


def _router_fields(hf, where: str = "config.json") -> dict:
    experts = hf.n_routed_experts
    fields = softmax_moe_fields(hf, experts, hf.moe_intermediate_size, bool(getattr(hf, "norm_topk_prob", False)))
    fields.update(
        moe_layer_freq=moe_layer_pattern(hf, getattr(hf, "first_k_dense_replace", 0) or 0),
        moe_router_topk_scaling_factor=float(getattr(hf, "routed_scaling_factor", 1.0) or 1.0),
        moe_aux_loss_coeff=float(getattr(hf, "aux_loss_alpha", None) or getattr(hf, "router_aux_loss_coef", 0.0)
                                 or 0.0),
    )
    method = getattr(hf, "topk_method", "greedy")
    if method == "group_limited_greedy":
        topk, groups, topk_group = hf.num_experts_per_tok, hf.n_group, hf.topk_group
        # megatron-core scores a group by the sum of its top (topk // group_topk) experts, HF by its best one
        if topk % topk_group or topk // topk_group != 1:
            raise ValueError(f"{where}: topk_method group_limited_greedy with num_experts_per_tok={topk} and "
                             f"topk_group={topk_group} is not supported: megatron-core scores a group by its top "
                             f"num_experts_per_tok/topk_group experts, DeepSeek-V2 by its best one "
                             f"(DeepSeek-V2-Lite's greedy routing is supported)")
        fields.update(moe_router_num_groups=groups, moe_router_group_topk=topk_group)
    elif method != "greedy":
        raise ValueError(f"{where}: topk_method {method!r} is not supported (greedy, group_limited_greedy)")
    shared = (getattr(hf, "n_shared_experts", 0) or 0) * hf.moe_intermediate_size
    if shared:
        fields["moe_shared_expert_intermediate_size"] = shared
    return fields


def _check(hf):
    _check_mla(hf)
    if getattr(hf, "mlp_bias", False):
        raise ValueError("config.json: mlp_bias=true is not supported for deepseek_v2")


FAMILY = ModelFamily(
    "deepseek_v2", ("deepseek_v2",), architectures=("DeepseekV2ForCausalLM",),
    config_class="mla", qkv_bias=False, check_config=_check,
    config_fields=lambda hf: dict(mla_fields(hf), **_router_fields(hf)),
    rules=embeddings() + MLA_RULES + dense_mlp() + routed_experts()
    + swiglu(L + "mlp.shared_experts.", HF_LAYER + "mlp.shared_experts."),
    tiny=dict(num_hidden_layers=3, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=16,
              qk_rope_head_dim=8, head_dim=8, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2,
              topk_method="greedy", n_shared_experts=1, moe_intermediate_size=32, first_k_dense_replace=1,
              routed_scaling_factor=1.0, norm_topk_prob=False, rope_theta=10000.0),
    template="deepseek",
    layouts=frozenset({"tp", "sp", "pp", "vpp", "ep", "etp"}),
    tp_split=mla_tp_split, tp_needs_sp=True,
    hf_ids="deepseek-ai/DeepSeek-V2-Lite(-Chat), DeepSeek-Coder-V2-Lite (greedy routing)",
    notes="group_limited_greedy only with num_experts_per_tok == topk_group (so not V2/V2.5 236B); no CP",
)
