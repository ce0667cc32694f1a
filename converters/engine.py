"""The one conversion engine every family mapping runs on.

It walks the parameters THIS rank holds (any TP / PP / VPP / EP layout, local or TE layer spec),
finds each one's rule, and

* HF -> mcore: computes the rank's shard from the HF tensors, reading only the slices it needs
  (:func:`materialize`, :func:`load_hf_into_mcore`);
* mcore -> HF: gathers one tensor at a time over TP (and expert-TP / EP for experts) to the
  first rank of the pipeline stage, which hands the HF tensors to the shard writer
  (:func:`write_hf_weights`, :func:`save_mcore_as_hf`).

Layer and expert indices in parameter names are local (to the pipeline stage / virtual chunk and
the expert-parallel rank); HF names use global ones: a layer's ``layer_number`` (global,
1-based, megatron adds ``get_transformer_layer_offset``) and the MoE layer's
``local_expert_indices`` give them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist

from megatron_swift.model.builder import unwrap

from . import comm
from .registry import mapping_for
from .hf_io import INDEX_FILE, HFCheckpoint, ShardPlan, ShardWriter, parse_size
from .mapping import FamilyMapping, Rule, Source, format_key, split_name
from .transforms import Geometry, geometry, global_shape_of, hf_shapes, hf_to_local, local_shards_to_hf

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _ps():
    from megatron.core import parallel_state

    return parallel_state


# --------------------------------------------------------------------------------- local params

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
        for name, p in model.named_parameters():
            template, li, le = split_name(name)
            try:
                rule = mapping.rule_for(template)
            except KeyError as e:
                raise ValueError(str(e.args[0])) from None
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


# ------------------------------------------------------------------------------------ HF -> mcore

def materialize(lp: LocalParam, reader: HFCheckpoint, geo: Geometry, dtype: Optional[torch.dtype] = None,
                rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """This rank's shard of ``lp`` (or its rows ``[a, b)``) computed from the HF checkpoint; only
    the slices it needs are read."""
    sources = lp.sources
    shapes = hf_shapes(lp.rule, lp.global_shape, geo)

    def read(i: int, index: tuple) -> torch.Tensor:
        return reader.read(sources[i], lp.layer, lp.expert, shapes[i], index)

    tensor = hf_to_local(lp.rule, read, tuple(lp.param.shape), lp.tp_rank, lp.tp_size, geo, rows)
    expected = tuple(lp.param.shape) if rows is None else (rows[1] - rows[0], *lp.param.shape[1:])
    if tuple(tensor.shape) != expected:
        raise ValueError(f"{lp.name}: converted shard has shape {list(tensor.shape)}, the model expects "
                         f"{list(expected)}")
    return tensor.to(dtype or lp.param.dtype)


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


def check_hf_checkpoint(reader: HFCheckpoint, entries: list[HFEntry], ignore_unused: Iterable[str] = ()) -> None:
    """Every tensor the model needs is there with the right shape; nothing in the checkpoint is
    left unused (an unused tensor means the converted model would silently differ)."""
    used = set()
    for e in entries:
        key, info, stacked = reader.require(e.source, e.layer, e.expert, e.shape)
        used.add(key)
    ignorable = {"lm_head.weight"} if any(not e.written for e in entries) else set()
    ignorable |= set(ignore_unused)
    unused = sorted(k for k in reader.tensors if k not in used and k not in ignorable
                    and not k.endswith("rotary_emb.inv_freq"))
    if unused:
        shown = ", ".join(unused[:8]) + (f" ... ({len(unused)} in all)" if len(unused) > 8 else "")
        raise ValueError(f"the checkpoint in {reader.dir} has tensors the conversion does not use: {shown}; "
                         f"the model config does not describe this checkpoint")


def load_hf_into_mcore(chunks: list, hf_dir: str, config, settings, *, check: bool = True) -> None:
    """Fills this rank's already-built model chunks in place from a Hugging Face safetensors dir.

    Each rank reads only the slices of its own shards. With ``check`` (default) every rank first
    verifies the whole checkpoint against the model (missing tensors, shapes, unused tensors):
    a collective call, so every rank must make it.
    """
    mapping = mapping_for(settings.family)
    geo = geometry(config, settings)
    reader = HFCheckpoint(hf_dir)
    try:
        lps = local_params(chunks, mapping, settings.share_embeddings_and_output_weights)
        if check:
            check_hf_checkpoint(reader, global_entries(lps, geo))
        with torch.no_grad():
            for lp in lps:
                lp.param.copy_(materialize(lp, reader, geo))
    finally:
        reader.close()


# ------------------------------------------------------------------------------------ mcore -> HF

class LiveParams:
    """Parameter values straight from built (real) chunks."""

    def materialize(self, group: list[LocalParam]) -> None:
        pass

    def tensor(self, lp: LocalParam) -> torch.Tensor:
        return lp.param.detach()

    def release(self, group: list[LocalParam]) -> None:
        pass

    collective = False


@dataclass
class _Ranks:
    tp_rank: int
    tp_size: int
    dp_rank: int  # with context parallel
    etp_rank: int
    etp_size: int
    ep_rank: int
    ep_size: int
    edp_rank: int
    tp_group: object = field(repr=False)
    etp_group: object = field(repr=False)
    ep_group: object = field(repr=False)

    @property
    def writer(self) -> bool:
        """The first rank of its pipeline stage: it writes that stage's tensors."""
        return self.tp_rank == 0 and self.dp_rank == 0


