"""Qwen3-MoE: Qwen3 attention (q/k norm), routed experts without a shared expert."""

from ..mapping import FamilyMapping, attention, dense_mlp, embeddings, routed_experts

MAPPING = FamilyMapping(
    "qwen3_moe", embeddings() + attention(qkv_bias=True, qk_norm=True) + dense_mlp() + routed_experts())
