"""Supported Hugging Face model families and what distinguishes them on Megatron-Core.

A family is data, not code: which HF ``model_type`` strings it covers and the few switches that
differ between them. ``config.py`` turns an HF config plus its family into a TransformerConfig.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class ModelFamily:
    name: str
    model_types: tuple[str, ...]
    # qkv bias: True/False, or the HF config key that says ("attention_bias").
    qkv_bias: bool | str = "attention_bias"
    qk_layernorm: bool = False
    # MoE flavour: None (dense), "qwen2_moe" (shared expert + sigmoid gate), "qwen3_moe", "mixtral".
    moe: Optional[str] = None


FAMILIES: tuple[ModelFamily, ...] = (
    ModelFamily("llama", ("llama",)),
    ModelFamily("qwen2", ("qwen2",), qkv_bias=True),
    ModelFamily("qwen3", ("qwen3",), qk_layernorm=True),
    ModelFamily("qwen2_moe", ("qwen2_moe",), qkv_bias=True, moe="qwen2_moe"),
    ModelFamily("qwen3_moe", ("qwen3_moe",), qk_layernorm=True, moe="qwen3_moe"),
    ModelFamily("mixtral", ("mixtral",), qkv_bias=False, moe="mixtral"),
)

_BY_MODEL_TYPE = {model_type: family for family in FAMILIES for model_type in family.model_types}


def supported_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


class UnsupportedModelError(ValueError):
    pass


def family_for(model_type: str, where: str = "config.json") -> ModelFamily:
    try:
        return _BY_MODEL_TYPE[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"{where}: model_type {model_type!r} is not supported; supported model types: "
            f"{', '.join(supported_model_types())}"
        ) from None
