"""Per-token and per-sequence log-probs, gradient-correct under tensor parallelism.

The per-token log-prob of a target is ``-CE`` from megatron-core's ``vocab_parallel_cross_entropy``,
a custom autograd function whose backward is exact on each vocabulary shard (a log-softmax built
from plain ``all_reduce`` calls loses the ``-softmax`` term on the ranks that do not own the target:
the ms-swift GRPO/GKD bug). Logits are cast to fp32 first (bf16 logits give log-prob errors ~1e-2),
and the rows of the padded vocabulary (``padded_vocab_size`` > the tokenizer's) are masked out so the
log-probs are those of the Hugging Face model. Sequence sums: ``[rows, seq]`` sums for padded micro
batches, a vectorised segment sum over ``cu_seqlens`` for THD rows (the trailing padding segment is
left out by counting sequences).
"""

from __future__ import annotations

from typing import Optional

import torch

IGNORE_INDEX = -100


def token_logps(logits: torch.Tensor, labels: torch.Tensor, vocab_size: Optional[int] = None) -> torch.Tensor:
    """``logits`` ``[b, s, V/tp]`` (this rank's vocabulary shard), ``labels`` ``[b, s]`` (shifted, -100 =
    none) -> ``[b, s]`` fp32 log-probs, 0 where the label is -100. ``vocab_size``: the real vocabulary;
    shard columns at or beyond it are excluded from the softmax."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    # megatron's CE takes [s, b, V/tp] contiguous and subtracts the max in place: nothing reads the
    # logits after this (the policy's graph does not need its output_layer's output for backward)
    logits = logits.transpose(0, 1).float().contiguous()  # megatron's CE computes in fp32 whatever it gets
    if vocab_size is not None:  # the model's output-layer hook (model/padded_vocab.py) does it too; this
        # keeps token_logps right for any logits given to it
        shard = logits.shape[-1]
        start = ps.get_tensor_model_parallel_rank() * shard
        if start + shard > vocab_size:
            ids = torch.arange(start, start + shard, device=logits.device)
            logits = logits.masked_fill(ids >= vocab_size, float("-inf"))
    mask = labels.ne(IGNORE_INDEX)
    ce = vocab_parallel_cross_entropy(logits, labels.clamp(min=0).transpose(0, 1).contiguous()).transpose(0, 1)
    return -ce * mask


def sequence_sums(values: torch.Tensor, batch: dict, num_sequences: int) -> torch.Tensor:
    """``[b, s]`` per-token values -> ``[num_sequences]`` sums per sequence, in collation order: the
    rows of a padded micro batch, the ``cu_seqlens`` segments of a THD row (padding segment dropped)."""
    params = batch.get("packed_seq_params")
    if params is None:
        return values.sum(-1)[:num_sequences]
    cu = params.cu_seqlens_q.to(device=values.device, dtype=torch.long)
    positions = torch.arange(values.shape[-1], device=values.device)
    segment = torch.searchsorted(cu[1:], positions, right=True)  # the segment each position belongs to
    sums = torch.zeros(cu.numel() - 1, dtype=values.dtype, device=values.device)
    sums = sums.index_add(0, segment, values.reshape(-1))
    return sums[:num_sequences]


def token_entropy(logits: torch.Tensor, vocab_size: Optional[int] = None) -> torch.Tensor:
    """``[b, s, V/tp]`` logits (this rank's vocabulary shard) -> ``[b, s]`` fp32 entropy of the full
    softmax, without gradient: ``logsumexp(z) - Σ softmax(z) z`` from three all-reduces over the
    tensor-parallel group (max, Σ e^z, Σ e^z z). Padded vocabulary columns are left out."""
    from megatron.core import parallel_state as ps

    with torch.no_grad():
        z = logits.detach().float()
        shard = z.shape[-1]
        start = ps.get_tensor_model_parallel_rank() * shard
        if vocab_size is not None and start + shard > vocab_size:
            ids = torch.arange(start, start + shard, device=z.device)
            z = z.masked_fill(ids >= vocab_size, float("-inf"))
        group = ps.get_tensor_model_parallel_group()
        top = z.max(-1, keepdim=True).values
        if ps.get_tensor_model_parallel_world_size() > 1:
            torch.distributed.all_reduce(top, op=torch.distributed.ReduceOp.MAX, group=group)
        e = torch.exp(z - top)
        weighted = torch.where(torch.isinf(z), torch.zeros_like(z), e * (z - top))
        sums = torch.stack([e.sum(-1), weighted.sum(-1)])
        if ps.get_tensor_model_parallel_world_size() > 1:
            torch.distributed.all_reduce(sums, group=group)
        return torch.log(sums[0]) - sums[1] / sums[0]
