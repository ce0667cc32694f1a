"""Qwen2: Llama with a bias on q/k/v."""

from ..mapping import FamilyMapping, attention, dense_mlp, embeddings

MAPPING = FamilyMapping("qwen2", embeddings() + attention(qkv_bias=True) + dense_mlp())
