"""Qwen2: Llama with a bias on q/k/v."""

from megatron_swift.model.families import ModelFamily

from ..mapping import attention, dense_mlp, embeddings

FAMILY = ModelFamily(
    "qwen2", ("qwen2",), architectures=("Qwen2ForCausalLM",), qkv_bias=True,
    rules=embeddings() + attention(qkv_bias=True) + dense_mlp(),
    tiny=dict(rope_theta=1000000.0), template="qwen2_5", hf_ids="Qwen/Qwen2-*, Qwen/Qwen2.5-*",
)
