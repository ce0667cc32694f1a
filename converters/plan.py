"""What this rank holds and what the whole model is in HF terms: the planning half of a conversion.

:func:`local_params` walks the parameters THIS rank holds (any TP / PP / VPP / EP layout, local or
TE layer spec) and finds each one's rule; :func:`global_entries` is every HF tensor of the model
in canonical order (all ranks' lists together). Layer and expert indices in parameter names are
local (to the pipeline stage / virtual chunk and the expert-parallel rank); HF names use global
ones: a layer's ``layer_number`` (global, 1-based, megatron adds ``get_transformer_layer_offset``)
and the MoE layer's ``local_expert_indices`` give them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_swift.model.builder import unwrap

from .mapping import FamilyMapping, Rule, Source, format_key, split_name
from .transforms import Geometry, global_shape_of, hf_shapes


def _ps():
    from megatron.core import parallel_state

    return parallel_state


@dataclass
class LocalParam:
    """One parameter this rank holds, with everything the conversion needs to know about it."""

    chunk: int
    name: str  # name inside the (unwrapped) chunk
    rule: Rule
    param: torch.Tensor
    layer: Optional[int]  # global layer index (HF numbering)
    expert: Optional[int]  # global expert index
    local_expert: Optional[int]
    tp_rank: int  # in the TP group (expert-TP group for experts)
    tp_size: int
    global_shape: tuple  # of the un-sharded Megatron tensor
    tied: bool = False  # the last stage's copy of tied embeddings: read from the embedding, never written
    num_local_experts: int = 0

    @property
    def sources(self) -> tuple[Source, ...]:
        return (self.rule.tied_to,) if self.tied else self.rule.hf

    def hf_keys(self) -> list[str]:
        return [format_key(s.key, self.layer, self.expert) for s in self.sources]

    @property
    def order(self) -> tuple:
        """Sort key of its HF tensors: embedding, layers in order, final norm, output layer."""
        if self.name.startswith("embedding."):
            section = 0
        elif self.name.startswith("decoder.layers."):
            section = 1
        elif self.name.startswith("output_layer."):
            section = 3
        else:
            section = 2
        return (section, self.layer if self.layer is not None else -1, self.expert if self.expert is not None else -1,
                self.name)


def local_params(chunks: list, mapping: FamilyMapping, share_embeddings: bool) -> list[LocalParam]:
    ps = _ps()
    tp_rank, tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    etp_rank, etp_size = ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size()
    out = []
    for ci, chunk in enumerate(chunks):
        model = unwrap(chunk)
        layers = model.decoder.layers if hasattr(model, "decoder") else []
        for name, p, is_buffer in _tensors(model):
            if ".lora_" in name:  # LoRA adapter factors (megatron_swift.tuners.lora): not base weights
                continue
            template, li, le = split_name(name)
            try:
                rule = mapping.rule_for(template)
            except KeyError as e:
                if is_buffer:  # buffers without a rule (rope tables, token counters) are not weights
                    continue
                raise ValueError(str(e.args[0])) from None
            if rule.tp_follows_model:
                dim = getattr(p, "partition_dim", None) if getattr(p, "tensor_model_parallel", False) else None
                rule = dataclasses.replace(rule, tp_dim=dim)
            layer = expert = None
            num_local = 0
            if li is not None:
                layer = layers[li].layer_number - 1
            if le is not None:
                indices = layers[li].mlp.local_expert_indices
                expert, num_local = indices[le], len(indices)
            if rule.is_expert:
                r, size = etp_rank, etp_size
            else:
                r, size = tp_rank, tp_size
            if rule.tp_dim is None:
                r, size = 0, 1
            _check_partition(name, p, rule)
            tied = name == "output_layer.weight" and share_embeddings
            out.append(LocalParam(ci, name, rule, p, layer, expert, le, r, size,
                                  global_shape_of(rule, p.shape, size), tied, num_local))
    return out


def _tensors(model):
    """(name, tensor, is_buffer): the parameters, then the persistent buffers (e.g. the router's
    ``expert_bias``), which the checkpoints hold too."""
    for name, p in model.named_parameters():
        yield name, p, False
    persistent = set(model.state_dict(keep_vars=True))
    for name, b in model.named_buffers():
        if name in persistent:
            yield name, b, True


def _check_partition(name: str, p: torch.Tensor, rule: Rule) -> None:
    """The mapping's TP split dim must be megatron's (catches a wrong rule early).

    Transformer Engine's expert layers are built with ``parallel_mode=None`` whenever expert TP or
    EP > 1, and TE then tags every weight ``partition_dim=0`` (only "row" mode gets 1): for expert
    weights that tag says "split" but not along which dim, so dim 0 is accepted for any split rule."""
    if not hasattr(p, "tensor_model_parallel"):
        return
    dim = getattr(p, "partition_dim", None) if p.tensor_model_parallel else None
    if rule.is_expert and dim == 0 and rule.tp_dim is not None:
        return
    if rule.tp_dim != dim:
        what = f"splits dim {dim}" if dim is not None else "replicates it"
        raise ValueError(f"conversion rule for {name} has tp_dim={rule.tp_dim} but megatron {what} under TP")


@dataclass(frozen=True)
class HFEntry:
    """One HF tensor of the whole model (all ranks' parameters together)."""

    key: str
    shape: tuple
    order: tuple
    source: Source
    layer: Optional[int]
    expert: Optional[int]
    written: bool  # False for the tied output layer (read from the embedding, not saved)


def _entries_of(lp: LocalParam, geo: Geometry, ep_size: int) -> list[HFEntry]:
    """The HF tensors of one local parameter; for an expert, those of the same local expert on
    every EP rank too (they have the same shapes), so the writer's list is complete."""
    shapes = hf_shapes(lp.rule, lp.global_shape, geo)
    if lp.rule.is_expert:
        experts = [r * lp.num_local_experts + lp.local_expert for r in range(ep_size)]
    else:
        experts = [None]
    entries = []
    for expert in experts:
        for part, (source, shape) in enumerate(zip(lp.sources, shapes)):
            entries.append(HFEntry(format_key(source.key, lp.layer, expert), tuple(shape),
                                   lp.order[:2] + (expert if expert is not None else -1, lp.order[3], part),
                                   source, lp.layer, expert, not lp.tied))
    return entries


def global_entries(lps: list[LocalParam], geo: Geometry) -> list[HFEntry]:
    """Every HF tensor of the model in canonical order (an all-gather of each rank's list)."""
    ep = _ps().get_expert_model_parallel_world_size()
    mine = [e for lp in lps for e in _entries_of(lp, geo, ep)]
    if dist.is_initialized() and dist.get_world_size() > 1:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
    else:
        everyone = [mine]
    by_key: dict[str, HFEntry] = {}
    for entries in everyone:
        for e in entries:
            old = by_key.get(e.key)
            if old is None or (e.written and not old.written):
                by_key[e.key] = e
    return sorted(by_key.values(), key=lambda e: e.order)
