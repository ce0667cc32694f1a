"""Qwen2-MoE: routed experts (router ``mlp.gate``), a shared expert with a sigmoid gate
(``shared_expert`` / ``shared_expert_gate`` -> ``mlp.shared_experts.*``), dense MLPs on the
``mlp_only_layers``."""

from ..mapping import FamilyMapping, attention, dense_mlp, embeddings, routed_experts, shared_expert

MAPPING = FamilyMapping(
    "qwen2_moe", embeddings() + attention(qkv_bias=True) + dense_mlp() + routed_experts() + shared_expert())
