"""One training step over megatron-core's own pipeline schedules.

A micro batch is a dict of ``[micro_batch_size, seq]`` tensors: ``input_ids``, ``labels``
(already shifted: ``labels[t]`` is the target for position ``t``; -100 = no loss) and
``position_ids``. The loss is a sum over loss tokens plus the token count; megatron's schedule
and ``finalize_model_grads`` turn that into a per-token mean over the whole global batch
(``calculate_per_token_loss``) or a per-microbatch mean, so every parallel layout optimises the
same objective.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from functools import partial
from typing import Iterator, Optional

import torch

IGNORE_INDEX = -100


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    losses = output_tensor.float()
    mask = loss_mask.to(losses.dtype)
    loss_sum = (losses * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), mask.sum().detach()])
    return loss_sum, num_tokens, {"lm loss": report}


def _moe_padding_mask(model, padding_mask: Optional[torch.Tensor]) -> dict:
    """``padding_mask`` for MoE models (routers leave padding out of their load statistics).

    megatron-core scatters the mask for sequence parallelism only on the first pipeline stage (where
    it embeds the tokens); later stages get it already scattered, in the hidden states' layout."""
    from megatron_swift.model import unwrap

    gpt = unwrap(model)
    if padding_mask is None or not gpt.config.num_moe_experts:
        return {}
    if gpt.config.sequence_parallel and not gpt.pre_process:
        from megatron.core import tensor_parallel

        padding_mask = tensor_parallel.scatter_to_sequence_parallel_region(
            padding_mask.transpose(0, 1).contiguous()).transpose(0, 1).contiguous()
    return {"padding_mask": padding_mask}


def forward_step(data_iterator: Iterator[dict], model):
    batch = next(data_iterator)
    labels = batch["labels"]
    loss_mask = labels.ne(IGNORE_INDEX)
    output = model(
        batch["input_ids"],
        batch["position_ids"],
        attention_mask=None,
        labels=labels.clamp(min=0),
        packed_seq_params=batch.get("packed_seq_params"),
        **_moe_padding_mask(model, batch.get("padding_mask")),
    )
    return output, partial(loss_func, loss_mask)


@dataclass
class StepResult:
    loss: float  # per-token mean over the global batch
    num_tokens: int  # loss tokens in the global batch
    grad_norm: Optional[float] = None
    update_successful: bool = True
    # further per-step means a forward step reports as ``{name: [sum, count]}`` (e.g. DPO rewards)
    metrics: dict = field(default_factory=dict)


def _global_loss(losses_reduced: list, metric_names: tuple = ()) -> tuple[float, int, dict]:
    """Sums (loss_sum, tokens) over microbatches, the pipeline (only the last stage has them)
    and data-parallel ranks, so every rank returns the same global numbers; the same for each
    ``[sum, count]`` report named in ``metric_names`` (returned as means)."""
    from megatron.core import parallel_state as ps

    from megatron_swift.platform import get_platform

    names = ("lm loss",) + tuple(metric_names)
    totals = torch.zeros(len(names), 2, dtype=torch.float64, device=get_platform().device)
    for item in losses_reduced:
        for i, name in enumerate(names):
            if name in item:
                totals[i] += item[name].to(totals)
    torch.distributed.all_reduce(totals, group=ps.get_pipeline_model_parallel_group())
    torch.distributed.all_reduce(totals, group=ps.get_data_parallel_group(with_context_parallel=True))
    values = totals.tolist()
    loss_sum, tokens = values[0]
    metrics = {name: s / c for name, (s, c) in zip(names[1:], values[1:]) if c > 0}
    return loss_sum / max(tokens, 1.0), int(tokens), metrics


