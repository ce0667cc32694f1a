"""Micro-batch iterators for one data-parallel rank.

Megatron's convention (``MegatronPretrainingSampler``): the sample stream is cut into steps of
``micro_batch_size x dp_size`` samples; data-parallel rank ``r`` takes the ``r``-th slice of
``micro_batch_size`` samples of each step. A global batch is ``num_microbatches`` such steps
(``global_batch_size = micro_batch_size x dp_size x num_microbatches``), so the trainer calls
``next()`` ``num_microbatches`` times per iteration (megatron's schedule does it through
``forward_step``). Every rank of a tensor/pipeline/context-parallel group with the same DP rank
computes the same indices, so they see identical batches without a broadcast.

Map-style datasets are read in a seeded permutation per epoch (``shuffle``) or in order; the
iterator is cyclic for training (epoch after epoch; ``consumed_samples`` resumes mid-epoch) and
single-pass for evaluation. Each epoch drops its last partial step (``< micro_batch_size x dp_size``
samples). Streaming datasets are read sequentially by every rank, which keeps its own slices.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, List, Optional

import numpy as np


class MicroBatchSampler:
    """Index lists (``micro_batch_size`` each) for ``dp_rank``."""

    def __init__(self, num_samples: int, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 shuffle: bool = True, seed: int = 42, consumed_samples: int = 0, cyclic: bool = True):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} not in [0, {dp_size})")
        self.num_samples = num_samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.shuffle, self.seed = shuffle, seed
        self.consumed_samples = consumed_samples
        self.cyclic = cyclic
        self.step = micro_batch_size * dp_size
        self.usable = (num_samples // self.step) * self.step
        if self.usable == 0:
            raise ValueError(f"{num_samples} samples cannot fill one step of micro_batch_size x DP = "
                             f"{micro_batch_size} x {dp_size}")

    @property
    def steps_per_epoch(self) -> int:
        return self.usable // self.step

    def order(self, epoch: int) -> np.ndarray:
        if self.shuffle:
            return np.random.RandomState((self.seed + epoch) % 2**32).permutation(self.num_samples)
        return np.arange(self.num_samples)

    def __iter__(self) -> Iterator[List[int]]:
        epoch, offset = divmod(self.consumed_samples, self.usable)
        offset -= offset % self.step
        while True:
            order = self.order(epoch)
            lo = self.dp_rank * self.micro_batch_size
            for start in range(offset, self.usable, self.step):
                yield order[start + lo:start + lo + self.micro_batch_size].tolist()
            if not self.cyclic:
                return
            epoch, offset = epoch + 1, 0


def _fetch(dataset, indices: List[int]) -> list:
    from .packing import PackedDataset

    if isinstance(dataset, PackedDataset) or not hasattr(dataset, "column_names"):
        return [dataset[i] for i in indices]
    cols = dataset[indices]  # one batched Arrow read
    keys = [k for k in cols if k in ("input_ids", "labels", "chosen_input_ids", "chosen_labels",
                                     "rejected_input_ids", "rejected_labels", "label", "margin")]
    return [{k: cols[k][j] for k in keys} for j in range(len(indices))]


def micro_batches(dataset, collator: Callable, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1, *,
                  shuffle: bool = True, seed: int = 42, consumed_samples: int = 0,
                  cyclic: bool = True) -> Iterator[dict]:
    """Micro-batch dicts of a map-style dataset (encoded, or a PackedDataset) for ``dp_rank``."""
    sampler = MicroBatchSampler(len(dataset), micro_batch_size, dp_rank, dp_size, shuffle=shuffle, seed=seed,
                                consumed_samples=consumed_samples, cyclic=cyclic)
    for indices in sampler:
        yield collator(_fetch(dataset, indices))


def streaming_micro_batches(dataset, collator: Callable, micro_batch_size: int, dp_rank: int = 0,
                            dp_size: int = 1, *, cyclic: bool = True, consumed_samples: int = 0,
                            max_epochs: Optional[int] = None) -> Iterator[dict]:
    """Micro batches of an IterableDataset: every rank reads the stream, keeps its slices. An epoch
    is one pass over the stream; with ``max_epochs`` the iterator ends after that many passes (the
    samples of a last, incomplete step are dropped)."""
    step = micro_batch_size * dp_size
    skip = consumed_samples - consumed_samples % step
    epoch = 0
    while True:
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        buf: List[Any] = []
        seen = 0
        for sample in dataset:
            seen += 1
            if seen <= skip:
                continue
            buf.append(sample)
            if len(buf) == step:
                mine = buf[dp_rank * micro_batch_size:(dp_rank + 1) * micro_batch_size]
                yield collator([{k: v for k, v in s.items() if k != "length"} for s in mine])
                buf = []
        skip = max(0, skip - seen)
        if seen == 0 or not cyclic or (max_epochs is not None and epoch + 1 >= max_epochs):
            return
        epoch += 1


def train_iters_for_epochs(num_samples: int, global_batch_size: int, max_epochs: int, micro_batch_size: int = 1,
                           dp_size: int = 1) -> int:
    """``--max_epochs`` -> iterations: the samples the sampler yields per epoch (whole steps of
    micro_batch_size x DP) times the epochs, in whole global batches (at least 1)."""
    step = micro_batch_size * dp_size
    per_epoch = (num_samples // step) * step
    return max(1, (per_epoch * max_epochs) // global_batch_size)
