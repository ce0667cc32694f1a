"""The model layer's pure shape check: can this family, with this HF config, run in this parallel
layout? One function for the argument validator (early, before any process group exists) and the
model builder, so the divisibility rules live in one place.

Errors are :class:`LayoutError` naming the Megatron argument, its value, what it must divide and
the values that would work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional

from .families import LAYOUT_NAMES, ModelFamily, family_for

EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_LAYOUT_ARGS = {"tp": "tensor_model_parallel_size", "sp": "sequence_parallel", "pp": "pipeline_model_parallel_size",
                "vpp": "virtual_pipeline_model_parallel_size", "cp": "context_parallel_size",
                "ep": "expert_model_parallel_size", "etp": "expert_tensor_parallel_size"}


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None
    cp: int = 1
    ep: int = 1
    etp: Optional[int] = None
    sp: bool = False
    first: Optional[int] = None  # decoder_first_pipeline_num_layers
    last: Optional[int] = None


def layout_of(fields: Mapping[str, Any]) -> Layout:
    """From TransformerConfig-named fields (or argparse names, which are the same)."""
    get = fields.get
    return Layout(tp=get("tensor_model_parallel_size") or 1, pp=get("pipeline_model_parallel_size") or 1,
                  vpp=get("virtual_pipeline_model_parallel_size"), cp=get("context_parallel_size") or 1,
                  ep=get("expert_model_parallel_size") or 1, etp=get("expert_tensor_parallel_size"),
                  sp=bool(get("sequence_parallel")), first=get("decoder_first_pipeline_num_layers"),
                  last=get("decoder_last_pipeline_num_layers"))


class LayoutError(ValueError):
    def __init__(self, argument: str, value, detail: str):
        self.argument, self.value, self.detail = argument, value, detail
        super().__init__(f"{argument}={value} {detail}")


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def fmt(values: Iterable) -> str:
    return ", ".join(str(v) for v in values)


def _int(cfg: Mapping, *keys) -> Optional[int]:
    for key in keys:
        value = cfg.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def num_experts_of(cfg: Mapping) -> Optional[int]:
    return _int(cfg, *EXPERT_KEYS)


def _as_dict(hf_config) -> dict:
    if hf_config is None:
        return {}
    if isinstance(hf_config, Mapping):
        cfg = dict(hf_config)
    else:
        cfg = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(vars(hf_config))
    text = cfg.get("text_config")
    return dict(text) if isinstance(text, Mapping) else cfg


def check_layout(family: ModelFamily | str | None, hf_config, layout: Layout, *, where: str = "config.json",
                 num_experts: Optional[int] = None, training: bool = False) -> None:
    """Raises :class:`LayoutError` when ``layout`` cannot run ``hf_config`` (a transformers config or
    config.json dict, already carrying any shape overrides) of ``family`` (None: from model_type;
    an unknown model type then skips the family-specific parts); ``training``: also the rules that
    only gradients need."""
    cfg = _as_dict(hf_config)
    if family is None or isinstance(family, str):
        try:
            family = family_for(family or cfg.get("model_type"), where)
        except ValueError:
            family = None
    label = where
    # 1. parallel dimensions the family does not support
    if family is not None:
        used = {"tp": layout.tp > 1, "sp": layout.sp, "pp": layout.pp > 1, "vpp": (layout.vpp or 1) > 1,
                "cp": layout.cp > 1, "ep": layout.ep > 1, "etp": (layout.etp or 1) > 1}
        for dim, on in used.items():
            if on and dim not in family.layouts:
                value = getattr(layout, dim)
                supported = ", ".join(LAYOUT_NAMES[d] for d in sorted(family.layouts)) or "none"
                raise LayoutError(_LAYOUT_ARGS[dim], value,
                                  f"is not supported for model family {family.name} ({label}): {LAYOUT_NAMES[dim]} "
                                  f"is not built/tested for it; supported layouts: {supported}")
        if training and family.tp_needs_sp and layout.tp > 1 and not layout.sp:
            raise LayoutError("tensor_model_parallel_size", layout.tp,
                              f"without --sequence_parallel is not supported for training model family "
                              f"{family.name} ({label}): megatron-core reduces multi-latent attention's rope-key "
                              f"gradient over the TP ranks only through sequence parallelism; add "
                              f"--sequence_parallel true")
    # 2. tensor parallelism divides the sizes it splits
    tp = layout.tp
    experts = num_experts if num_experts is not None else num_experts_of(cfg)
    if family is not None:
        constraints = dict(family.tp_split(cfg))
    else:
        constraints = {}
        heads = _int(cfg, "num_attention_heads", "n_head")
        if heads:
            constraints["num_attention_heads"] = heads
            constraints["num_key_value_heads"] = _int(cfg, "num_key_value_heads", "multi_query_group_num") or heads
    ffn = _int(cfg, "intermediate_size", "ffn_hidden_size")
    if ffn is not None and experts is None and "intermediate_size" not in constraints:
        constraints["intermediate_size"] = ffn  # dense MLP (MoE layers are checked against EP/ETP)
    bad = {k: v for k, v in constraints.items() if v % tp}
    if bad:
        why = ""
        kv = constraints.get("num_key_value_heads")
        if kv is not None and kv % tp and tp > kv:
            why = "; Megatron cannot replicate KV heads, so TP may not exceed num_key_value_heads"
        valid = divisors(math.gcd(*constraints.values()))
        raise LayoutError("tensor_model_parallel_size", tp,
                          f"does not divide {', '.join(f'{k} ({v})' for k, v in bad.items())} of {label}{why}; "
                          f"valid tensor_model_parallel_size values: {fmt(valid)}")
    # 3. pipeline stages split the layers
    layers = _int(cfg, "num_hidden_layers", "n_layer", "num_layers")
    pp, vpp = layout.pp, layout.vpp or 1
    if layers is not None and pp > 1:
        if layout.first is None and layout.last is None:
            if layers % (pp * vpp):
                what = "pipeline_model_parallel_size" + (" x virtual_pipeline_model_parallel_size" if vpp > 1 else "")
                raise LayoutError("pipeline_model_parallel_size", pp,
                                  f"does not split the layers: {what} ({pp * vpp}) must divide the number of layers "
                                  f"({layers}) of {label}; valid pipeline_model_parallel_size values: "
                                  f"{fmt(d for d in divisors(layers) if (layers // d) % vpp == 0)} "
                                  f"(or set --decoder_first_pipeline_num_layers / --decoder_last_pipeline_num_layers)")
        else:
            rest = layers - (layout.first or 0) - (layout.last or 0)
            middle = pp - (layout.first is not None) - (layout.last is not None)
            if rest < 0 or (middle == 0 and rest) or (middle > 0 and rest % middle):
                raise LayoutError("decoder_first_pipeline_num_layers/decoder_last_pipeline_num_layers",
                                  f"{layout.first}/{layout.last}",
                                  f"leave the other {middle} pipeline stage(s) {rest} of {layers} layers, which they "
                                  f"cannot split evenly")
    # 4. expert parallelism divides the experts
    ep = layout.ep
    if ep > 1:
        if experts is None and cfg:
            raise LayoutError("expert_model_parallel_size", ep,
                              f"> 1 needs a MoE model, but {label} has no experts (config.json has none of "
                              f"{', '.join(EXPERT_KEYS)})")
        if experts is not None and experts % ep:
            raise LayoutError("expert_model_parallel_size", ep,
                              f"does not divide the number of experts ({experts}) of {label}; valid "
                              f"expert_model_parallel_size values: {fmt(divisors(experts))}")
