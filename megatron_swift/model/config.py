"""Hugging Face ``config.json`` -> Megatron-Core ``TransformerConfig`` (+ GPTModel settings).

Everything shape-related is derived from the HF config; the caller passes the run's Megatron
settings (parallel sizes, dtype, recompute, MoE dispatcher...) as ``overrides`` named like
TransformerConfig fields. Unknown override names are an error, not silently dropped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_swift.platform import get_platform

from .families import COMMON_CONFIG_MAP, ModelFamily, family_for
from .hf_fields import rope_parameters as rope_parameters_of
from .shapes import check_layout, layout_of

logger = logging.getLogger(__name__)

MAKE_VOCAB_SIZE_DIVISIBLE_BY = 128


@dataclass
class GPTSettings:
    """GPTModel constructor arguments that are not TransformerConfig fields."""

    vocab_size: int  # the HF vocab size
    padded_vocab_size: int  # divisible by 128 x TP (Megatron convention)
    max_sequence_length: int
    share_embeddings_and_output_weights: bool
    rotary_base: float
    # The HF rope parameters when they are not the plain "default" rope (e.g. llama3 scaling);
    # the builder then takes inv_freq from transformers' own rope init for exactly these.
    rope_parameters: Optional[dict]
    family: ModelFamily
    # the share of each head's dims that gets rope (HF partial_rotary_factor; GLM-4.5: 0.5)
    rotary_percent: float = 1.0
    # a ``*ForSequenceClassification`` model (reward model): the output layer is a value head with
    # this many outputs (megatron_swift/rlhf/reward.py), not the LM head
    num_labels: Optional[int] = None


def load_hf_config(model_dir: str, trust_remote_code: bool = False):
    """Reads ``config.json`` through transformers (remote code only when asked)."""
    from transformers import AutoConfig

    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--model {model_dir!r}: no config.json in that directory")
    with open(path) as f:
        try:
            json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    return AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)


def _rope(hf_config) -> tuple[float, Optional[dict]]:
    """(rope_theta, non-default rope parameters) across transformers 4 and 5 config layouts."""
    params = getattr(hf_config, "rope_parameters", None)
    if params is None:  # transformers 4: rope_theta + rope_scaling
        params = dict(getattr(hf_config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    theta = float(params.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type not in ("llama3", "linear"):
        raise ValueError(
            f"config.json: rope type {rope_type!r} is not supported yet (supported: default, llama3, linear)"
        )
    return theta, dict(params)


def apply_rope_scaling(hf_config, rope_scaling: dict) -> None:
    """``--rope_scaling``: replaces the config's rope scaling (transformers 5 ``rope_parameters``,
    transformers 4 ``rope_scaling``), keeping its rope_theta; unsupported types are refused."""
    scaling = dict(rope_scaling)
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    if hasattr(hf_config, "rope_parameters") and getattr(hf_config, "rope_parameters", None) is not None:
        params = dict(hf_config.rope_parameters)
        if scaling.get("rope_type") != params.get("rope_type"):  # another type: drop the old type's fields
            params = {"rope_theta": params.get("rope_theta", 10000.0)}
        params.update(scaling)
        hf_config.rope_parameters = params
    else:
        hf_config.rope_scaling = scaling
    try:
        _rope(hf_config)
    except ValueError as exc:
        raise ValueError(f"--rope_scaling {rope_scaling}: {exc}") from None


def padded_vocab_size(vocab_size: int, tensor_model_parallel_size: int) -> int:
    multiple = MAKE_VOCAB_SIZE_DIVISIBLE_BY * tensor_model_parallel_size
    return int(math.ceil(vocab_size / multiple) * multiple)


def _check_supported(hf_config, where: str) -> None:
    act = getattr(hf_config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{where}: hidden_act {act!r} is not supported (only silu/SwiGLU)")
    if getattr(hf_config, "use_sliding_window", False):
        raise ValueError(f"{where}: use_sliding_window=true is not supported")


def transformer_config_from_hf(hf_config, overrides: Optional[dict] = None, where: str = "config.json"):
    """Returns ``(TransformerConfig, GPTSettings)`` for an HF config and run overrides.

    ``overrides`` keys are TransformerConfig field names (``tensor_model_parallel_size``,
    ``sequence_parallel``, ``params_dtype``, ``moe_token_dispatcher_type``, ...); an unknown key
    raises ``ValueError`` naming it.
    """
    from megatron.core.transformer import TransformerConfig

    family = family_for(hf_config.model_type, where)
    _check_supported(hf_config, where)
    if family.check_config is not None:
        family.check_config(hf_config)
    overrides = dict(overrides or {})
    num_heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
    qkv_bias = family.qkv_bias
    if isinstance(qkv_bias, str):
        qkv_bias = bool(getattr(hf_config, qkv_bias, False))
    mla = family.config_class == "mla"
    if mla:  # MLA's rope (default or YaRN) is part of its own config fields
        theta, rope_parameters = float(rope_parameters_of(hf_config).get("rope_theta", 10000.0)), None
    else:
        theta, rope_parameters = _rope(hf_config)

    fields = dict(
        num_query_groups=getattr(hf_config, "num_key_value_heads", None) or num_heads,
        kv_channels=head_dim,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=qkv_bias,
        qk_layernorm=family.qk_layernorm,
        hidden_dropout=0.0,
        attention_softmax_in_fp32=True,
        apply_query_key_layer_scaling=False,
        # fusions the caller leaves out are filled in by the platform from what this machine has
        transformer_impl="transformer_engine" if get_platform().has_transformer_engine else "local",
    )
    # the declarative part: HF config key -> TransformerConfig field
    for hf_key, name in COMMON_CONFIG_MAP + tuple(family.config_map):
        value = getattr(hf_config, hf_key, None)
        if value is not None:
            fields[name] = value
    fields["attention_dropout"] = float(fields.get("attention_dropout") or 0.0)
    if family.config_fields is not None:
        fields.update(family.config_fields(hf_config))

    settings_keys = {"padded_vocab_size", "max_sequence_length", "rotary_base",
                     "share_embeddings_and_output_weights"}
    settings_overrides = {k: overrides.pop(k) for k in list(overrides) if k in settings_keys}
    config_class = TransformerConfig
    if mla:
        from megatron.core.transformer.transformer_config import MLATransformerConfig as config_class
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown Megatron model setting(s): {', '.join(unknown)}")
    fields.update(overrides)
    if isinstance(fields.get("attention_backend"), str):
        from megatron.core.transformer.enums import AttnBackend

        fields["attention_backend"] = AttnBackend[fields["attention_backend"]]
    dtype = fields.get("params_dtype", torch.float32)
    fields.setdefault("bf16", dtype == torch.bfloat16)
    fields.setdefault("fp16", dtype == torch.float16)
    fields.setdefault("pipeline_dtype", dtype)

    tp = fields.get("tensor_model_parallel_size", 1)
    shape = dict(hf_config.to_dict(), num_attention_heads=fields["num_attention_heads"],
                 num_hidden_layers=fields["num_layers"])
    if not mla:
        shape["num_key_value_heads"] = fields["num_query_groups"]
    if fields.get("num_moe_experts"):
        shape["num_experts"] = fields["num_moe_experts"]
    check_layout(family, shape, layout_of(fields), where=where)
    for change in get_platform().adjust_model_fields(fields):
        logger.info("platform: %s", change)
    config = config_class(**fields)

    vocab = hf_config.vocab_size
    from megatron_swift.rlhf.reward import seq_cls_num_labels

    num_labels = seq_cls_num_labels(hf_config)
    settings = GPTSettings(
        vocab_size=vocab,
        padded_vocab_size=settings_overrides.get("padded_vocab_size") or padded_vocab_size(vocab, tp),
        max_sequence_length=settings_overrides.get("max_sequence_length")
        or getattr(hf_config, "max_position_embeddings", 4096),
        share_embeddings_and_output_weights=num_labels is None and settings_overrides.get(
            "share_embeddings_and_output_weights", bool(getattr(hf_config, "tie_word_embeddings", False))),
        rotary_base=settings_overrides.get("rotary_base") or theta,
        rope_parameters=rope_parameters,
        family=family,
        rotary_percent=float(rope_parameters_of(hf_config).get("partial_rotary_factor")
                             or getattr(hf_config, "partial_rotary_factor", None) or 1.0),
        num_labels=num_labels,
    )
    if settings.padded_vocab_size % tp or settings.padded_vocab_size < vocab:
        raise ValueError(
            f"padded_vocab_size {settings.padded_vocab_size} must be >= vocab_size {vocab} and "
            f"divisible by tensor_model_parallel_size {tp}"
        )
    return config, settings
