"""Plots loss (and eval loss, lr, tokens/s) from one or more ``logging.jsonl`` files.

    python scripts/plot_logging.py megatron_output/run/logging.jsonl [other/logging.jsonl ...] -o loss.png

Needs matplotlib (`pip install matplotlib`, or the `plot` extra).
"""

from __future__ import annotations

import argparse
import json
import os


def read(path: str) -> tuple[list[dict], list[dict]]:
    train, evals = [], []
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            (evals if "eval_loss" in record else train).append(record)
    return train, evals


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("files", nargs="+")
    p.add_argument("-o", "--output", default="loss.png")
    args = p.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for path in args.files:
        label = os.path.basename(os.path.dirname(os.path.abspath(path))) or path
        train, evals = read(path)
        it = [r["iteration"] for r in train]
        axes[0].plot(it, [r["loss"] for r in train], label=f"{label} train")
        if evals:
            axes[0].plot([r["iteration"] for r in evals], [r["eval_loss"] for r in evals], "o--", label=f"{label} eval")
        axes[1].plot(it, [r["lr"] for r in train], label=label)
        axes[2].plot(it, [r["tokens_per_sec"] for r in train], label=label)
    for ax, title in zip(axes, ("loss", "learning rate", "real tokens/s")):
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.output, dpi=110)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
