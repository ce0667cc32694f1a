"""Learning-rate schedule: megatron-core's OptimizerParamScheduler (warmup, then cosine/linear/
constant decay to ``min_lr``), configured from a small dataclass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class ScheduleSettings:
    lr: float
    train_iters: int
    min_lr: float = 0.0
    lr_decay_style: str = "cosine"
    lr_decay_iters: Optional[int] = None
    lr_warmup_iters: int = 0
    lr_warmup_fraction: Optional[float] = None
    weight_decay: float = 0.0

    @property
    def decay_iters(self) -> int:
        return self.lr_decay_iters or self.train_iters

    @property
    def warmup_iters(self) -> int:
        if self.lr_warmup_fraction is not None:
            return int(self.lr_warmup_fraction * self.decay_iters)
        return self.lr_warmup_iters


def build_scheduler(optimizer, settings: ScheduleSettings):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=settings.lr,
        min_lr=settings.min_lr,
        lr_warmup_steps=settings.warmup_iters,
        lr_decay_steps=settings.decay_iters,
        lr_decay_style=settings.lr_decay_style,
        start_wd=settings.weight_decay,
        end_wd=settings.weight_decay,
        wd_incr_steps=settings.train_iters,
        wd_incr_style="constant",
    )
