#!/usr/bin/env python
"""Data pipeline benchmark: preprocessing throughput and padding overhead per batch layout.

    python scripts/bench_data.py --rows 100000 --num_proc 1 2 --out /tmp/bench_data

1. Writes a synthetic chat jsonl (1-3 turns, optional system, long-tailed response lengths:
   lognormal word counts, capped) and a tiny byte-level BPE tokenizer (``make_tiny_tokenizer``,
   qwen2_5 template; a real 150k-vocab tokenizer is slower per token, so treat the numbers as the
   pipeline's overhead plus a cheap tokenizer).
2. Preprocessing throughput (samples/s) = rows / wall time of load + normalize + encode with the
   datasets cache off, for each ``--num_proc``.
3. Padding: the encoded lengths are cut into micro batches in a shuffled order (as training reads
   them) and the script reports, per layout, the fraction of computed tokens that are padding and
   the fraction of attention work (sum of squared sequence lengths) spent on padding:
   padded ``[mbs, longest]`` batches, padding-free THD rows, packed THD rows (variable length), and
   packed rows at a fixed length (what pipeline parallelism needs).
Prints a markdown table (the one in docs/data.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time

import numpy as np


def write_synthetic(path: str, rows: int, seed: int = 0) -> None:
    from megatron_swift.template.tiny_tokenizer import _CHINESE, _WORDS

    rng = random.Random(seed)

    def text(n):
        return " ".join(rng.choice(_WORDS) if rng.random() < 0.95 else rng.choice(_CHINESE) for _ in range(n))

    with open(path, "w", encoding="utf-8") as f:
        for _ in range(rows):
            msgs = []
            if rng.random() < 0.3:
                msgs.append({"role": "system", "content": text(rng.randint(3, 15))})
            for _ in range(rng.choice([1, 1, 1, 2, 3])):
                msgs.append({"role": "user", "content": text(min(int(rng.lognormvariate(3.0, 0.8)), 600) + 1)})
                msgs.append({"role": "assistant", "content": text(min(int(rng.lognormvariate(4.0, 1.1)), 3000) + 1)})
            f.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")


def preprocess(path, tokenizer, num_proc: int, max_length: int, cache_dir: str):
    from megatron_swift.data import DataOptions, encode_dataset, load_datasets
    from megatron_swift.template import get_template

    template = get_template(tokenizer, "qwen2_5", max_length=max_length, truncation_strategy="delete")
    opts = DataOptions(dataset=[path], dataset_num_proc=num_proc, load_from_cache_file=False, dataset_shuffle=True)
    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    loaded = load_datasets(opts, cache_dir=cache_dir)
    t1 = time.perf_counter()
    enc = encode_dataset(loaded.train, template, num_proc=num_proc, load_from_cache_file=False)
    t2 = time.perf_counter()
    return enc, t1 - t0, t2 - t1, _cpu_seconds() - cpu0


def _cpu_seconds() -> float:
    """CPU time of this process and its (finished) worker processes."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def padding_table(lengths: np.ndarray, mbs: int, max_length: int, seed: int = 0) -> list:
    from megatron_swift.data import pack_lengths

    rng = np.random.RandomState(seed)
    order = rng.permutation(len(lengths))
    n_micro = len(order) // mbs
    batches = [lengths[order[i * mbs:(i + 1) * mbs]] for i in range(n_micro)]
    real_tokens = float(sum(b.sum() for b in batches))
    real_attn = float(sum((b.astype(np.float64) ** 2).sum() for b in batches))
    rows = []
    # padded: every row as long as the longest of its micro batch
    pad_tokens = float(sum(mbs * b.max() for b in batches))
    pad_attn = float(sum(mbs * float(b.max()) ** 2 for b in batches))
    rows.append(("padded [mbs, longest]", n_micro, pad_tokens / n_micro, 1 - real_tokens / pad_tokens,
                 1 - real_attn / pad_attn))
    rows.append(("padding-free (THD)", n_micro, real_tokens / n_micro, 0.0, 0.0))
    t0 = time.perf_counter()
    packs = pack_lengths(lengths, max_length)
    pack_time = time.perf_counter() - t0
    pack_len = np.asarray([lengths[p].sum() for p in packs], dtype=np.float64)
    n_pack_micro = len(packs) // mbs
    used = pack_len[rng.permutation(len(packs))[:n_pack_micro * mbs]]
    all_tokens = float(lengths.sum())
    rows.append((f"packed to {max_length} (THD)", n_pack_micro, used.sum() / max(1, n_pack_micro), 0.0, 0.0))
    fixed_tokens = len(packs) * float(max_length)
    fixed_attn_real = float((lengths.astype(np.float64) ** 2).sum())
    # a fixed-length THD row: the padding segment only attends to itself (pad^2)
    fixed_attn = fixed_attn_real + float(((max_length - pack_len) ** 2).sum())
    rows.append((f"packed, fixed {max_length} (PP)", n_pack_micro, mbs * float(max_length),
                 1 - all_tokens / fixed_tokens, 1 - fixed_attn_real / fixed_attn))
    return rows, len(packs), pack_time


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--num_proc", type=int, nargs="+", default=[1, 2])
    p.add_argument("--micro_batch_size", type=int, default=8)
    p.add_argument("--max_length", type=int, default=4096)
    p.add_argument("--out", default="/tmp/bench_data")
    args = p.parse_args()

    import datasets
    import tokenizers
    import torch
    import transformers

    from megatron_swift.data import make_tiny_tokenizer

    datasets.disable_progress_bars()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"chat_{args.rows}.jsonl")
    if not os.path.exists(path):
        write_synthetic(path, args.rows)
    tokenizer = make_tiny_tokenizer(os.path.join(args.out, "tokenizer"), "qwen2_5")

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible; python "
          f"{sys.version.split()[0]}; torch {torch.__version__}; datasets {datasets.__version__}; "
          f"transformers {transformers.__version__}; tokenizers {tokenizers.__version__}")
    print(f"command: python scripts/bench_data.py --rows {args.rows} --num_proc {' '.join(map(str, args.num_proc))} "
          f"--micro_batch_size {args.micro_batch_size} --max_length {args.max_length}\n")
    print(f"load average before: {os.getloadavg()[0]:.1f} (other jobs share these CPUs)\n")
    print("| processes | rows | kept | load+normalize (s) | encode (s) | total wall (s) | samples/s (wall) "
          "| CPU s | samples per CPU-second |")
    print("|---|---|---|---|---|---|---|---|---|")
    enc = None
    for n in args.num_proc:
        enc, t_load, t_enc, cpu = preprocess(path, tokenizer, n, args.max_length, os.path.join(args.out, f"cache{n}"))
        total = t_load + t_enc
        print(f"| {n} | {args.rows} | {len(enc)} | {t_load:.1f} | {t_enc:.1f} | {total:.1f} | {args.rows / total:,.0f} "
              f"| {cpu:.1f} | {args.rows / cpu:,.0f} |", flush=True)
    print(f"\nload average after: {os.getloadavg()[0]:.1f}")

    lengths = np.asarray(enc["length"], dtype=np.int64)
    q = np.percentile(lengths, [50, 90, 99])
    print(f"\nencoded lengths: mean {lengths.mean():.0f}, p50 {q[0]:.0f}, p90 {q[1]:.0f}, p99 {q[2]:.0f}, "
          f"max {lengths.max()} tokens ({len(lengths)} samples)\n")
    rows, n_packs, pack_time = padding_table(lengths, args.micro_batch_size, args.max_length)
    print(f"| layout (micro_batch_size {args.micro_batch_size}) | micro batches / epoch | tokens / micro batch | "
          f"padding (% of tokens) | padding (% of attention work) |")
    print("|---|---|---|---|---|")
    for name, n_micro, per_micro, pad_tok, pad_attn in rows:
        print(f"| {name} | {n_micro:,} | {per_micro:,.0f} | {100 * pad_tok:.1f} | {100 * pad_attn:.1f} |")
    print(f"\npacking: {len(lengths)} samples -> {n_packs} packs of <= {args.max_length} in {pack_time:.2f} s")


if __name__ == "__main__":
    main()
