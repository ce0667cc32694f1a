"""The training loop, top to bottom: step, log, evaluate, save, until the last iteration.

Everything heavy is a small component: platform (process groups), model (HF config -> mcore),
model_setup (DDP + optimizer), lr_schedule, step (megatron's schedules), metrics (logs),
checkpoint (atomic dist checkpoints). The loop itself only sequences them.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch

from megatron_swift.platform import get_platform

from .checkpoint import Checkpointer
from .data_feed import EndOfData
from .metrics import MetricsLogger
from .exit import EarlyExit
from .options import CheckpointSettings, ExitSettings, LoggingSettings
from .profiling import StepProfiler
from .step import StepResult, forward_backward, router_losses, step_loss_tokens, train_step

logger = logging.getLogger("megatron_swift")


@dataclass
class LoopSettings:
    train_iters: int  # what the LR schedule and the progress bar span
    # the schedule's [seq_length, micro_batch_size] (a THD micro batch is one row: size 1)
    micro_batch_size: int
    seq_length: int
    stop_iteration: Optional[int] = None  # stop here if earlier (--max_epochs with --train_iters)
    save_dir: Optional[str] = None
    checkpoint: CheckpointSettings = field(default_factory=lambda: CheckpointSettings(save=""))
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    eval_interval: Optional[int] = None
    exit: ExitSettings = field(default_factory=ExitSettings)
    manual_gc_interval: Optional[int] = None  # collect every N steps (automatic GC is off)
    hf_export: Optional[object] = None  # writes <iter>-hf/ copies with --save_safetensors
    # another objective than the LM loss (``megatron rlhf``: megatron_swift/rlhf/objective.py): its
    # ``prepare(microbatches, seq_length, micro_batch_size)`` runs before each step (reference log-probs)
    objective: Optional[object] = None

    # kept for callers that set them directly (tests, workers)
    log_interval: Optional[int] = None
    save_interval: Optional[int] = None

    def __post_init__(self):
        if self.log_interval is not None:
            self.logging.log_interval = self.log_interval
        if self.save_interval is not None:
            self.checkpoint.save_interval = self.save_interval

    @property
    def last_iteration(self) -> int:
        return min(self.train_iters, self.stop_iteration or self.train_iters)


class TrainingDiverged(ValueError):
    """The loss or the gradient norm stopped being a finite number."""


def _check_finite(iteration: int, result: StepResult, last_checkpoint: Optional[str]) -> None:
    values = {"the loss": result.loss, "the gradient norm": result.grad_norm}
    bad = {k: v for k, v in values.items() if v is not None and not math.isfinite(v)}
    if not bad:
        return
    where = (f"the last good checkpoint is {last_checkpoint}: resume from it (--load) with a lower --lr, more "
             f"warmup or --clip_grad") if last_checkpoint else "no checkpoint was saved yet: restart with a lower --lr"
    raise TrainingDiverged(f"training diverged at iteration {iteration}: "
                           f"{' and '.join(f'{k} is {v}' for k, v in bad.items())}; nothing after it was saved; "
                           f"{where}")


@dataclass
class TrainState:
    iteration: int = 0
    losses: list = field(default_factory=list)
    last: Optional[StepResult] = None
    skipped: int = 0  # fp16 steps whose update was skipped (loss scale overflow)
    exit_reason: Optional[str] = None  # set when the run left early (signal, exit_interval, exit_duration)


# For step ``i`` (0-based, global), this data-parallel rank's list of micro batches (dicts in the
# format of trainer/step.py). Indexing by step makes resuming at any step exact.
BatchesForStep = Callable[[int], list]
# Returns the validation micro batches for this rank (a finite list of lists), or None.
EvalBatches = Optional[Callable[[], Iterator[list]]]


def is_logging_rank() -> bool:
    return torch.distributed.get_rank() == 0


def write_args_json_once(args, save_dir: str, extra: Optional[dict] = None) -> None:
    """``<save>/args.json``: the run's arguments plus what later commands need (model, template), in
    the schema export writes too (``megatron_swift.checkpoint.layout.ARGS_KEYS``)."""
    from megatron_swift.checkpoint import layout

    if not is_logging_rank():
        return
    data = args.to_dict() if hasattr(args, "to_dict") else dict(vars(args))
    data.update(extra or {})
    layout.write_args_json(save_dir, data)


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
            if settings.objective is not None:
                settings.objective.prepare(microbatches, settings.seq_length, settings.micro_batch_size)
            result = forward_backward(ddp_chunks, _iterators(ddp_chunks, microbatches), len(microbatches),
                                      settings.seq_length, settings.micro_batch_size, forward_only=True,
                                      objective=settings.objective)
            loss_sum += result.loss * result.num_tokens
            tokens += result.num_tokens
    for chunk in ddp_chunks:
        chunk.train()
    return loss_sum / tokens if tokens else None


def train(ddp_chunks: list, optimizer, scheduler, batches_for_step: BatchesForStep, settings: LoopSettings,
          start_iteration: int = 0, eval_batches: EvalBatches = None,
          data_cursor: Optional[Callable[[int], dict]] = None) -> TrainState:
    """``data_cursor(iteration)``: where the data stream stands after that iteration, saved with each
    checkpoint so a resume continues there."""
    from .flops import StepFlops

    last = settings.last_iteration
    metrics = MetricsLogger(save_dir=settings.save_dir, settings=settings.logging, total_iters=last,
                            enabled=is_logging_rank(), start_iter=start_iteration)
    flops = None
    if settings.logging.log_throughput:
        from .model_setup import unwrap

        flops = StepFlops(ddp_chunks[0].config, unwrap(ddp_chunks[0]).vocab_size)
    checkpointer = Checkpointer(settings.save_dir, settings.checkpoint, ddp_chunks, optimizer, scheduler,
                                hf_export=settings.hf_export)
    state = TrainState(iteration=start_iteration)
    if is_logging_rank():
        platform = get_platform()
        logger.info("training iterations %d..%d on %s/%s, world size %d", start_iteration + 1, last,
                    platform.device_type, platform.backend, torch.distributed.get_world_size())

    def run_eval() -> None:
        eval_loss = evaluate(ddp_chunks, eval_batches, settings)
        if eval_loss is not None:
            metrics.eval(state.iteration, eval_loss)

    def cursor() -> dict:
        return data_cursor(state.iteration) if data_cursor else {}

    from .model_setup import unwrap

    vocab = getattr(unwrap(ddp_chunks[0]), "hf_vocab_size", unwrap(ddp_chunks[0]).vocab_size)
    early_exit = EarlyExit(settings.exit)
    profiler = StepProfiler(settings.logging.profile, settings.save_dir)
    warned_uniform = False
    evaluated_at = saved_at = exit_reason = None
    try:
        while state.iteration < last:
            data_start = time.time()
            try:
                microbatches = batches_for_step(state.iteration)
            except EndOfData as end:
                if is_logging_rank():
                    logger.info("%s: stopping at iteration %d", end, state.iteration)
                break
            data_seconds = time.time() - data_start
            profiler.before_step(state.iteration + 1)
            if settings.objective is not None:
                settings.objective.prepare(microbatches, settings.seq_length, settings.micro_batch_size)
            result = train_step(ddp_chunks, optimizer, _iterators(ddp_chunks, microbatches), len(microbatches),
                                settings.seq_length, settings.micro_batch_size,
                                loss_tokens=step_loss_tokens(microbatches), objective=settings.objective)
            _check_finite(state.iteration + 1, result, checkpointer.last_saved)
            if (result.grad_norm == 0.0 and abs(result.loss - math.log(vocab)) < 1e-2 and not warned_uniform
                    and is_logging_rank()):
                warned_uniform = True
                logger.warning("iteration %d: the loss is ln(vocab size %d) and the gradient is zero: the model "
                               "predicts a uniform distribution and learns nothing (overflowed or collapsed "
                               "weights?); check --lr and the data", state.iteration + 1, vocab)
            lr = optimizer.param_groups[0]["lr"]  # the lr this step used
            if result.update_successful:
                scheduler.step(increment=1)
            else:  # fp16 overflow: the update was skipped, so the schedule does not advance either
                state.skipped += 1
            state.iteration += 1
            profiler.after_step(state.iteration)
            state.last = result
            state.losses.append(result.loss)
            extra = router_losses(ddp_chunks[0].config, len(microbatches))
            extra.update(result.metrics)
            if hasattr(settings.objective, "step_metrics"):  # GRPO: the step's rollout (rewards, lengths)
                extra.update(settings.objective.step_metrics())
            if settings.logging.log_params_norm:
                from .step import params_norm

                extra["params_norm"] = params_norm(ddp_chunks)
            metrics.step(state.iteration, result.loss, lr, result.grad_norm, _dp_sum(_real_tokens(microbatches)),
                         result.num_tokens, extra=extra, data_seconds=data_seconds, skipped=state.skipped,
                         flops=flops.of(microbatches) if flops else None)
            if eval_batches and settings.eval_interval and state.iteration % settings.eval_interval == 0:
                run_eval()
                evaluated_at = state.iteration
            if settings.manual_gc_interval and state.iteration % settings.manual_gc_interval == 0:
                gc.collect()
            if (settings.save_dir and settings.checkpoint.save_interval
                    and state.iteration % settings.checkpoint.save_interval == 0 and state.iteration < last):
                metrics.timing("save_seconds", checkpointer.save(state.iteration, cursor()), state.iteration)
                saved_at = state.iteration
            exit_reason = early_exit.check(state.iteration)
            if exit_reason:
                if is_logging_rank():
                    logger.info("leaving at iteration %d (%s): saving", state.iteration, exit_reason)
                break
        if eval_batches and not exit_reason and evaluated_at != state.iteration and state.iteration > start_iteration:
            run_eval()  # training ends evaluated and saved
        if settings.save_dir and saved_at != state.iteration and state.iteration > start_iteration:
            metrics.timing("save_seconds", checkpointer.save(state.iteration, cursor()), state.iteration)
        checkpointer.finish()
        if exit_reason:
            early_exit.record(settings.save_dir, state.iteration, exit_reason)
    finally:
        profiler.close()
        early_exit.close()
        checkpointer.close()
        metrics.close()
    state.exit_reason = exit_reason
    return state
