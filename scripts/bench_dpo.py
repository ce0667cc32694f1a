"""DPO step time vs SFT step time on the same pairs and layout (``megatron rlhf`` vs ``megatron sft``).

SFT trains on the chosen and the rejected answers as separate rows (the same sequences the DPO
policy runs forward/backward over); DPO adds the reference model's forward-only pass. Both run
through the CLI with the same model, layout, micro/global batch and padding-free batches; the
reported time is the median ``step_seconds`` of logging.jsonl without the first 2 (warm-up) steps and
the last. Unshuffled data, so both runs see the same sequences in the same micro batches.

    python scripts/bench_dpo.py --out /tmp/bench_dpo [--nproc 2 --extra "--tensor_model_parallel_size 2"]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shlex
import statistics
import subprocess
import sys


def pair_rows(n: int, seed: int = 0, max_words: int = 120) -> list:
    from megatron_swift.demo import _WORDS

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        def answer():
            return " ".join(rng.choice(_WORDS) for _ in range(max(2, min(max_words, int(rng.lognormvariate(3.5, 0.7))))))
        rows.append({"messages": [{"role": "user", "content": f"question {i}: tell me about {rng.choice(_WORDS)}"},
                                  {"role": "assistant", "content": answer()}], "rejected_response": answer()})
    return rows


def run(kind: str, model: str, data: str, save: str, args) -> tuple:
    cmd = [sys.executable, "-m", "megatron_swift.cli.main", kind, "--model", model, "--dataset", data,
           "--micro_batch_size", str(args.micro_batch_size), "--global_batch_size", str(args.global_batch_size),
           "--train_iters", str(args.iters), "--lr", "1e-4", "--log_interval", "1", "--save", save,
           "--add_version", "false", "--split_dataset_ratio", "0", "--max_length", "512", "--save_interval", "100000",
           "--padding_free", "true", "--dataset_shuffle", "false", *shlex.split(args.extra)]
    if kind == "rlhf":
        cmd += ["--rlhf_type", "dpo"]
    env = dict(os.environ, MEGATRON_SWIFT_DEVICE=os.environ.get("MEGATRON_SWIFT_DEVICE", "cpu"))
    if args.nproc > 1:
        env["NPROC_PER_NODE"] = str(args.nproc)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-4000:])
    with open(os.path.join(save, "logging.jsonl")) as f:
        recs = [json.loads(line) for line in f if '"step_seconds"' in line]
    steps = [r["step_seconds"] for r in recs[2:-1]]  # warm-up steps and the last (final save) left out
    mem = re.search(r"reference model from .*?: ([0-9.]+) MiB", proc.stdout + proc.stderr)
    return statistics.median(steps), recs[-1].get("num_tokens"), float(mem.group(1)) if mem else None


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="/tmp/bench_dpo")
    p.add_argument("--pairs", type=int, default=64)
    p.add_argument("--iters", type=int, default=12)
    p.add_argument("--micro_batch_size", type=int, default=2)
    p.add_argument("--global_batch_size", type=int, default=8)
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--extra", default="", help="more CLI arguments for both runs (a layout)")
    args = p.parse_args()
    from megatron_swift.demo import prepare_model, write_jsonl

    os.makedirs(args.out, exist_ok=True)
    model = prepare_model(os.path.join(args.out, "model"), "qwen3")
    rows = pair_rows(args.pairs)
    dpo_data = write_jsonl(os.path.join(args.out, "pairs.jsonl"), rows)
    sft_rows = []
    for r in rows:  # the same sequences: chosen and rejected as SFT rows, one pair per 2 rows
        sft_rows.append({"messages": r["messages"]})
        sft_rows.append({"messages": r["messages"][:-1] + [{"role": "assistant", "content": r["rejected_response"]}]})
    sft_data = write_jsonl(os.path.join(args.out, "sft.jsonl"), sft_rows)
    sft_args = argparse.Namespace(**{**vars(args), "micro_batch_size": 2 * args.micro_batch_size,
                                     "global_batch_size": 2 * args.global_batch_size})
    sft_time, sft_tokens, _ = run("sft", model, sft_data, os.path.join(args.out, "sft"), sft_args)
    dpo_time, dpo_tokens, ref_mib = run("rlhf", model, dpo_data, os.path.join(args.out, "dpo"), args)
    print(json.dumps({"sft_step_seconds": sft_time, "dpo_step_seconds": dpo_time, "ratio": dpo_time / sft_time,
                      "tokens_per_step": [sft_tokens, dpo_tokens], "reference_weights_mib_per_rank": ref_mib,
                      "layout": args.extra or "TP1", "nproc": args.nproc}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