def _ranks() -> _Ranks:
    ps = _ps()
    r = _Ranks(
        tp_rank=ps.get_tensor_model_parallel_rank(), tp_size=ps.get_tensor_model_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(with_context_parallel=True),
        etp_rank=ps.get_expert_tensor_parallel_rank(), etp_size=ps.get_expert_tensor_parallel_world_size(),
        ep_rank=ps.get_expert_model_parallel_rank(), ep_size=ps.get_expert_model_parallel_world_size(),
        edp_rank=ps.get_expert_data_parallel_rank(),
        tp_group=ps.get_tensor_model_parallel_group(), etp_group=ps.get_expert_tensor_parallel_group(),
        ep_group=ps.get_expert_model_parallel_group(),
    )
    if r.writer and (r.etp_rank or r.ep_rank or r.edp_rank):
        raise RuntimeError(f"unexpected rank layout: the stage's first rank has expert ranks "
                           f"etp={r.etp_rank} ep={r.ep_rank} edp={r.edp_rank}")
    return r


def _emit(lp: LocalParam, tensor: torch.Tensor, geo: Geometry, ranks: _Ranks,
          submit: Optional[Callable[[str, torch.Tensor], None]]) -> None:
    """Gathers one parameter to the stage's writer and submits its HF tensors there."""
    rule = lp.rule
    if lp.tied:
        return
    if not rule.is_expert:
        if ranks.dp_rank != 0:
            return  # another data-parallel replica writes it
        shards = [tensor] if rule.tp_dim is None else comm.gather(tensor, ranks.tp_group, ranks.tp_size,
                                                               ranks.tp_rank == 0)
        if ranks.tp_rank != 0:
            return
        for key, hf in zip(lp.hf_keys(), local_shards_to_hf(rule, shards, geo)):
            submit(key, hf)
        return
    if ranks.edp_rank != 0:
        return
    shards = [tensor] if rule.tp_dim is None else comm.gather(tensor, ranks.etp_group, ranks.etp_size,
                                                         ranks.etp_rank == 0)
    if ranks.etp_rank != 0:
        return
    for source, hf in zip(lp.sources, local_shards_to_hf(rule, shards, geo)):
        per_ep = comm.gather(hf, ranks.ep_group, ranks.ep_size, ranks.ep_rank == 0)
        if ranks.ep_rank != 0:
            continue
        for ep, t in enumerate(per_ep):
            expert = ep * lp.num_local_experts + lp.local_expert
            submit(format_key(source.key, lp.layer, expert), t)


def _groups(lps: list[LocalParam], budget: int) -> list[list[LocalParam]]:
    """Consecutive parameters of one (chunk, layer), split further to stay under ``budget`` bytes."""
    groups: list[list[LocalParam]] = []
    current_key, size = None, 0
    for lp in lps:
        key = (lp.chunk, lp.layer if lp.name.startswith("decoder.layers.") else lp.name.split(".")[0])
        nbytes = lp.param.numel() * lp.param.element_size()
        if not groups or key != current_key or (size + nbytes > budget and groups[-1]):
            groups.append([])
            current_key, size = key, 0
        groups[-1].append(lp)
        size += nbytes
    return groups


