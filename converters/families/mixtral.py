"""Mixtral: experts under ``block_sparse_moe`` with w1 (gate), w3 (up), w2 (down); the router is
``block_sparse_moe.gate`` (transformers 5 names it ``mlp.gate`` in memory: read as well)."""

from megatron_swift.model.families import ModelFamily
from megatron_swift.model.hf_fields import softmax_moe_fields

from ..mapping import HF_LAYER, attention, embeddings, pre_mlp_norm, routed_experts

FAMILY = ModelFamily(
    "mixtral", ("mixtral",), architectures=("MixtralForCausalLM",), qkv_bias=False,
    # softmax over the top-k logits (renormalised)
    config_fields=lambda hf: softmax_moe_fields(hf, hf.num_local_experts, hf.intermediate_size, True),
    rules=embeddings() + attention() + pre_mlp_norm()
    + routed_experts(hf_moe="block_sparse_moe", gate="w1", up="w3", down="w2",
                     router_alternatives=(HF_LAYER + "mlp.gate.weight",)),
    tiny=dict(num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.001),
    template="mistral", hf_ids="mistralai/Mixtral-8x7B-*, Mixtral-8x22B-*",
)
