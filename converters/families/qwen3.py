"""Qwen3: per-head RMSNorm on q and k (``q_norm``/``k_norm`` -> ``q_layernorm``/``k_layernorm``)."""

from ..mapping import FamilyMapping, attention, dense_mlp, embeddings

MAPPING = FamilyMapping("qwen3", embeddings() + attention(qkv_bias=True, qk_norm=True) + dense_mlp())
