"""Llama: RMSNorm, GQA attention (optional qkv bias: ``attention_bias``), SwiGLU MLP."""

from megatron_swift.model.families import ModelFamily

from ..mapping import attention, dense_mlp, embeddings

FAMILY = ModelFamily(
    "llama", ("llama",), architectures=("LlamaForCausalLM",),
    rules=embeddings() + attention(qkv_bias=True) + dense_mlp(),
    tiny=dict(rope_theta=10000.0), template="llama3",
    hf_ids="meta-llama/Llama-2-*, Llama-3/3.1/3.2/3.3-*",
)
