"""Leaving a run early and cleanly: preemption signals, time slots, a fixed iteration budget.

``EarlyExit.check(iteration)`` is called once per step on every rank; the ranks agree (an all-reduce
of the local decision), so all of them save the same iteration and stop together. The reason is
written to ``<save>/exit_reason.json`` (SLURM scripts requeue a preempted job when they see it).
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Optional

import torch

from .options import ExitSettings

SIGNALS = ("SIGTERM", "SIGUSR1")
REASONS = ("signal", "exit_interval", "exit_duration")


class EarlyExit:
    def __init__(self, settings: ExitSettings):
        self.settings = settings
        self.start = time.time()
        self.received: Optional[str] = None
        self._previous = {}
        if settings.signal_handler:
            for name in SIGNALS:
                sig = getattr(signal, name)
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def _local_reason(self, iteration: int) -> int:
        """0 = go on, else 1 + the index of the reason in REASONS."""
        if self.received:
            return 1
        if self.settings.interval and iteration % self.settings.interval == 0:
            return 2
        minutes = self.settings.duration_minutes
        if minutes is not None and time.time() - self.start >= minutes * 60:
            return 3
        return 0

    @property
    def active(self) -> bool:
        s = self.settings
        return bool(s.signal_handler or s.interval or s.duration_minutes is not None)

    def check(self, iteration: int) -> Optional[str]:
        """The agreed reason to stop after ``iteration`` (collective when active), or None."""
        if not self.active:
            return None
        from megatron_swift.platform import get_platform

        flag = torch.tensor([self._local_reason(iteration)], dtype=torch.int64, device=get_platform().device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        code = int(flag.item())
        if not code:
            return None
        reason = REASONS[code - 1]
        return f"{reason} ({self.received})" if reason == "signal" and self.received else reason

    def record(self, save_dir: Optional[str], iteration: int, reason: str) -> None:
        if not save_dir or torch.distributed.get_rank() != 0:
            return
        path = os.path.join(save_dir, "exit_reason.json")
        with open(path + ".tmp", "w") as f:
            json.dump({"iteration": iteration, "reason": reason, "time": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
        os.replace(path + ".tmp", path)

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
