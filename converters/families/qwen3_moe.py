"""Qwen3-MoE: Qwen3 attention (q/k norm), routed experts without a shared expert."""

from megatron_swift.model.families import ModelFamily
from megatron_swift.model.hf_fields import softmax_moe_fields

from ..mapping import attention, dense_mlp, embeddings, routed_experts

FAMILY = ModelFamily(
    "qwen3_moe", ("qwen3_moe",), architectures=("Qwen3MoeForCausalLM",), qk_layernorm=True,
    config_fields=lambda hf: softmax_moe_fields(hf, hf.num_experts, hf.moe_intermediate_size,
                                                bool(hf.norm_topk_prob)),
    rules=embeddings() + attention(qkv_bias=True, qk_norm=True) + dense_mlp() + routed_experts(),
    tiny=dict(head_dim=32, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
              router_aux_loss_coef=0.001),
    template="qwen3", hf_ids="Qwen/Qwen3-30B-A3B, Qwen/Qwen3-235B-A22B",
)
