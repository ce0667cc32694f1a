"""Mixtral: experts under ``block_sparse_moe`` with w1 (gate), w3 (up), w2 (down); the router is
``block_sparse_moe.gate`` (transformers 5 names it ``mlp.gate`` in memory: read as well)."""

from ..mapping import HF_LAYER, FamilyMapping, attention, embeddings, pre_mlp_norm, routed_experts

MAPPING = FamilyMapping(
    "mixtral",
    embeddings() + attention() + pre_mlp_norm()
    + routed_experts(hf_moe="block_sparse_moe", gate="w1", up="w3", down="w2",
                     router_alternatives=(HF_LAYER + "mlp.gate.weight",)),
)
