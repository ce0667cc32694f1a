"""LoRA vs full fine-tuning through `megatron sft` on the same model and data (CPU by default).

Measures, per mode: tokens/s (median over the steps after the first two), peak resident memory
(the trainer's ``memory_gib``), the bytes of trainable parameters, gradient buffers and Adam state
(fp32: main grad 4 B + exp_avg 4 B + exp_avg_sq 4 B per trainable element; the same numbers the
trainer's megatron DDP / optimizer allocate), and the size of the saved checkpoint (LoRA: adapter +
its optimizer state only). Prints a markdown table (docs/benchmarks.md).

    python scripts/bench_lora.py --out /tmp/bench_lora [--hidden 512 --layers 4 --iters 12]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def run(mode: str, model: str, data: str, out: str, iters: int, rank: int) -> dict:
    save = os.path.join(out, mode)
    cmd = [sys.executable, "-m", "megatron_swift.cli.main", "sft", "--model", model, "--dataset", data,
           "--micro_batch_size", "4", "--global_batch_size", "8", "--train_iters", str(iters), "--log_interval", "1",
           "--save", save, "--add_version", "false", "--overwrite_output_dir", "true", "--split_dataset_ratio", "0",
           "--max_length", "256", "--lr", "1e-4"]
    if mode == "lora":
        cmd += ["--train_type", "lora", "--lora_rank", str(rank)]
    env = dict(os.environ, MEGATRON_SWIFT_DEVICE=os.environ.get("MEGATRON_SWIFT_DEVICE", "cpu"))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    with open(os.path.join(save, "logging.jsonl")) as f:
        rows = [json.loads(line) for line in f if '"loss"' in line]
    trainable = total = None
    for line in proc.stderr.splitlines() + proc.stdout.splitlines():
        if "trainable parameter elements" in line:
            words = line.split()
            trainable = int(words[words.index("trainable") - 1])
            total = trainable + int(words[words.index("frozen") - 1])
    ckpt = max((d for d in os.listdir(save) if d.startswith("iter_")), default=None)
    return {
        "tokens_per_sec": statistics.median(r["tokens_per_sec"] for r in rows[2:]),
        "step_seconds": statistics.median(r["step_seconds"] for r in rows[2:]),
        "memory_gib": max(r.get("memory_gib", 0) for r in rows),
        "trainable": trainable, "total": total,
        "checkpoint_bytes": _dir_bytes(os.path.join(save, ckpt)) if ckpt else 0,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--rank", type=int, default=8)
    a = p.parse_args()
    from megatron_swift.demo import demo_rows, prepare_model, write_jsonl

    model = prepare_model(os.path.join(a.out, "model"), "qwen3", hidden_size=a.hidden, intermediate_size=3 * a.hidden,
                          num_hidden_layers=a.layers, num_attention_heads=8, num_key_value_heads=4,
                          head_dim=a.hidden // 8)
    data = write_jsonl(os.path.join(a.out, "chat.jsonl"), demo_rows() * 2)
    results = {mode: run(mode, model, data, a.out, a.iters, a.rank) for mode in ("full", "lora")}
    full = results["full"]
    total = results["lora"]["total"]
    full["trainable"] = full["trainable"] or total
    print(f"model: qwen3 hidden {a.hidden}, {a.layers} layers, {total / 1e6:.2f} M parameters; LoRA rank {a.rank} "
          f"on all linears; {a.iters} steps of 8 sequences, fp32, CPU")
    print("| mode | trainable params | grad + Adam state (fp32) | tokens/s | step s | peak RSS GiB | checkpoint |")
    print("|---|---|---|---|---|---|---|")
    for mode, r in results.items():
        trainable = r["trainable"] if mode == "lora" else total
        state = trainable * 12
        print(f"| {mode} | {trainable:,} ({100 * trainable / total:.2f}%) | {state / 2**20:.1f} MiB "
              f"({100 * state / (total * 12):.2f}% of full) | {r['tokens_per_sec']:.0f} | {r['step_seconds']:.3f} | "
              f"{r['memory_gib']:.2f} | {r['checkpoint_bytes'] / 2**20:.1f} MiB |")


if __name__ == "__main__":
    main()
