"""mcore -> HF weights: one tensor at a time is gathered over TP (and expert-TP / EP for experts)
to the first rank of its pipeline stage, which hands the HF tensors to the shard writer
(:func:`write_hf_weights`), or to every rank, for colocated rollout engines (:func:`iter_hf_weights`
with ``everywhere``); both are the same generator."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from . import comm
from .hf_io import INDEX_FILE, ShardPlan, ShardWriter, parse_size
from .mapping import format_key
from .plan import LocalParam, _ps, global_entries, local_params
from .registry import mapping_of
from .transforms import Geometry, geometry, local_shards_to_hf


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


def _hf_tensors(lp: LocalParam, tensor: torch.Tensor, geo: Geometry, ranks: _Ranks,
                everywhere: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """The HF tensors of one parameter, gathered over TP (expert TP and EP for experts): on the
    stage's writer only, or with ``everywhere`` on every rank of the stage (all-gathers; every
    data-parallel replica gathers its own copy)."""
    rule = lp.rule
    # dense tensors are split over TP and replicated over DP; experts over expert-TP and expert-DP
    if rule.is_expert:
        dp_rank, group, size, rank = ranks.edp_rank, ranks.etp_group, ranks.etp_size, ranks.etp_rank
    else:
        dp_rank, group, size, rank = ranks.dp_rank, ranks.tp_group, ranks.tp_size, ranks.tp_rank
    if dp_rank != 0 and not everywhere:
        return  # another data-parallel replica writes it
    if rule.tp_dim is None:
        shards = [tensor]
    elif everywhere:
        shards = comm.all_gather_list(tensor, group, size)
    else:
        shards = comm.gather(tensor, group, size, rank == 0)
    if rank != 0 and not everywhere:
        return
    if not rule.is_expert:
        yield from zip(lp.hf_keys(), local_shards_to_hf(rule, shards, geo))
        return
    for source, hf in zip(lp.sources, local_shards_to_hf(rule, shards, geo)):
        if everywhere:
            per_ep = comm.all_gather_list(hf, ranks.ep_group, ranks.ep_size)
        else:
            per_ep = comm.gather(hf, ranks.ep_group, ranks.ep_size, ranks.ep_rank == 0)
            if ranks.ep_rank != 0:
                continue
        for ep, t in enumerate(per_ep):
            expert = ep * lp.num_local_experts + lp.local_expert
            yield format_key(source.key, lp.layer, expert), t


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


def iter_hf_weights(chunks: list, config, settings, *, everywhere: bool = False,
                    dtype: Optional[torch.dtype] = None, params=None,
                    group_bytes: int = 1 << 30) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields the model's weights as ``(hf_name, full tensor)``, one tensor at a time, gathered over
    TP / expert TP / EP.

    Collective: every rank iterates it to the end. By default each tensor is yielded once, on the
    first rank of the pipeline stage that holds it (what a file writer needs). With ``everywhere``
    every rank gets every tensor (all-gathers within the stage, then a broadcast over the pipeline
    group): a colocated rollout engine on each training rank loads the whole model. The tied output
    layer is not yielded (HF reads it from the embedding). ``dtype``: cast each yielded tensor.
    ``params`` supplies parameter values (default: the chunks' own; ``mcore_io.CheckpointParams``
    loads them group by group from a dist checkpoint). Tensors in flight: one group of at most
    ``group_bytes`` of parameters (one layer, or part of it). A yielded tensor may be a view of a live
    parameter (unsharded, no cast): copy it to keep it past the next optimizer step.
    """
    params = params or LiveParams()
    mapping = mapping_of(settings)
    geo = geometry(config, settings)
    lps = local_params(chunks, mapping, settings.share_embeddings_and_output_weights)
    ranks = _ranks()
    groups = _groups(lps, group_bytes)
    pp_group, pp_size = _pipeline_group()
    slots = len(groups)
    if dist.is_initialized() and dist.get_world_size() > 1 and (params.collective or (everywhere and pp_size > 1)):
        slots = comm.max_int(slots)
    for s in range(slots):
        group = groups[s] if s < len(groups) else []
        params.materialize(group)
        mine = []
        for lp in group:
            if lp.tied:
                continue
            for key, tensor in _hf_tensors(lp, params.tensor(lp), geo, ranks, everywhere):
                tensor = tensor if dtype is None else tensor.to(dtype)
                if everywhere and pp_size > 1:
                    mine.append((key, tensor))  # exchanged with the other stages below
                else:
                    yield key, tensor
        params.release(group)
        if everywhere and pp_size > 1:
            yield from _across_stages(mine, pp_group)


def _pipeline_group():
    if not dist.is_initialized():
        return None, 1
    ps = _ps()
    return ps.get_pipeline_model_parallel_group(), ps.get_pipeline_model_parallel_world_size()


def _across_stages(mine: list, pp_group) -> Iterator[tuple[str, torch.Tensor]]:
    """Every stage's tensors (this rank's ``mine`` and the same rank of the other stages'), in stage order."""
    everyone = comm.all_gather_object([(k, tuple(t.shape), t.dtype) for k, t in mine], pp_group)
    own = dist.get_rank(pp_group)
    for stage, entries in enumerate(everyone):
        src = dist.get_global_rank(pp_group, stage)
        for i, (key, shape, dtype) in enumerate(entries):
            yield key, comm.broadcast(mine[i][1] if stage == own else None, src, shape, dtype, group=pp_group)


def write_hf_weights(chunks: list, config, settings, out_dir: str, *, dtype: torch.dtype,
                     max_shard_size="5GB", thread_count: int = 1, params=None,
                     group_bytes: int = 1 << 30) -> ShardPlan:
    """Writes the model's weights as HF safetensors shards (+ index) into ``out_dir``: the tensors of
    :func:`iter_hf_weights`, handed to the shard writer on each stage's first rank.

    Collective: every rank calls it. ``params``: see :func:`iter_hf_weights`.
    """
    mapping = mapping_of(settings)
    geo = geometry(config, settings)
    lps = local_params(chunks, mapping, settings.share_embeddings_and_output_weights)
    entries = [e for e in global_entries(lps, geo) if e.written]
    plan = ShardPlan([(e.key, e.shape) for e in entries], dtype, parse_size(max_shard_size))
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        plan.create_files(out_dir)
    _barrier()
    writer = ShardWriter(plan, out_dir, thread_count) if _ranks().writer else None
    try:
        for key, tensor in iter_hf_weights(chunks, config, settings, params=params, group_bytes=group_bytes):
            writer.submit(key, tensor)  # only the stage's writer receives tensors
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