def forward_backward(ddp_chunks: list, data_iterators, num_microbatches: int, seq_length: int,
                     micro_batch_size: int, forward_only: bool = False, objective=None) -> StepResult:
    """Forward + backward of all microbatches (grads finalized: DP-reduced and token-scaled).

    ``objective``: another training objective (``megatron rlhf``: megatron_swift/rlhf/objective.py),
    with ``forward_step`` (megatron's forward step function) and ``metric_names`` (its reports)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if len(ddp_chunks) > 1 and not isinstance(data_iterators, list):
        raise ValueError("virtual pipeline needs one data iterator per model chunk")
    losses = get_forward_backward_func()(
        forward_step_func=objective.forward_step if objective is not None else forward_step,
        data_iterator=data_iterators,
        model=ddp_chunks,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
    loss, tokens, metrics = _global_loss(losses, objective.metric_names if objective is not None else ())
    return StepResult(loss=loss, num_tokens=tokens, metrics=metrics)


def step_loss_tokens(microbatches: list) -> int:
    """Loss tokens of the whole global batch (this rank's micro batches summed over data-parallel
    ranks): what megatron divides the gradients by under ``calculate_per_token_loss``."""
    from megatron.core import parallel_state as ps

    from megatron_swift.platform import get_platform

    local = sum(int(mb["labels"].ne(IGNORE_INDEX).sum()) for mb in microbatches)
    total = torch.tensor([local], dtype=torch.int64, device=get_platform().device)
    torch.distributed.all_reduce(total, group=ps.get_data_parallel_group(with_context_parallel=True))
    return int(total.item())


def train_step(ddp_chunks: list, optimizer, data_iterators, num_microbatches: int, seq_length: int,
               micro_batch_size: int, loss_tokens: Optional[int] = None, objective=None) -> StepResult:
    """``loss_tokens``: the global batch's loss tokens (:func:`step_loss_tokens`), needed by MoE
    models to give router losses the same weight in every layout (model/moe_router.py)."""
    from megatron.core import parallel_state as ps

    from megatron_swift.model.moe_router import router_loss_scale

    from .model_setup import zero_grads

    zero_grads(ddp_chunks, optimizer)
    micro_batches = num_microbatches * ps.get_data_parallel_world_size()
    with router_loss_scale(loss_tokens, micro_batches) if loss_tokens is not None else contextlib.nullcontext():
        result = forward_backward(ddp_chunks, data_iterators, num_microbatches, seq_length, micro_batch_size,
                                  objective=objective)
    update_successful, grad_norm, _ = optimizer.step()
    result.update_successful = bool(update_successful)
    result.grad_norm = None if grad_norm is None else float(grad_norm)
    return result


def router_losses(config, num_microbatches: int) -> dict:
    """The MoE router losses of the last step (``load_balancing_loss``, ``z_loss``...), as megatron's
    tracker collected them: per micro batch and MoE layer, averaged; collective (every rank calls)."""
    if not config.num_moe_experts:
        return {}
    from megatron.core.transformer.moe.moe_utils import (clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker,
                                                         reduce_aux_losses_tracker_across_ranks)

    tracker = get_moe_layer_wise_logging_tracker()
    if not tracker:
        return {}
    reduce_aux_losses_tracker_across_ranks()
    freq = config.moe_layer_freq
    moe_layers = sum(freq) if isinstance(freq, list) else len(range(0, config.num_layers, freq))
    out = {name: float(entry["values"].sum()) / moe_layers / num_microbatches for name, entry in tracker.items()}
    clear_aux_losses_tracker()
    return out


def params_norm(ddp_chunks: list) -> float:
    """L2 norm of all model parameters, the same in every parallel layout (``--log_params_norm``):
    each tensor counted once (tensor-parallel duplicates and the tied embedding's copy skipped),
    dense parameters summed over TP x PP, expert parameters over expert-TP x EP x PP."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared

    from megatron_swift.model import unwrap
    from megatron_swift.platform import get_platform

    from .model_setup import finish_param_sync

    finish_param_sync(ddp_chunks)
    device = get_platform().device
    dense = torch.zeros((), dtype=torch.float64, device=device)
    expert = torch.zeros((), dtype=torch.float64, device=device)
    expert_tp = ps.get_expert_tensor_parallel_group()
    for chunk in ddp_chunks:
        for param in unwrap(chunk).parameters():
            is_expert = not getattr(param, "allreduce", True)
            if not param_is_not_shared(param) or not param_is_not_tensor_parallel_duplicate(
                    param, tp_group=expert_tp if is_expert else None):
                continue
            square = param.detach().double().pow(2).sum()
            if is_expert:
                expert += square
            else:
                dense += square
    torch.distributed.all_reduce(dense, group=ps.get_model_parallel_group())
    torch.distributed.all_reduce(expert, group=ps.get_expert_tensor_model_pipeline_parallel_group())
    return float((dense + expert).sqrt())
