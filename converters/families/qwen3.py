"""Qwen3: per-head RMSNorm on q and k (``q_norm``/``k_norm`` -> ``q_layernorm``/``k_layernorm``)."""

from megatron_swift.model.families import ModelFamily

from ..mapping import attention, dense_mlp, embeddings

FAMILY = ModelFamily(
    "qwen3", ("qwen3",), architectures=("Qwen3ForCausalLM",), qk_layernorm=True,
    rules=embeddings() + attention(qkv_bias=True, qk_norm=True) + dense_mlp(),
    tiny=dict(head_dim=32, rope_theta=1000000.0), template="qwen3", hf_ids="Qwen/Qwen3-* (dense)",
)
