"""Qwen2-MoE: routed experts (router ``mlp.gate``), a shared expert with a sigmoid gate
(``shared_expert`` / ``shared_expert_gate`` -> ``mlp.shared_experts.*``), dense MLPs on the
``mlp_only_layers``."""

from megatron_swift.model.families import ModelFamily
from megatron_swift.model.hf_fields import softmax_moe_fields

from ..mapping import attention, dense_mlp, embeddings, routed_experts, shared_expert


def config_fields(hf):
    return dict(softmax_moe_fields(hf, hf.num_experts, hf.moe_intermediate_size, bool(hf.norm_topk_prob)),
                moe_shared_expert_intermediate_size=hf.shared_expert_intermediate_size,
                moe_shared_expert_gate=True)


FAMILY = ModelFamily(
    "qwen2_moe", ("qwen2_moe",), architectures=("Qwen2MoeForCausalLM",), qkv_bias=True,
    config_fields=config_fields,
    rules=embeddings() + attention(qkv_bias=True) + dense_mlp() + routed_experts() + shared_expert(),
    tiny=dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64,
              norm_topk_prob=False, router_aux_loss_coef=0.001),
    template="qwen", hf_ids="Qwen/Qwen1.5-MoE-A2.7B, Qwen/Qwen2-57B-A14B",
)
