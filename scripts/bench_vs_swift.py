"""CPU benchmark: `megatron sft` against stock ms-swift `swift sft`, side by side in one run.

The tool a user would otherwise pick is ms-swift's own `swift sft` (transformers' Trainer, padded
batches), installed from PyPI into its own virtual environment (it pins transformers < 5.20, so it
cannot share ours). Both tools get the same HF directory (same initial weights), the same jsonl
file read in file order (`--dataset_shuffle false --train_dataloader_shuffle false` on the swift
side, `--dataset_shuffle false` here), and the same hyper-parameters: AdamW (betas 0.9/0.999, eps
1e-8, no weight decay), constant lr (no warm-up: the two schedulers count warm-up steps
differently), gradient clipping 1.0, fp32, sdpa attention, global batch = micro batch (no
accumulation), loss averaged over the batch's trained tokens. The step-by-step losses must then
agree to ~1e-5 relative; real (non-padding) tokens/s of the steady steps is compared. swift runs
twice: with its defaults (gradient checkpointing on, what a user gets) and with
`--gradient_checkpointing false` (the faster setting a user with memory to spare picks); both
ratios are reported. The four runs are repeated in interleaved rounds (`--repeats`, default 3) and each tool's median round is reported
with the range: on a shared (virtual) machine the speed of the same run drifts by 20-40% between runs.

    .venv/bin/python scripts/bench_vs_swift.py --out output/bench_vs_swift

Writes OUT/results.json and prints a markdown table (copied into docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWIFT_VERSION = "4.6.0"
STEADY_FROM = 3  # steps before it include start-up work (allocator growth, first-call caches)


def ensure_swift(venv: str) -> str:
    """``swift`` from a venv of its own; installs ms-swift (CPU torch first) when absent."""
    swift = os.path.join(venv, "bin", "swift")
    if os.path.exists(swift):
        return swift
    py = os.path.join(venv, "bin", "python")
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    for spec in (["--upgrade", "pip"], ["torch==2.13.0"], [f"ms-swift=={SWIFT_VERSION}", "torch==2.13.0"]):
        subprocess.run([py, "-m", "pip", "install", "-q", *spec], check=True)
    return swift


def make_inputs(out: str, rows: int) -> dict:
    from megatron_swift.demo import long_tailed_rows, prepare_model, write_jsonl

    model = prepare_model(os.path.join(out, "tiny-qwen3"), "qwen3", hidden_size=256, intermediate_size=768,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    data = write_jsonl(os.path.join(out, "chat.jsonl"), long_tailed_rows(rows, seed=0))
    return {"model": model, "dataset": data}


NO_GC = "swift sft (1 process, padded, --gradient_checkpointing false)"
ONE_PROCESS = "megatron sft (1 process, padding-free)"


def run_megatron(inputs, out, args, nproc: int) -> dict:
    save = os.path.join(out, f"megatron_np{nproc}")
    shutil.rmtree(save, ignore_errors=True)
    cmd = [sys.executable, "-m", "megatron_swift.cli.main", "sft", "--model", inputs["model"],
           "--template", "qwen3", "--dataset", inputs["dataset"], "--dataset_shuffle", "false", "--split_dataset_ratio", "0",
           "--max_length", str(args.max_length), "--padding_free", "true",
           "--micro_batch_size", str(args.batch), "--global_batch_size", str(args.batch),
           "--train_iters", str(args.steps), "--lr", str(args.lr), "--lr_decay_style", "constant",
           "--lr_warmup_iters", "0", "--weight_decay", "0", "--adam_beta1", "0.9", "--adam_beta2", "0.999",
           "--adam_eps", "1e-8", "--clip_grad", "1.0", "--log_interval", "1", "--save", save,
           "--add_version", "false", "--save_interval", str(10 ** 6), "--no_save_optim", "true",
           "--no_save_rng", "true", "--tensor_model_parallel_size", str(nproc),
           "--sequence_parallel", str(nproc > 1 and args.sequence_parallel).lower()]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=str(max(1, args.cores // nproc)))
    if nproc > 1:
        env["NPROC_PER_NODE"] = str(nproc)
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"megatron sft failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in open(os.path.join(save, "logging.jsonl")) if '"loss"' in line]
    steady = [r for r in rows if r["iteration"] >= STEADY_FROM]
    return {"losses": [r["loss"] for r in rows], "grad_norms": [r.get("grad_norm") for r in rows],
            "tokens": [r["num_tokens"] for r in rows], "loss_tokens": [r["loss_tokens"] for r in rows],
            "steady_seconds": sum(r["step_seconds"] for r in steady), "wall_s": time.time() - t0}


def run_swift(swift: str, inputs, out, args, gradient_checkpointing: bool = True) -> dict:
    """``swift sft`` as a user runs it: its defaults, which include gradient checkpointing (every
    layer's forward runs again in backward); ``gradient_checkpointing=False`` is the faster setting
    a user can choose on a machine with memory to spare."""
    save = os.path.join(out, "swift" if gradient_checkpointing else "swift_no_gc")
    shutil.rmtree(save, ignore_errors=True)
    cmd = [swift, "sft", "--model", inputs["model"], "--model_type", "qwen3", "--template", "qwen3", "--use_hf", "true", "--dataset", inputs["dataset"],
           "--tuner_type", "full", "--torch_dtype", "float32", "--attn_impl", "sdpa",
           "--split_dataset_ratio", "0", "--dataset_shuffle", "false", "--train_dataloader_shuffle", "false",
           "--max_length", str(args.max_length), "--per_device_train_batch_size", str(args.batch),
           "--gradient_accumulation_steps", "1", "--max_steps", str(args.steps), "--learning_rate", str(args.lr),
           "--lr_scheduler_type", "constant", "--warmup_ratio", "0", "--weight_decay", "0",
           "--adam_beta1", "0.9", "--adam_beta2", "0.999", "--adam_epsilon", "1e-8", "--max_grad_norm", "1.0",
           "--logging_steps", "1", "--save_strategy", "no", "--eval_strategy", "no", "--report_to", "none",
           "--dataloader_num_workers", "0", "--seed", "42", "--output_dir", save, "--add_version", "false"]
    if not gradient_checkpointing:
        cmd += ["--gradient_checkpointing", "false"]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=str(args.cores), CUDA_VISIBLE_DEVICES="",
               USE_HF="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, cwd=out, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"swift sft failed:\n{proc.stderr[-4000:]}")
    path = next(os.path.join(d, "logging.jsonl") for d, _, files in os.walk(save) if "logging.jsonl" in files)
    rows = [json.loads(line) for line in open(path) if '"loss"' in line and '"global_step/max_steps"' in line]
    # "train_speed(s/it)" is the mean step time since the start, so speed(n) * n is the time to step n
    done = {int(r["global_step/max_steps"].split("/")[0]): r["train_speed(s/it)"] for r in rows}
    return {"losses": [r["loss"] for r in rows], "grad_norms": [r.get("grad_norm") for r in rows],
            "steady_seconds": done[args.steps] * args.steps - done[STEADY_FROM - 1] * (STEADY_FROM - 1),
            "wall_s": time.time() - t0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="output/bench_vs_swift")
    parser.add_argument("--swift_venv", default=None, help="default: OUT/swift-venv (created when absent)")
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--max_length", type=int, default=1024)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds of the three runs")
    parser.add_argument("--sequence_parallel", action="store_true",
                        help="TP=2 run with sequence parallelism (off by default, as in megatron and ms-swift: "
                             "over gloo it doubles the collectives a step)")
    args = parser.parse_args()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    swift = ensure_swift(os.path.abspath(args.swift_venv or os.path.join(out, "swift-venv")))
    inputs = make_inputs(out, args.rows)
    runs = {"swift sft (1 process, padded)": lambda: run_swift(swift, inputs, out, args),
            NO_GC: lambda: run_swift(swift, inputs, out, args, gradient_checkpointing=False),
            ONE_PROCESS: lambda: run_megatron(inputs, out, args, 1),
            f"megatron sft (2 processes TP=2{' + SP' * args.sequence_parallel}, padding-free)":
                lambda: run_megatron(inputs, out, args, 2)}
    rounds = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            rounds[name].append(run())
    results = {}
    for name, done in rounds.items():  # the median round's record, with every round's time in run order
        median = sorted(done, key=lambda r: r["steady_seconds"])[len(done) // 2]
        results[name] = dict(median, steady_seconds_rounds=[r["steady_seconds"] for r in done])
    return report(results, args, out)


def report(results, args, out) -> int:
    import megatron.core
    import torch

    names = list(results)
    ours = results[ONE_PROCESS]
    # same rows in the same order and the same encodings: every tool's step n holds these tokens
    steady_tokens = sum(ours["tokens"][STEADY_FROM - 1:])
    ref, no_gc = results[names[0]], results[NO_GC]
    lines = [f"| run | real tokens/s (steps {STEADY_FROM}-{args.steps}), median round | each round | vs swift sft "
             "(median of the rounds' ratios) | vs swift sft without gradient checkpointing | wall incl. start-up (s) "
             "| max rel. loss diff vs swift sft | max rel. grad-norm diff |", "|---|---|---|---|---|---|---|---|"]

    def ratio(base, r):  # a round's runs follow each other: its ratio is the least affected by drift
        ratios = sorted(b / o for b, o in zip(base["steady_seconds_rounds"], r["steady_seconds_rounds"]))
        return ratios[len(ratios) // 2]

    for name, r in results.items():
        tps = steady_tokens / r["steady_seconds"]
        loss = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], ref["losses"]))
        grad = max(abs(a - b) / abs(b) for a, b in zip(r["grad_norms"], ref["grad_norms"]))
        each = [steady_tokens / seconds for seconds in r["steady_seconds_rounds"]]
        lines.append(f"| {name} | {tps:.0f} | {', '.join(f'{x:.0f}' for x in each)} | {ratio(ref, r):.2f}x "
                     f"| {ratio(no_gc, r):.2f}x | {r['wall_s']:.0f} | {loss:.1e} | {grad:.1e} |")
    header = (f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}, "
              f"megatron-core {megatron.core.__version__}, ms-swift {SWIFT_VERSION}; {args.rows} rows, {args.steps} steps, "
              f"batch {args.batch}, lr {args.lr} constant; {sum(ours['tokens'])} real tokens, "
              f"{sum(ours['loss_tokens'])} trained.")
    steps = ["| step | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for i in range(args.steps):
        steps.append(f"| {i + 1} | " + " | ".join(f"{r['losses'][i]:.6f}" for r in results.values()) + " |")
    print(header + "\n\n" + "\n".join(lines) + "\n\n" + "\n".join(steps))
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    raise SystemExit(main())
