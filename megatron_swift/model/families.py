"""Model families: one registered, declarative object per family (Megatron-Bridge's model bridges
are the model).

A :class:`ModelFamily` says everything that distinguishes a family, in one place:

* ``model_types`` / ``architectures``: the Hugging Face configs it serves;
* ``config_map``: HF config field -> TransformerConfig field (Megatron-Bridge's CONFIG_MAPPING),
  on top of :data:`COMMON_CONFIG_MAP`; ``config_fields(hf_config)`` adds what is computed rather
  than copied (MoE layer pattern, MLA rope, ...); ``config_class`` is the TransformerConfig class
  (``MLATransformerConfig`` for multi-latent attention);
* ``rules``: the weight rules of the checkpoint conversion (``converters/mapping.py`` vocabulary),
  ``ignore_hf_keys``: HF tensors that are knowingly dropped (logged);
* ``tiny``: the overrides of a tiny random test model, ``template``: the default chat template;
* ``layouts``: the parallel dimensions the family supports (anything else is refused early by
  :func:`megatron_swift.model.shapes.check_layout`), ``tp_split``: the HF sizes TP must divide.

Adding a family is one :func:`register_family` call (the built-in ones live in
``converters/families/*.py`` and are registered on first lookup).
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

logger = logging.getLogger(__name__)

# HF config key -> TransformerConfig field, the same for every family (a missing HF key is skipped
# and megatron's default stays).
COMMON_CONFIG_MAP: tuple[tuple[str, str], ...] = (
    ("num_hidden_layers", "num_layers"),
    ("hidden_size", "hidden_size"),
    ("intermediate_size", "ffn_hidden_size"),
    ("num_attention_heads", "num_attention_heads"),
    ("rms_norm_eps", "layernorm_epsilon"),
    ("initializer_range", "init_method_std"),
    ("attention_dropout", "attention_dropout"),
)

ALL_LAYOUTS = frozenset({"tp", "sp", "pp", "vpp", "cp", "ep", "etp"})
LAYOUT_NAMES = {"tp": "tensor parallel", "sp": "sequence parallel", "pp": "pipeline parallel",
                "vpp": "virtual pipeline", "cp": "context parallel", "ep": "expert parallel",
                "etp": "expert tensor parallel"}


def _default_tp_split(cfg: dict) -> dict:
    """The HF sizes tensor parallelism splits (name -> value) for GQA attention + a dense MLP."""
    heads = cfg.get("num_attention_heads")
    out = {}
    if heads:
        out["num_attention_heads"] = heads
        out["num_key_value_heads"] = cfg.get("num_key_value_heads") or heads
    return out


@dataclass(frozen=True)
class ModelFamily:
    name: str
    model_types: tuple[str, ...]
    rules: tuple = ()  # converters.mapping.Rule
    architectures: tuple[str, ...] = ()
    config_map: tuple[tuple[str, str], ...] = ()
    # hf_config -> extra TransformerConfig fields (computed ones); applied after config_map
    config_fields: Optional[Callable[[Any], dict]] = None
    # hf_config -> None, or raises ValueError for a config this family cannot represent
    check_config: Optional[Callable[[Any], None]] = None
    config_class: str = "transformer"  # or "mla" (MLATransformerConfig)
    # qkv bias: True/False, or the HF config key that says ("attention_bias").
    qkv_bias: bool | str = "attention_bias"
    qk_layernorm: bool = False
    tiny: dict = field(default_factory=dict)
    template: Optional[str] = None
    layouts: frozenset = ALL_LAYOUTS
    # cfg dict -> {name: size} that TP must divide (default: attention heads and KV heads)
    tp_split: Callable[[dict], dict] = _default_tp_split
    # (TransformerConfig, HF key) -> True for HF tensors the conversion knowingly leaves out
    # (logged with ``ignore_reason``), e.g. DeepSeek's MTP layers
    ignore_hf: Optional[Callable[[Any, str], bool]] = None
    ignore_reason: str = ""
    # training at TP > 1 needs sequence parallelism (MLA: the rope key's gradient is reduced over
    # TP only by sequence parallelism's reduce-scatter in megatron-core 0.16)
    tp_needs_sp: bool = False
    hf_ids: str = ""  # documentation: the Hub models it covers
    notes: str = ""

    @property
    def mapping(self):
        from megatron_swift.converters.mapping import FamilyMapping

        cached = _MAPPINGS.get(self.name)
        if cached is None or cached[0] is not self:
            cached = (self, FamilyMapping(self.name, tuple(self.rules)))
            _MAPPINGS[self.name] = cached
        return cached[1]

    def ignored(self, config, key: str) -> bool:
        return self.ignore_hf is not None and bool(self.ignore_hf(config, key))


_MAPPINGS: dict[str, tuple] = {}
_REGISTRY: dict[str, ModelFamily] = {}
_BY_MODEL_TYPE: dict[str, ModelFamily] = {}
# Built-in families: converters/families/<module>.py, each with a FAMILY object.
BUILTIN_MODULES = ("llama", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mixtral", "mistral", "internlm3",
                   "deepseek_v3", "deepseek_v2", "glm4_moe")
_loaded = False


class UnsupportedModelError(ValueError):
    pass


def register_family(family: ModelFamily, replace: bool = False) -> ModelFamily:
    """Registers a family (its rules are checked now: two rules for one parameter is an error)."""
    _load_builtin()
    taken = [t for t in family.model_types if t in _BY_MODEL_TYPE and _BY_MODEL_TYPE[t].name != family.name]
    if not replace and (family.name in _REGISTRY or taken):
        raise ValueError(f"model family {family.name!r} (model types {', '.join(family.model_types)}) is already "
                         f"registered; pass replace=True to override it")
    _add(family)
    family.mapping  # validates the rules
    return family


def unregister_family(name: str) -> None:
    family = _REGISTRY.pop(name, None)
    if family is not None:
        for t in family.model_types:
            _BY_MODEL_TYPE.pop(t, None)
        _MAPPINGS.pop(name, None)


def _add(family: ModelFamily) -> None:
    old = _REGISTRY.get(family.name)
    if old is not None:
        for t in old.model_types:
            _BY_MODEL_TYPE.pop(t, None)
    _REGISTRY[family.name] = family
    for t in family.model_types:
        _BY_MODEL_TYPE[t] = family


def _load_builtin() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in BUILTIN_MODULES:
        _add(importlib.import_module(f"megatron_swift.converters.families.{module}").FAMILY)


def families() -> dict[str, ModelFamily]:
    _load_builtin()
    return dict(_REGISTRY)


def supported_model_types() -> list[str]:
    _load_builtin()
    return sorted(_BY_MODEL_TYPE)


def family_for(model_type: str, where: str = "config.json") -> ModelFamily:
    _load_builtin()
    if isinstance(model_type, ModelFamily):
        return model_type
    try:
        return _BY_MODEL_TYPE[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"{where}: model_type {model_type!r} is not supported; supported model types: "
            f"{', '.join(supported_model_types())}"
        ) from None


def family_by_name(name: str) -> ModelFamily:
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"no checkpoint conversion for model family {name!r}; supported: "
                         f"{', '.join(sorted(_REGISTRY))}") from None


class _Families:
    """``FAMILIES``: the registered families, as a live tuple-like view."""

    def __iter__(self):
        return iter(families().values())

    def __len__(self):
        return len(families())


FAMILIES = _Families()
