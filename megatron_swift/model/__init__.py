"""HF config -> Megatron-Core GPT model (TransformerConfig, layer spec, GPTModel chunks)."""

from .builder import build_model, decoder_block_spec, unwrap
from .config import GPTSettings, load_hf_config, padded_vocab_size, transformer_config_from_hf
from .families import FAMILIES, UnsupportedModelError, family_for, supported_model_types

__all__ = [
    "FAMILIES", "GPTSettings", "UnsupportedModelError", "build_model", "decoder_block_spec",
    "family_for", "load_hf_config", "padded_vocab_size", "supported_model_types",
    "transformer_config_from_hf", "unwrap",
]
