"""The training loop, top to bottom: set up, then step / log until ``train_iters``.

Everything heavy is a small component: platform (process groups), model (HF config -> mcore),
model_setup (DDP + optimizer), lr_schedule, step (megatron's schedules), metrics (logs).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from megatron_swift.platform import get_platform, init_parallel

from . import options
from .lr_schedule import build_scheduler
from .metrics import MetricsLogger
from .model_setup import build_optimizer, wrap_ddp
from .step import StepResult, train_step

logger = logging.getLogger("megatron_swift")


@dataclass
class TrainState:
    iteration: int = 0
    last: Optional[StepResult] = None


# A batch source yields, for each optimizer step, this data-parallel rank's list of micro
# batches (dicts in the format of trainer/step.py).
BatchSource = Callable[[], Iterator[list]]


def is_logging_rank() -> bool:
    return torch.distributed.get_rank() == 0


def write_args_json(args, save_dir: str) -> None:
    if not is_logging_rank():
        return
    os.makedirs(save_dir, exist_ok=True)
    data = args.to_dict() if hasattr(args, "to_dict") else dict(vars(args))
    tmp = os.path.join(save_dir, "args.json.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=str)
    os.replace(tmp, os.path.join(save_dir, "args.json"))


def _real_tokens(microbatches: list) -> int:
    return sum(int(mb.get("num_real_tokens", mb["input_ids"].numel())) for mb in microbatches)


def setup_model(args, hf_config):
    """Process groups, model chunks, DDP, optimizer and LR schedule for ``args``."""
    from megatron_swift.model import build_model

    init_parallel(options.parallel_layout(args), seed=args.seed)
    chunks, config, settings = build_model(hf_config, options.model_overrides(args),
                                           where=os.path.join(args.model_dir or str(args.model), "config.json"))
    opt_settings = options.optimizer_settings(args)
    ddp_chunks = wrap_ddp(chunks, config, opt_settings)
    optimizer = build_optimizer(ddp_chunks, config, opt_settings)
    return ddp_chunks, optimizer, config, settings


def train(args, ddp_chunks, optimizer, batches: Iterator[list], train_iters: int, seq_length: int,
          save_dir: Optional[str]) -> TrainState:
    scheduler = build_scheduler(optimizer, args, train_iters)
    metrics = MetricsLogger(
        save_dir=save_dir,
        tensorboard_dir=args.tensorboard_dir or (os.path.join(save_dir, "runs") if save_dir else None),
        total_iters=train_iters, log_interval=args.log_interval, enabled=is_logging_rank(),
    )
    state = TrainState()
    if is_logging_rank():
        logger.info("training %d iterations on %s (%s), world size %d", train_iters,
                    get_platform().device_type, get_platform().backend, torch.distributed.get_world_size())
    try:
        while state.iteration < train_iters:
            microbatches = next(batches)
            iterators = ([iter(microbatches) for _ in ddp_chunks] if len(ddp_chunks) > 1
                         else iter(microbatches))
            result = train_step(ddp_chunks, optimizer, iterators, len(microbatches), seq_length,
                                args.micro_batch_size)
            scheduler.step(increment=1)
            state.iteration += 1
            state.last = result
            real = torch.tensor([_real_tokens(microbatches)], dtype=torch.int64, device=get_platform().device)
            from megatron.core import parallel_state as ps

            torch.distributed.all_reduce(real, group=ps.get_data_parallel_group())
            metrics.step(state.iteration, result.loss, optimizer.param_groups[0]["lr"], result.grad_norm,
                         int(real.item()), result.num_tokens)
    finally:
        metrics.close()
    return state
