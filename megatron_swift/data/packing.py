"""``--packing``: samples bin-packed into sequences of at most ``max_length`` tokens.

Best-fit decreasing over the encoded lengths: the longest sample first, each into the fullest pack
it still fits in (ties: the most recently touched pack). It is deterministic (the same lengths and
``max_length`` give the same packs on every rank and every run) and the result is cached as a
``.npz`` under ``--packing_cache`` (default ``$MODELSCOPE_CACHE/megatron_swift/packing``), keyed by
a hash of the lengths, so multi-node runs that share the cache directory pack once.

A pack is trained as one THD row (see ``batching.py``): its sequences keep their own boundaries,
positions and loss masks, so packing changes throughput, never the loss of a sample.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import os
from collections import defaultdict
from typing import List, Optional, Sequence

import numpy as np

logger = logging.getLogger(__name__)

_PACKING_VERSION = 1


def pack_lengths(lengths: Sequence[int], capacity: int) -> List[List[int]]:
    """Indices grouped into packs with ``sum(lengths) <= capacity`` (best-fit decreasing)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and int(lengths.max()) > capacity:
        raise ValueError(f"a sample of {int(lengths.max())} tokens does not fit a pack of {capacity}")
    order = np.argsort(-lengths, kind="stable")
    packs: List[List[int]] = []
    free = defaultdict(list)  # remaining capacity -> packs with exactly that much room
    keys: List[int] = []  # sorted remaining capacities that have packs
    for idx in order.tolist():
        n = int(lengths[idx])
        pos = bisect.bisect_left(keys, n)
        if pos < len(keys):
            room = keys[pos]
            b = free[room].pop()
            if not free[room]:
                keys.pop(pos)
        else:
            b, room = len(packs), capacity
            packs.append([])
        packs[b].append(idx)
        room -= n
        if room > 0:
            if not free[room]:
                bisect.insort(keys, room)
            free[room].append(b)
    return packs


def default_packing_cache() -> str:
    base = os.environ.get("MODELSCOPE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "modelscope")
    return os.path.join(base, "megatron_swift", "packing")


def cached_packs(lengths: Sequence[int], capacity: int, cache_dir: Optional[str] = None,
                 load_from_cache_file: bool = True) -> List[List[int]]:
    lengths = np.asarray(lengths, dtype=np.int64)
    key = hashlib.sha256(lengths.tobytes() + f"|{capacity}|v{_PACKING_VERSION}".encode()).hexdigest()[:24]
    cache_dir = cache_dir or default_packing_cache()
    path = os.path.join(cache_dir, f"packs-{key}.npz")
    if load_from_cache_file and os.path.isfile(path):
        with np.load(path) as data:
            flat, offsets = data["flat"], data["offsets"]
        logger.info("packing: loaded %d packs from %s", len(offsets) - 1, path)
        return [flat[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]
    packs = pack_lengths(lengths, capacity)
    try:
        os.makedirs(cache_dir, exist_ok=True)
        flat = np.asarray([i for p in packs for i in p], dtype=np.int64)
        offsets = np.cumsum([0] + [len(p) for p in packs]).astype(np.int64)
        tmp = f"{path}.{os.getpid()}.tmp.npz"
        np.savez(tmp, flat=flat, offsets=offsets)
        os.replace(tmp, path)
    except OSError as e:  # a read-only cache is not fatal
        logger.warning("packing: could not write the cache %s (%s)", path, e)
    return packs


class PackedDataset:
    """Map-style dataset whose items are packs (lists of encoded samples)."""

    def __init__(self, dataset, packs: List[List[int]], capacity: int):
        self.dataset = dataset
        self.packs = packs
        self.capacity = capacity

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, i: int) -> list:
        rows = self.dataset[self.packs[i]]  # one batched read
        return [{"input_ids": ids, "labels": lab} for ids, lab in zip(rows["input_ids"], rows["labels"])]

    def pack_lengths(self) -> np.ndarray:
        lengths = np.asarray(self.dataset["length"], dtype=np.int64)
        return np.asarray([lengths[p].sum() for p in self.packs], dtype=np.int64)


def pack_dataset(dataset, max_length: int, cache_dir: Optional[str] = None,
                 load_from_cache_file: bool = True) -> PackedDataset:
    """Packs an encoded dataset (with a ``length`` column) into sequences of <= ``max_length``."""
    lengths = np.asarray(dataset["length"], dtype=np.int64)
    packs = cached_packs(lengths, max_length, cache_dir, load_from_cache_file)
    fill = lengths.sum() / max(1, len(packs) * max_length)
    logger.info("packing: %d samples -> %d packs of <= %d tokens (%.1f%% full)", len(lengths), len(packs),
                max_length, 100 * fill)
    return PackedDataset(dataset, packs, max_length)
