"""HF config -> Megatron-Core GPT model (TransformerConfig, layer spec, GPTModel chunks).

Names are imported on first use, so torch-free parts (``families``, ``shapes``, ``hf_fields``) can
be used by the argument validator without importing torch or megatron.
"""

import importlib

_EXPORTS = {
    "build_model": "builder", "decoder_block_spec": "builder", "unwrap": "builder",
    "GPTSettings": "config", "load_hf_config": "config", "padded_vocab_size": "config",
    "transformer_config_from_hf": "config",
    "FAMILIES": "families", "ModelFamily": "families", "UnsupportedModelError": "families",
    "family_for": "families", "register_family": "families", "supported_model_types": "families",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
