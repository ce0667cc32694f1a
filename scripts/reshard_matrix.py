"""Checkpoints that move between parallel layouts, through `megatron sft`.

For a tiny dense Qwen3 and a tiny Qwen3-MoE (load-balancing loss on): a run at layout A trains 4
steps on long-tailed chat data and saves after step 2; a run at layout B resumes that step-2
checkpoint (model, optimizer, LR schedule, data position) and trains steps 3-4. Steps 3-4 must
equal the uninterrupted single-process run within 1e-5 relative (loss, gradient norm, router loss).

    .venv/bin/python scripts/reshard_matrix.py --out output/reshard_matrix            # all pairs
    .venv/bin/python scripts/reshard_matrix.py --out output/reshard_matrix --subset ci

Prints a markdown table (kept in docs/layouts.md). tests/test_reshard_matrix.py runs the `ci` subset.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import layout_matrix  # noqa: E402  (the same models, data and `megatron sft` runner)

TOLERANCE = layout_matrix.TOLERANCE
STEPS = ("--train_iters", "4", "--save_interval", "2")


@dataclasses.dataclass(frozen=True)
class Setup:
    name: str
    nproc: int
    args: tuple = ()


ONE = Setup("1proc", 1)
SETUPS = {s.name: s for s in [
    ONE,
    Setup("tp2", 2, ("--tensor_model_parallel_size", "2")),
    Setup("tp2_sp", 2, layout_matrix.TP2_SP),
    Setup("pp2", 2, layout_matrix.PP2),
    Setup("dp2_overlap", 2, layout_matrix.BY_NAME["dp2_overlap"].args),
    Setup("pp2_vpp2", 2, layout_matrix.BY_NAME["pp2_vpp2"].args),
    Setup("ep2_dp2", 2, ("--expert_model_parallel_size", "2")),
    Setup("tp2_ep2_sp_etp1", 2, layout_matrix.TP2_SP + ("--expert_model_parallel_size", "2",
                                                        "--expert_tensor_parallel_size", "1")),
]}

# (model, save layout, resume layout, optimizer flags)
PAIRS = [
    ("dense", "1proc", "tp2", ()), ("dense", "tp2", "1proc", ()),
    ("dense", "1proc", "pp2", ()), ("dense", "pp2", "1proc", ()),
    ("moe", "1proc", "ep2_dp2", ()), ("moe", "ep2_dp2", "1proc", ()),
    ("moe", "1proc", "tp2_ep2_sp_etp1", ()), ("moe", "tp2_ep2_sp_etp1", "1proc", ()),
    ("moe", "ep2_dp2", "tp2_sp", ()), ("moe", "1proc", "pp2", ()),
    ("moe", "1proc", "ep2_dp2", ("--use_distributed_optimizer", "false")),
    ("moe", "ep2_dp2", "1proc", ("--use_distributed_optimizer", "false")),
    # saved between an optimizer step and the next forward's parameter all-gather
    ("dense", "dp2_overlap", "1proc", ()),
    # two model chunks per rank: the optimizer state of both must be saved (it lost all but one)
    ("dense", "pp2_vpp2", "1proc", ()), ("dense", "1proc", "pp2_vpp2", ("--use_distributed_optimizer", "false")),
]
CI_PAIRS = [PAIRS[1], PAIRS[6], PAIRS[11], PAIRS[12], PAIRS[13]]


def _label(opt: tuple) -> str:
    return "plain Adam" if opt else "distributed optimizer"


class Reshard:
    def __init__(self, out: str):
        self.out = out
        self.paths = layout_matrix.prepare(out)
        self.trained: dict = {}

    def _train(self, model: str, setup: Setup, opt: tuple) -> dict:
        """4 steps at ``setup``, checkpoints after steps 2 and 4."""
        key = (model, setup.name, opt)
        if key not in self.trained:
            save = os.path.join(self.out, "runs", f"{model}-{setup.name}-{'plain' if opt else 'distopt'}")
            shutil.rmtree(save, ignore_errors=True)
            run = layout_matrix.run_sft(self.paths, model, "padding_free", setup.nproc, 2,
                                        setup.args + STEPS + opt, save)
            self.trained[key] = dict(run, save=save)
        return self.trained[key]

    def pair(self, model: str, saved_at: str, resumed_at: str, opt: tuple = ()) -> dict:
        reference = self._train(model, ONE, opt)["steps"]
        source = self._train(model, SETUPS[saved_at], opt)
        # the step-2 checkpoint alone, as its own --load directory
        name = f"{model}-{saved_at}-to-{resumed_at}-{'plain' if opt else 'distopt'}"
        load = os.path.join(self.out, "runs", name + "-load")
        shutil.rmtree(load, ignore_errors=True)
        shutil.copytree(os.path.join(source["save"], "iter_0000002"), os.path.join(load, "iter_0000002"))
        with open(os.path.join(load, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write("2")
        save = os.path.join(self.out, "runs", name)
        shutil.rmtree(save, ignore_errors=True)
        target = SETUPS[resumed_at]
        run = layout_matrix.run_sft(self.paths, model, "padding_free", target.nproc, 2,
                                    target.args + STEPS + opt + ("--load", load), save)
        diffs = layout_matrix.compare(reference[2:], run["steps"])
        return {"model": model, "saved_at": saved_at, "resumed_at": resumed_at, "optimizer": _label(opt),
                "losses": [s["loss"] for s in run["steps"]], "diffs": diffs, "seconds": run["seconds"],
                "ok": all(v <= TOLERANCE for v in diffs.values())}


def markdown(results: list) -> str:
    lines = ["| model | saved at | resumed at | optimizer | losses (steps 3-4) | max rel. diff loss | grad norm | "
             "params norm | load-balancing loss | result |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        d = r["diffs"]
        lb = f"{d['load_balancing_loss']:.1e}" if "load_balancing_loss" in d else "-"
        lines.append(f"| {r['model']} | {r['saved_at']} | {r['resumed_at']} | {r['optimizer']} | "
                     f"{' '.join(f'{x:.5f}' for x in r['losses'])} | {d['loss']:.1e} | {d['grad_norm']:.1e} | "
                     f"{d['params_norm']:.1e} | {lb} | "
                     f"{'equal' if r['ok'] else 'DIFFERS'} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="output/reshard_matrix")
    parser.add_argument("--subset", choices=("all", "ci"), default="all")
    args = parser.parse_args()
    matrix = Reshard(os.path.abspath(args.out))
    pairs = CI_PAIRS if args.subset == "ci" else PAIRS
    results = []
    for i, pair in enumerate(pairs, 1):
        results.append(matrix.pair(*pair))
        r = results[-1]
        print(f"[{i}/{len(pairs)}] {r['model']} {r['saved_at']} -> {r['resumed_at']} ({r['optimizer']}): "
              f"{r['diffs']} {'ok' if r['ok'] else 'DIFFERS'}", flush=True)
    print()
    print(markdown(results))
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.path.insert(0, layout_matrix.REPO)
    raise SystemExit(main())
