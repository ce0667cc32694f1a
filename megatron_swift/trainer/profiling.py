"""``--profile true --use_pytorch_profiler true``: torch.profiler over a window of iterations.

Megatron's flags and defaults: iterations ``--profile_step_start`` (10) up to, not including,
``--profile_step_end`` (12), on the ranks in ``--profile_ranks`` (0). Each profiled rank writes
``<save>/profile/rank<r>.trace.json`` (open it in chrome://tracing or Perfetto) and
``rank<r>.summary.txt`` (operators by self time, with input shapes and call counts), and the log
names both. Megatron's other mode (``--profile`` alone: CUDA profiler ranges for Nsight Systems) is
refused at argument checking.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

logger = logging.getLogger("megatron_swift")


@dataclass
class ProfileSettings:
    enabled: bool = False
    step_start: int = 10  # 1-based iteration where recording starts
    step_end: int = 12  # first iteration not recorded
    ranks: list = field(default_factory=lambda: [0])


class StepProfiler:
    """Call :meth:`before_step` with the 1-based iteration about to run and :meth:`after_step`
    with the one just finished; records ``[step_start, step_end)`` on the chosen ranks."""

    def __init__(self, settings: ProfileSettings, save_dir: Optional[str]):
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        self.active = settings.enabled and rank in settings.ranks
        self.settings, self.rank = settings, rank
        self.out = os.path.join(save_dir or ".", "profile")
        self._profiler = None

    def before_step(self, iteration: int) -> None:
        if self.active and self._profiler is None and iteration == self.settings.step_start:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._profiler = torch.profiler.profile(activities=activities, record_shapes=True, with_stack=False)
            self._profiler.__enter__()

    def after_step(self, iteration: int) -> None:
        if self._profiler is not None and iteration + 1 >= self.settings.step_end:
            self.close()

    def close(self) -> None:
        if self._profiler is None:
            return
        profiler, self._profiler = self._profiler, None
        profiler.__exit__(None, None, None)
        os.makedirs(self.out, exist_ok=True)
        trace = os.path.join(self.out, f"rank{self.rank}.trace.json")
        summary = os.path.join(self.out, f"rank{self.rank}.summary.txt")
        profiler.export_chrome_trace(trace)
        sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        with open(summary + ".tmp", "w") as f:
            f.write(profiler.key_averages().table(sort_by=sort, row_limit=60))
            f.write("\n\nBy input shape:\n")
            f.write(profiler.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=40))
        os.replace(summary + ".tmp", summary)
        logger.info("profile of iterations %d-%d (rank %d): %s, %s", self.settings.step_start,
                    self.settings.step_end - 1, self.rank, trace, summary)

    @contextlib.contextmanager
    def session(self):
        try:
            yield self
        finally:
            self.close()
