"""The training loop, top to bottom: step, log, save, until ``train_iters``.

Everything heavy is a small component: platform (process groups), model (HF config -> mcore),
model_setup (DDP + optimizer), lr_schedule, step (megatron's schedules), metrics (logs),
checkpoint (atomic dist checkpoints). The loop itself only sequences them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch

from megatron_swift.platform import get_platform

from .checkpoint import save_checkpoint
from .metrics import MetricsLogger
from .step import StepResult, forward_backward, router_losses, step_loss_tokens, train_step

logger = logging.getLogger("megatron_swift")


@dataclass
class LoopSettings:
    train_iters: int
    # the schedule's [seq_length, micro_batch_size] (a THD micro batch is one row: size 1)
    micro_batch_size: int
    seq_length: int
    log_interval: int = 5
    save_dir: Optional[str] = None
    save_interval: Optional[int] = None
    save_optim: bool = True
    save_rng: bool = True
    tensorboard_dir: Optional[str] = None
    eval_interval: Optional[int] = None
    wandb_project: Optional[str] = None
    wandb_exp_name: Optional[str] = None


@dataclass
class TrainState:
    iteration: int = 0
    losses: list = field(default_factory=list)
    last: Optional[StepResult] = None


# For step ``i`` (0-based, global), this data-parallel rank's list of micro batches (dicts in the
# format of trainer/step.py). Indexing by step makes resuming at any step exact.
BatchesForStep = Callable[[int], list]
# Returns the validation micro batches for this rank (a finite list of lists), or None.
EvalBatches = Optional[Callable[[], Iterator[list]]]


def is_logging_rank() -> bool:
    return torch.distributed.get_rank() == 0


def write_args_json_once(args, save_dir: str, extra: Optional[dict] = None) -> None:
    """``<save>/args.json``: the run's arguments plus what later commands need (model, template)."""
    import json
    import os

    if not is_logging_rank():
        return
    os.makedirs(save_dir, exist_ok=True)
    data = args.to_dict() if hasattr(args, "to_dict") else dict(vars(args))
    data.update(extra or {})
    tmp = os.path.join(save_dir, "args.json.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=str)
    os.replace(tmp, os.path.join(save_dir, "args.json"))


def _iterators(ddp_chunks: list, microbatches: list):
    return [iter(microbatches) for _ in ddp_chunks] if len(ddp_chunks) > 1 else iter(microbatches)


def _real_tokens(microbatches: list) -> int:
    """Tokens that are not padding (right padding, THD padding segments)."""
    return sum(int(mb["padding_mask"].numel() - mb["padding_mask"].sum()) if "padding_mask" in mb
               else mb["input_ids"].numel() for mb in microbatches)


def _dp_sum(value: int) -> int:
    from megatron.core import parallel_state as ps

    t = torch.tensor([value], dtype=torch.int64, device=get_platform().device)
    torch.distributed.all_reduce(t, group=ps.get_data_parallel_group(with_context_parallel=True))
    return int(t.item())


def evaluate(ddp_chunks: list, eval_batches: Callable[[], Iterator[list]], settings: LoopSettings) -> Optional[float]:
    """Per-token loss over the validation batches (None if they hold no loss token)."""
    for chunk in ddp_chunks:
        chunk.eval()
    loss_sum, tokens = 0.0, 0
    with torch.no_grad():
        for microbatches in eval_batches():
            result = forward_backward(ddp_chunks, _iterators(ddp_chunks, microbatches), len(microbatches),
                                      settings.seq_length, settings.micro_batch_size, forward_only=True)
            loss_sum += result.loss * result.num_tokens
            tokens += result.num_tokens
    for chunk in ddp_chunks:
        chunk.train()
    return loss_sum / tokens if tokens else None


def train(ddp_chunks: list, optimizer, scheduler, batches_for_step: BatchesForStep, settings: LoopSettings,
          start_iteration: int = 0, eval_batches: EvalBatches = None) -> TrainState:
    metrics = MetricsLogger(save_dir=settings.save_dir, tensorboard_dir=settings.tensorboard_dir,
                            total_iters=settings.train_iters, log_interval=settings.log_interval,
                            enabled=is_logging_rank(), start_iter=start_iteration,
                            wandb_project=settings.wandb_project, wandb_exp_name=settings.wandb_exp_name)
    state = TrainState(iteration=start_iteration)
    if is_logging_rank():
        platform = get_platform()
        logger.info("training iterations %d..%d on %s/%s, world size %d", start_iteration + 1,
                    settings.train_iters, platform.device_type, platform.backend, torch.distributed.get_world_size())

    def save():
        save_checkpoint(settings.save_dir, state.iteration, ddp_chunks, optimizer, scheduler,
                        data_state={"consumed_steps": state.iteration},
                        save_optim=settings.save_optim, save_rng=settings.save_rng)
        if is_logging_rank():
            logger.info("saved checkpoint iteration %d in %s", state.iteration, settings.save_dir)

    try:
        while state.iteration < settings.train_iters:
            microbatches = batches_for_step(state.iteration)
            result = train_step(ddp_chunks, optimizer, _iterators(ddp_chunks, microbatches), len(microbatches),
                                settings.seq_length, settings.micro_batch_size,
                                loss_tokens=step_loss_tokens(microbatches))
            lr = optimizer.param_groups[0]["lr"]  # the lr this step used
            scheduler.step(increment=1)
            state.iteration += 1
            state.last = result
            state.losses.append(result.loss)
            metrics.step(state.iteration, result.loss, lr, result.grad_norm,
                         _dp_sum(_real_tokens(microbatches)), result.num_tokens,
                         extra=router_losses(ddp_chunks[0].config, len(microbatches)))
            if eval_batches and settings.eval_interval and state.iteration % settings.eval_interval == 0:
                eval_loss = evaluate(ddp_chunks, eval_batches, settings)
                if eval_loss is not None:
                    metrics.eval(state.iteration, eval_loss)
            if (settings.save_dir and settings.save_interval and state.iteration % settings.save_interval == 0
                    and state.iteration < settings.train_iters):
                save()
        if settings.save_dir:
            save()  # always at the end
    finally:
        metrics.close()
    return state
