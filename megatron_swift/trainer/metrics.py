"""What a user watches: a log line every ``log_interval`` steps, a progress bar, ``<save>/logging.jsonl``
(one JSON object per logged step, plus eval records) to plot, and the ``--report_to`` backends
(TensorBoard by default, wandb, swanlab).

Only one rank writes (the caller passes ``enabled``); every number it gets is already global.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from typing import Optional

from .options import LoggingSettings

logger = logging.getLogger("megatron_swift")


def _fmt_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


def _memory_gib() -> dict:
    import psutil
    import torch

    out = {"memory_gib": round(psutil.Process().memory_info().rss / 2**30, 3)}
    if torch.cuda.is_available():  # the device's share (the host RSS above is the process')
        out["device_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return out


def _drop_rows_after(path: str, iteration: int) -> None:
    """A resumed run (or a fresh one in the directory of a killed one) logs from ``iteration`` on: rows
    a killed run wrote for later iterations are dropped, so each iteration appears once."""
    if not os.path.isfile(path):
        return
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:  # a line cut short by the kill
                dropped += 1
                continue
            if isinstance(row, dict) and row.get("iteration", 0) > iteration:
                dropped += 1
            else:
                kept.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)
        logger.info("%s: dropped %d row(s) past iteration %d (from an interrupted run)", path, dropped, iteration)


class _Backends:
    """TensorBoard / wandb / swanlab writers, as ``--report_to`` asks."""

    def __init__(self, settings: LoggingSettings, save_dir: Optional[str], run_config: Optional[dict]):
        self.tb = self.wandb = self.swanlab = None
        targets = settings.report_to
        tb_dir = settings.tensorboard_dir or (os.path.join(save_dir, "runs") if save_dir else None)
        if "tensorboard" in targets and tb_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(tb_dir, max_queue=settings.tensorboard_queue_size)
        if "wandb" in targets:
            try:
                import wandb
            except ImportError:
                raise RuntimeError("--report_to wandb / --wandb_project needs the wandb package: pip install wandb") \
                    from None
            self.wandb = wandb.init(project=settings.wandb_project or "megatron-swift", name=settings.wandb_exp_name,
                                    config=run_config or {}, dir=settings.wandb_save_dir or save_dir)
        if "swanlab" in targets:
            import swanlab

            self.swanlab = swanlab.init(project=settings.wandb_project or "megatron-swift",
                                        experiment_name=settings.wandb_exp_name, config=run_config or {})

    def scalars(self, values: dict, step: int) -> None:
        if self.tb:
            for key, value in values.items():
                self.tb.add_scalar(key, value, step)
        if self.wandb:
            self.wandb.log(values, step=step)
        if self.swanlab:
            self.swanlab.log(values, step=step)

    def close(self) -> None:
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()
        if self.swanlab:
            self.swanlab.finish()


class MetricsLogger:
    def __init__(self, save_dir: Optional[str], settings: LoggingSettings, total_iters: int, enabled: bool,
                 start_iter: int = 0, run_config: Optional[dict] = None):
        self.settings = settings
        self.enabled = enabled
        self.total_iters = total_iters
        self.start_iter = start_iter
        self.start_time = time.time()
        self._window = {"tokens": 0, "flops": 0.0, "data": 0.0, "start": time.time(), "steps": 0}
        self._jsonl = None
        self._bar = None
        self._backends = None
        if not enabled:
            return
        self._backends = _Backends(settings, save_dir, run_config)
        if save_dir:
            os.makedirs(save_dir, exist_ok=True)
            path = os.path.join(save_dir, "logging.jsonl")
            _drop_rows_after(path, start_iter)
            self._jsonl = open(path, "a", buffering=1)
        from tqdm import tqdm

        # a bar on a terminal; in a log file (cluster jobs) the log lines carry the same numbers
        self._bar = tqdm(total=total_iters, initial=start_iter, desc="train", dynamic_ncols=True,
                         mininterval=1.0, disable=not sys.stderr.isatty())

    def step(self, iteration: int, loss: float, lr: float, grad_norm: Optional[float], real_tokens: int,
             loss_tokens: int, extra: Optional[dict] = None, data_seconds: float = 0.0, skipped: int = 0,
             flops: Optional[float] = None) -> Optional[dict]:
        """``extra``: further per-step numbers (MoE router losses, params norm), logged as given;
        ``flops``: the step's model FLOPs (``--log_throughput``), ``data_seconds``: time waiting for
        the step's batches."""
        w = self._window
        w["tokens"] += real_tokens
        w["flops"] += flops or 0.0
        w["data"] += data_seconds
        w["steps"] += 1
        if not self.enabled:
            return None
        self._bar.update(1)
        extra = dict(extra or {})
        if iteration % self.settings.tensorboard_log_interval == 0:
            points = {"train/loss": loss, "train/grad_norm": grad_norm, "train/num_tokens": real_tokens}
            if self.settings.log_learning_rate:
                points["train/lr"] = lr
            points.update({f"train/{k}": v for k, v in extra.items()})
            self._backends.scalars({k: v for k, v in points.items() if v is not None}, iteration)
        if iteration % self.settings.log_interval and iteration != self.total_iters:
            return None
        now = time.time()
        window = max(now - w["start"], 1e-9)
        elapsed = now - self.start_time
        done = iteration - self.start_iter
        remaining = elapsed / max(done, 1) * (self.total_iters - iteration)
        record = {
            "iteration": iteration, "loss": round(loss, 6), "lr": lr,
            "grad_norm": None if grad_norm is None else round(grad_norm, 6),
            "tokens_per_sec": round(w["tokens"] / window, 2), "num_tokens": real_tokens,
            "loss_tokens": loss_tokens, "elapsed": _fmt_seconds(elapsed), "remaining": _fmt_seconds(remaining),
            "step_seconds": round(window / w["steps"], 4),
        }
        record.update(_memory_gib())
        if skipped:
            record["skipped_iterations"] = skipped
        if flops is not None:
            import torch

            record["tflops_per_device"] = round(w["flops"] / window / torch.distributed.get_world_size() / 1e12, 4)
        record.update({k: round(v, 6) for k, v in extra.items()})
        timers = {"time/step_seconds": record["step_seconds"], "time/data_seconds": w["data"] / w["steps"]}
        self._window = {"tokens": 0, "flops": 0.0, "data": 0.0, "start": now, "steps": 0}
        self._write(record)
        tb = {}
        if self.settings.log_timers:
            tb.update(timers)
        if self.settings.log_memory:
            tb.update({f"memory/{k}": v for k, v in record.items() if k.endswith("memory_gib")})
        tb["train/tokens_per_sec"] = record["tokens_per_sec"]
        if "tflops_per_device" in record:
            tb["train/tflops_per_device"] = record["tflops_per_device"]
        self._backends.scalars(tb, iteration)
        self._bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        self._bar.write(
            f"iter {iteration}/{self.total_iters} | loss {loss:.4f} | lr {lr:.3e} | grad_norm "
            f"{record['grad_norm']} | tokens/s {record['tokens_per_sec']:.1f}"
            + (f" | TFLOP/s/device {record['tflops_per_device']:.3f}" if "tflops_per_device" in record else "")
            + f" | elapsed {record['elapsed']} | remaining {record['remaining']} | mem {record['memory_gib']:.2f} GiB"
            + "".join(f" | {k} {v:.4g}" for k, v in extra.items())
            + (f" | skipped {skipped}" if skipped else "")
        )
        return record

    def timing(self, name: str, seconds: float, iteration: int) -> None:
        if self.enabled and self.settings.log_timers:
            self._backends.scalars({f"time/{name}": seconds}, iteration)

    def eval(self, iteration: int, loss: float) -> None:
        if not self.enabled:
            return
        record = {"iteration": iteration, "eval_loss": round(loss, 6), "eval_ppl": round(math.exp(min(loss, 50)), 4)}
        self._write(record)
        points = {"eval/loss": loss}
        if self.settings.log_validation_ppl:
            points["eval/ppl"] = record["eval_ppl"]
        self._backends.scalars(points, iteration)
        self._bar.write(f"eval iter {iteration} | loss {loss:.4f} | ppl {record['eval_ppl']:.3f}")

    def _write(self, record: dict) -> None:
        if self._jsonl:
            self._jsonl.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self._bar:
            self._bar.close()
        if self._jsonl:
            self._jsonl.close()
        if self._backends:
            self._backends.close()
