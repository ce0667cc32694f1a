"""Every parallel layout through `megatron sft`, on long-tailed chat data, against one process.

For a tiny dense Qwen3 and a tiny Qwen3-MoE (8 experts, top 2, load-balancing loss on), each
2-process layout trains 3 optimizer steps with padded, padding-free and packed batches, and its
per-step loss, gradient norm and (MoE) load-balancing loss are compared with a 1-process run of the
same command (and the parameter norm after each step). The data has log-normal answer lengths, so every micro batch and every data-parallel
rank holds a different number of tokens.

    .venv/bin/python scripts/layout_matrix.py --out output/layout_matrix            # the full matrix
    .venv/bin/python scripts/layout_matrix.py --out output/layout_matrix --subset ci

Prints a markdown table (kept in docs/layouts.md). tests/test_layout_matrix.py runs the `ci` subset.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 1e-5  # relative, per step: fp32, only the order of reductions differs between layouts

MODELS = {"dense": "qwen3", "moe": "qwen3_moe"}
BATCHES = {
    "padded": ["--padding_free", "false"],
    "padding_free": ["--padding_free", "true"],
    "packed": ["--packing", "true"],
}
COMMON = ["--global_batch_size", "8", "--lr", "1e-3", "--lr_warmup_iters", "1", "--max_length", "512",
          "--log_interval", "1", "--split_dataset_ratio", "0", "--add_version", "false", "--log_params_norm", "true"]
THREE_STEPS = ("--train_iters", "3", "--no_save_optim", "true", "--no_save_rng", "true")


@dataclasses.dataclass(frozen=True)
class Layout:
    name: str
    args: tuple
    models: tuple = ("dense", "moe")
    micro_batch_size: int = 2


TP2_SP = ("--tensor_model_parallel_size", "2", "--sequence_parallel", "true")
PP2 = ("--pipeline_model_parallel_size", "2")
LAYOUTS = [
    Layout("dp2", ()),
    # the GPU default for DP>1 with the distributed optimizer (bucketed reduce-scatter during backward,
    # all-gather during forward), forced on here because the CPU default is off
    Layout("dp2_overlap", ("--use_distributed_optimizer", "true", "--overlap_grad_reduce", "true",
                           "--overlap_param_gather", "true")),
    Layout("tp2_sp", TP2_SP),
    Layout("pp2_mbs1", PP2, micro_batch_size=1),
    Layout("pp2_mbs2", PP2),
    Layout("pp2_vpp2", PP2 + ("--virtual_pipeline_model_parallel_size", "2")),
    Layout("ep2_dp2", ("--expert_model_parallel_size", "2"), models=("moe",)),
    Layout("tp2_ep2_sp_etp1", TP2_SP + ("--expert_model_parallel_size", "2", "--expert_tensor_parallel_size", "1"),
           models=("moe",)),
]
BY_NAME = {layout.name: layout for layout in LAYOUTS}

# The CI subset: each crash this matrix was built for (EP across data-parallel ranks, PP with
# padding-free micro batch 2, TP+SP with the load-balancing loss) and each batch format once.
# one case per parallelism through the CLI (the full matrix: `--subset all`, table in docs/layouts.md)
CI_CASES = [
    ("moe", "padding_free", "tp2_sp"),
    ("moe", "padded", "tp2_ep2_sp_etp1"),
    ("moe", "padding_free", "pp2_mbs2"),
    ("dense", "packed", "pp2_vpp2"),
    ("dense", "padding_free", "dp2_overlap"),
]


def all_cases() -> list[tuple]:
    return [(model, batch, layout.name) for model in MODELS for batch in BATCHES for layout in LAYOUTS
            if model in layout.models]


def prepare(out: str) -> dict:
    """Tiny models and the long-tailed chat data (made once per output dir)."""
    from megatron_swift.demo import long_tailed_rows, prepare_model, write_jsonl

    paths = {"dataset": os.path.join(out, "chat.jsonl")}
    for kind, family in MODELS.items():
        paths[kind] = os.path.join(out, f"tiny-{kind}")
        if not os.path.isfile(os.path.join(paths[kind], "config.json")):
            prepare_model(paths[kind], family)
    if not os.path.isfile(paths["dataset"]):
        write_jsonl(paths["dataset"], long_tailed_rows(400))
    return paths


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_sft(paths: dict, model: str, batch: str, nproc: int, micro_batch_size: int, layout_args, save: str) -> dict:
    """One `megatron sft` run; returns its logged steps and wall time."""
    cmd = [sys.executable, "-m", "megatron_swift.cli.main", "sft", "--model", paths[model], "--dataset",
           paths["dataset"], "--micro_batch_size", str(micro_batch_size), *COMMON, *BATCHES[batch],
           *layout_args, "--save", save]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONWARNINGS="ignore")
    if nproc > 1:
        env.update(NPROC_PER_NODE=str(nproc), MASTER_PORT=str(_free_port()))
    start = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    seconds = time.time() - start
    if proc.returncode != 0:
        raise RuntimeError(f"`megatron sft` failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    with open(os.path.join(save, "logging.jsonl")) as f:
        steps = [json.loads(line) for line in f if '"loss"' in line]
    return {"steps": steps, "seconds": seconds}


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def compare(reference: list, actual: list) -> dict:
    """Largest relative per-step difference of each logged quantity (loss, grad_norm, router loss)."""
    if [s["iteration"] for s in actual] != [s["iteration"] for s in reference]:
        raise AssertionError(f"logged iterations differ: {[s['iteration'] for s in actual]}")
    out = {}
    for key in ("loss", "grad_norm", "params_norm", "load_balancing_loss"):
        if key in reference[0]:
            out[key] = max(_rel(a[key], r[key]) for a, r in zip(actual, reference))
    return out


class Matrix:
    """Runs cases, reusing the 1-process reference of each (model, batch, micro batch size)."""

    def __init__(self, out: str):
        self.out = out
        self.paths = prepare(out)
        self.references: dict = {}

    def reference(self, model: str, batch: str, micro_batch_size: int) -> dict:
        key = (model, batch, micro_batch_size)
        if key not in self.references:
            save = os.path.join(self.out, "runs", f"{model}-{batch}-mbs{micro_batch_size}-1proc")
            self.references[key] = run_sft(self.paths, model, batch, 1, micro_batch_size, THREE_STEPS, save)
        return self.references[key]

    def case(self, model: str, batch: str, layout_name: str) -> dict:
        layout = BY_NAME[layout_name]
        ref = self.reference(model, batch, layout.micro_batch_size)
        save = os.path.join(self.out, "runs", f"{model}-{batch}-{layout.name}")
        run = run_sft(self.paths, model, batch, 2, layout.micro_batch_size, layout.args + THREE_STEPS, save)
        diffs = compare(ref["steps"], run["steps"])
        return {"model": model, "batch": batch, "layout": layout.name, "diffs": diffs, "seconds": run["seconds"],
                "losses": [s["loss"] for s in run["steps"]], "ok": all(v <= TOLERANCE for v in diffs.values())}


def markdown(results: list) -> str:
    lines = ["| model | batches | layout (2 processes) | losses (3 steps) | max rel. diff loss | grad norm | "
             "params norm | load-balancing loss | s | result |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        d = r["diffs"]
        lb = f"{d['load_balancing_loss']:.1e}" if "load_balancing_loss" in d else "-"
        lines.append(f"| {r['model']} | {r['batch']} | {r['layout']} | {' '.join(f'{x:.5f}' for x in r['losses'])} "
                     f"| {d['loss']:.1e} | {d['grad_norm']:.1e} | {d['params_norm']:.1e} | {lb} | {r['seconds']:.0f} | "
                     f"{'equal' if r['ok'] else 'DIFFERS'} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="output/layout_matrix")
    parser.add_argument("--subset", choices=("all", "ci"), default="all")
    args = parser.parse_args()
    matrix = Matrix(os.path.abspath(args.out))
    cases = CI_CASES if args.subset == "ci" else all_cases()
    results = []
    for i, case in enumerate(cases, 1):
        results.append(matrix.case(*case))
        r = results[-1]
        print(f"[{i}/{len(cases)}] {' '.join(case)}: {r['diffs']} {'ok' if r['ok'] else 'DIFFERS'}", flush=True)
    import megatron.core
    import torch

    print(f"\nMachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}, "
          f"megatron-core {megatron.core.__version__}; tolerance {TOLERANCE:g} relative per step.\n")
    print(markdown(results))
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    raise SystemExit(main())