def write_hf_weights(chunks: list, config, settings, out_dir: str, *, dtype: torch.dtype,
                     max_shard_size="5GB", thread_count: int = 1, params=None,
                     group_bytes: int = 1 << 30) -> ShardPlan:
    """Writes the model's weights as HF safetensors shards (+ index) into ``out_dir``.

    Collective: every rank calls it. ``params`` supplies parameter values (default: the chunks'
    own; ``mcore_io.CheckpointParams`` loads them group by group from a dist checkpoint).
    """
    params = params or LiveParams()
    mapping = mapping_for(settings.family)
    geo = geometry(config, settings)
    lps = local_params(chunks, mapping, settings.share_embeddings_and_output_weights)
    entries = [e for e in global_entries(lps, geo) if e.written]
    plan = ShardPlan([(e.key, e.shape) for e in entries], dtype, parse_size(max_shard_size))
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        plan.create_files(out_dir)
    _barrier()
    ranks = _ranks()
    writer = ShardWriter(plan, out_dir, thread_count) if ranks.writer else None
    submit = writer.submit if writer is not None else None
    groups = _groups(lps, group_bytes)
    slots = len(groups)
    if params.collective and dist.is_initialized():
        slots = comm.max_int(slots)
    try:
        for s in range(slots):
            group = groups[s] if s < len(groups) else []
            params.materialize(group)
            for lp in group:
                if not lp.tied:
                    _emit(lp, params.tensor(lp), geo, ranks, submit)
            params.release(group)
    finally:
        if writer is not None:
            writer.close()
    written = sorted(writer.written) if writer is not None else []
    if dist.is_initialized() and dist.get_world_size() > 1:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, written)
        written = {k for w in everyone for k in w}
    missing = sorted(set(plan.tensors) - set(written))
    if missing:
        raise RuntimeError(f"internal error: {len(missing)} planned tensors were not written: {missing[:5]}")
    if rank == 0 and plan.sharded:
        with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
            json.dump(plan.index(), f, indent=2)
    _barrier()
    return plan


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


# -------------------------------------------------------------------------- HF dir: config, files

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
NOT_COPIED = {"config.json", INDEX_FILE, "pytorch_model.bin.index.json", "args.json"}


def write_hf_config(hf_config, out_dir: str, dtype: torch.dtype, source_dir: Optional[str] = None) -> None:
    """``config.json`` (the source's, with the saved dtype) and the source's other small files
    (generation_config.json, tokenizer files, chat template, remote code)."""
    name = str(dtype).replace("torch.", "")
    cfg = None
    if source_dir and os.path.isfile(os.path.join(source_dir, "config.json")):
        with open(os.path.join(source_dir, "config.json")) as f:
            cfg = json.load(f)
    if cfg is None:
        cfg = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else None
    for d in (cfg, text):
        if d is None:
            continue
        if "dtype" in d or "torch_dtype" not in d:
            d["dtype"] = name
        if "torch_dtype" in d:
            d["torch_dtype"] = name
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    if source_dir and os.path.isdir(source_dir):
        for entry in sorted(os.listdir(source_dir)):
            path = os.path.join(source_dir, entry)
            if (not os.path.isfile(path) or entry in NOT_COPIED or entry.endswith(WEIGHT_SUFFIXES)
                    or entry.startswith(".")):
                continue
            shutil.copy2(path, os.path.join(out_dir, entry))


def save_mcore_as_hf(chunks: list, config, settings, hf_config, out_dir: str, *, source_dir: Optional[str] = None,
                     torch_dtype=None, max_shard_size="5GB", thread_count: int = 1, exist_ok: bool = False,
                     params=None) -> str:
    """Saves this model (every rank's chunks; collective) as a Hugging Face model directory.

    Weights stream tensor by tensor to the first rank of each pipeline stage, which writes them
    into pre-planned safetensors shards; ``config.json`` comes from ``source_dir`` (or
    ``hf_config``) with the saved dtype, plus the source's tokenizer / generation config files.
    The directory appears atomically (written next to ``out_dir`` and renamed).
    """
    from .outdir import atomic_output_dir

    dtype = _dtype(torch_dtype) or _dtype(getattr(hf_config, "dtype", None)) or torch.float32
    with atomic_output_dir(out_dir, exist_ok) as tmp:
        write_hf_weights(chunks, config, settings, tmp, dtype=dtype, max_shard_size=max_shard_size,
                         thread_count=thread_count, params=params)
        if not dist.is_initialized() or dist.get_rank() == 0:
            write_hf_config(hf_config, tmp, dtype, source_dir)
    return out_dir


def _dtype(value) -> Optional[torch.dtype]:
    if value is None:
        return None
    if isinstance(value, torch.dtype):
        return value
    name = str(value).replace("torch.", "")
    if name not in DTYPES:
        raise ValueError(f"unsupported torch_dtype {value!r} (choose from {', '.join(DTYPES)})")
    return DTYPES[name]
