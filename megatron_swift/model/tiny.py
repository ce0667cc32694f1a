"""Tiny random-init Hugging Face configs, one per supported family, for demos and tests.

They are real transformers configs (built by transformers' own config classes), just small:
2-4 layers, hidden 64, GQA with 2 KV heads, a vocab that is not a multiple of 128 so vocab
padding is exercised.
"""

from __future__ import annotations

TINY_VOCAB = 1000

_COMMON = dict(
    vocab_size=TINY_VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    initializer_range=0.02,
    tie_word_embeddings=False,
)

TINY_OVERRIDES: dict[str, dict] = {
    "llama": dict(rope_theta=10000.0),
    "qwen2": dict(rope_theta=1000000.0),
    "qwen3": dict(head_dim=32, rope_theta=1000000.0),
    "qwen2_moe": dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=64, norm_topk_prob=False, router_aux_loss_coef=0.001,
    ),
    "qwen3_moe": dict(
        head_dim=32, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        norm_topk_prob=True, router_aux_loss_coef=0.001,
    ),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.001),
}


def tiny_hf_config(model_type: str, **overrides):
    """A transformers config object for ``model_type`` ("llama", "qwen2", "qwen3", ...)."""
    from transformers import AutoConfig

    if model_type not in TINY_OVERRIDES:
        raise ValueError(f"no tiny config for {model_type!r}; have {sorted(TINY_OVERRIDES)}")
    kwargs = dict(_COMMON, **TINY_OVERRIDES[model_type])
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)
