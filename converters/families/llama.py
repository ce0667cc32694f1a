"""Llama: RMSNorm, GQA attention (optional qkv bias: ``attention_bias``), SwiGLU MLP."""

from ..mapping import FamilyMapping, attention, dense_mlp, embeddings

MAPPING = FamilyMapping("llama", embeddings() + attention(qkv_bias=True) + dense_mlp())
