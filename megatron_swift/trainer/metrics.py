"""What a user watches: a log line every ``log_interval`` steps, a progress bar, TensorBoard and
``<save>/logging.jsonl`` (one JSON object per logged step, plus eval records) to plot.

Only one rank writes (the caller passes ``enabled``); every number it gets is already global.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Optional

logger = logging.getLogger("megatron_swift")


def _fmt_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


def _memory_gib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**30


class MetricsLogger:
    def __init__(self, save_dir: Optional[str], tensorboard_dir: Optional[str], total_iters: int,
                 log_interval: int, enabled: bool, start_iter: int = 0, wandb_project: Optional[str] = None,
                 wandb_exp_name: Optional[str] = None, run_config: Optional[dict] = None):
        self.enabled = enabled
        self.total_iters = total_iters
        self.log_interval = log_interval
        self.start_iter = start_iter
        self.start_time = time.time()
        self._window_tokens = 0
        self._window_start = time.time()
        self._jsonl = None
        self._tb = None
        self._bar = None
        self._wandb = None
        if not enabled:
            return
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise RuntimeError("--wandb_project needs the wandb package: pip install wandb") from None
            self._wandb = wandb.init(project=wandb_project, name=wandb_exp_name, config=run_config or {},
                                     dir=save_dir)
        if save_dir:
            os.makedirs(save_dir, exist_ok=True)
            self._jsonl = open(os.path.join(save_dir, "logging.jsonl"), "a", buffering=1)
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(tensorboard_dir)
        import sys

        from tqdm import tqdm

        # a bar on a terminal; in a log file (cluster jobs) the log lines carry the same numbers
        self._bar = tqdm(total=total_iters, initial=start_iter, desc="train", dynamic_ncols=True,
                         mininterval=1.0, disable=not sys.stderr.isatty())

    def step(self, iteration: int, loss: float, lr: float, grad_norm: Optional[float], real_tokens: int,
             loss_tokens: int, extra: Optional[dict] = None) -> Optional[dict]:
        """``extra``: further per-step numbers (e.g. MoE router losses), logged as given."""
        self._window_tokens += real_tokens
        if not self.enabled:
            return None
        self._bar.update(1)
        if iteration % self.log_interval and iteration != self.total_iters:
            return None
        now = time.time()
        window = max(now - self._window_start, 1e-9)
        elapsed = now - self.start_time
        done = iteration - self.start_iter
        remaining = elapsed / max(done, 1) * (self.total_iters - iteration)
        record = {
            "iteration": iteration, "loss": round(loss, 6), "lr": lr,
            "grad_norm": None if grad_norm is None else round(grad_norm, 6),
            "tokens_per_sec": round(self._window_tokens / window, 2), "num_tokens": real_tokens,
            "loss_tokens": loss_tokens, "elapsed": _fmt_seconds(elapsed), "remaining": _fmt_seconds(remaining),
            "memory_gib": round(_memory_gib(), 3),
        }
        record.update({k: round(v, 6) for k, v in (extra or {}).items()})
        self._window_tokens, self._window_start = 0, now
        self._write(record, prefix="train")
        self._bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        self._bar.write(
            f"iter {iteration}/{self.total_iters} | loss {loss:.4f} | lr {lr:.3e} | grad_norm "
            f"{record['grad_norm']} | tokens/s {record['tokens_per_sec']:.1f} | elapsed {record['elapsed']} | "
            f"remaining {record['remaining']} | mem {record['memory_gib']:.2f} GiB"
            + "".join(f" | {k} {v:.4g}" for k, v in (extra or {}).items())
        )
        return record

    def eval(self, iteration: int, loss: float) -> None:
        if not self.enabled:
            return
        import math

        record = {"iteration": iteration, "eval_loss": round(loss, 6), "eval_ppl": round(math.exp(min(loss, 50)), 4)}
        self._write(record, prefix="eval")
        self._bar.write(f"eval iter {iteration} | loss {loss:.4f} | ppl {record['eval_ppl']:.3f}")

    def _write(self, record: dict, prefix: str) -> None:
        if self._jsonl:
            self._jsonl.write(json.dumps(record) + "\n")
        scalars = {f"{prefix}/{k}": v for k, v in record.items()
                   if isinstance(v, (int, float)) and k != "iteration"}
        if self._tb:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, record["iteration"])
        if self._wandb:
            self._wandb.log(scalars, step=record["iteration"])

    def close(self) -> None:
        if self._bar:
            self._bar.close()
        if self._jsonl:
            self._jsonl.close()
        if self._tb:
            self._tb.close()
        if self._wandb:
            self._wandb.finish()
