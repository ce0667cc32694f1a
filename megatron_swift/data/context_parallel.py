"""Splitting a micro batch across context-parallel ranks (load-balanced, as megatron-core does).

With causal attention the tokens at the end of a sequence cost the most, so megatron cuts the
sequence into ``2 x CP`` chunks and gives rank ``r`` chunks ``r`` and ``2 x CP - 1 - r``. For padded
``[batch, seq]`` micro batches that is megatron-core's ``get_batch_on_this_cp_rank`` (used here as it
is). For padding-free (THD) rows every *sequence* is cut that way, as Transformer Engine's THD
context-parallel attention expects: each sequence is padded to a multiple of ``2 x CP`` (the
collator does it and records ``cu_seqlens_q_padded``), and rank ``r`` keeps chunks ``r`` and
``2 x CP - 1 - r`` of every sequence, in order (TE's ``thd_get_partitioned_indices``).
"""

from __future__ import annotations

import dataclasses

import torch

SEQUENCE_KEYS = ("input_ids", "labels", "position_ids", "padding_mask")


class _Group:
    """The (size, rank) of a context-parallel group, in the interface megatron's helpers read."""

    def __init__(self, size: int, rank: int):
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


def thd_partition_indices(cu_seqlens_padded: torch.Tensor, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Token indices of a THD row that context-parallel rank ``cp_rank`` keeps."""
    bounds = cu_seqlens_padded.tolist()
    keep = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        length = end - start
        if length % (2 * cp_size):
            raise ValueError(f"a sequence of {length} tokens is not padded to a multiple of 2 x CP = {2 * cp_size}")
        chunk = length // (2 * cp_size)
        for c in (cp_rank, 2 * cp_size - 1 - cp_rank):
            keep.append(torch.arange(start + c * chunk, start + (c + 1) * chunk))
    return torch.cat(keep) if keep else torch.zeros(0, dtype=torch.long)


def split_for_context_parallel(batch: dict, cp_size: int, cp_rank: int) -> dict:
    """This CP rank's part of a micro batch (a new dict; ``packed_seq_params`` keeps the global
    cu_seqlens, which is what TE's THD context-parallel attention takes)."""
    if cp_size == 1:
        return batch
    params = batch.get("packed_seq_params")
    out = dict(batch)
    if params is None:
        from megatron.core.utils import get_batch_on_this_cp_rank

        part = get_batch_on_this_cp_rank({k: batch[k] for k in SEQUENCE_KEYS if k in batch},
                                         cp_group=_Group(cp_size, cp_rank))
        out.update(part)
        return out
    if params.cu_seqlens_q_padded is None:
        raise ValueError("THD micro batches for context parallelism need cu_seqlens_q_padded (sequences padded to "
                         "a multiple of 2 x CP)")
    index = thd_partition_indices(params.cu_seqlens_q_padded, cp_size, cp_rank).to(batch["input_ids"].device)
    for key in SEQUENCE_KEYS:
        if key in batch:
            out[key] = batch[key].index_select(1, index)
    out["packed_seq_params"] = dataclasses.replace(params)
    return out
