"""Wraps built model chunks for training: megatron DDP + megatron's optimizer.

Both are megatron-core's own (``DistributedDataParallel``, ``get_megatron_optimizer``); this
module only fills their configs from our settings and wires the hooks the schedules call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_swift.model.builder import unwrap, use_gradient_accumulation_fusion  # noqa: F401  (unwrap: re-exported)


@dataclass
class OptimizerSettings:
    optimizer: str = "adam"  # adam | sgd
    lr: float = 1e-5
    min_lr: float = 0.0
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    sgd_momentum: float = 0.9
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = True
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    # Transformer Engine's precision-aware Adam (GPU): dtypes of main grads / params / moments
    use_precision_aware_optimizer: bool = False
    main_grads_dtype: str = "fp32"
    main_params_dtype: str = "fp32"
    exp_avg_dtype: str = "fp32"
    exp_avg_sq_dtype: str = "fp32"


def _experts_reduced_as_expert_parallel(chunks: list) -> None:
    """Routed-expert parameters take megatron's expert-parallel path even at EP = 1.

    megatron-core marks expert weights ``allreduce=False`` (reduced over the expert-data-parallel
    group, a separate optimizer in a ChainedOptimizer) only when EP > 1. The optimizer's checkpoint
    keys then depend on EP (``chained_0./chained_1.`` prefixes or none) and a checkpoint cannot move
    between EP = 1 and EP > 1. At EP = 1 the expert-data-parallel group is the data-parallel group,
    so the expert path computes the same sums; taking it always gives one key scheme for all layouts.
    """
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            if ".mlp.experts." in name:
                param.allreduce = False


def finish_param_sync(chunks: list) -> None:
    """Makes every rank's parameters whole after an optimizer step.

    With ``--overlap_param_gather`` the distributed optimizer updates only this rank's shard; the
    other shards arrive during the next forward pass (megatron's forward pre-hooks). Whatever reads
    the parameters between steps (the params norm, a checkpoint and its HF copy) gathers them first,
    as Megatron-LM does around its saves. The next forward then finds the gather done."""
    for chunk in chunks:
        ddp_config = getattr(chunk, "ddp_config", None)
        if ddp_config is not None and ddp_config.overlap_param_gather:
            chunk.start_param_sync(force_sync=True)


def wrap_ddp(chunks: list, config, settings: OptimizerSettings) -> list:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    _experts_reduced_as_expert_parallel(chunks)

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=settings.overlap_grad_reduce,
        overlap_param_gather=settings.overlap_param_gather,
        use_distributed_optimizer=settings.use_distributed_optimizer,
        # Off: megatron checks each rank's local gradients before the all-reduce and raises on that rank
        # alone (the others then wait in the collective until the timeout), reporting iteration -1.
        # The loop checks the global loss and gradient norm instead (trainer/loop.py); fp16's loss
        # scaler finds overflows itself.
        check_for_nan_in_grad=False,
        bucket_size=None,
        average_in_collective=False,
    )
    wrapped = [
        DistributedDataParallel(
            config=config, ddp_config=ddp_config, module=chunk,
            # one bucket per chunk keeps CPU runs simple; only the first chunk overlaps
            disable_bucketing=(i > 0),
        )
        for i, chunk in enumerate(chunks)
    ]
    use_gradient_accumulation_fusion(chunks, bool(config.gradient_accumulation_fusion))  # main_grad exists now
    return wrapped


_DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _precision_aware(settings: OptimizerSettings) -> dict:
    if not settings.use_precision_aware_optimizer:
        return {}
    out = {"use_precision_aware_optimizer": True}
    for name in ("main_grads_dtype", "main_params_dtype", "exp_avg_dtype", "exp_avg_sq_dtype"):
        value = getattr(settings, name)
        out[name] = torch.uint8 if value == "fp8" else _DTYPE_NAMES[value]  # megatron spells fp8 moments uint8
    return out


def build_optimizer(ddp_chunks: list, config, settings: OptimizerSettings, param_group_overrides=None):
    """``param_group_overrides``: extra megatron-core ``{ParamKey: ParamGroupOverride}`` (LoRA+), on
    top of megatron's standard ones (no weight decay for biases and norms)."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer, get_standard_config_overrides

    opt_config = OptimizerConfig(
        optimizer=settings.optimizer,
        lr=settings.lr,
        min_lr=settings.min_lr,
        weight_decay=settings.weight_decay,
        adam_beta1=settings.adam_beta1,
        adam_beta2=settings.adam_beta2,
        adam_eps=settings.adam_eps,
        sgd_momentum=settings.sgd_momentum,
        clip_grad=settings.clip_grad,
        bf16=config.bf16,
        fp16=config.fp16,
        params_dtype=config.params_dtype,
        use_distributed_optimizer=settings.use_distributed_optimizer,
        **_precision_aware(settings),
    )
    overrides = None
    if param_group_overrides:
        overrides = {**get_standard_config_overrides(opt_config), **param_group_overrides}
    optimizer = get_megatron_optimizer(opt_config, ddp_chunks, config_overrides=overrides)
    _fused_torch_adam(optimizer)
    # The hooks megatron's schedules call: grad sync/scaling after the last microbatch, loss
    # scaling for fp16, and no_sync across microbatches.
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = [chunk.no_sync for chunk in ddp_chunks]
    if len(ddp_chunks) == 1:
        config.no_sync_func = config.no_sync_func[0]
    return optimizer


def _fused_torch_adam(optimizer) -> None:
    """Where megatron falls back to torch's Adam/AdamW (no Transformer Engine / apex FusedAdam), run
    torch's fused implementation: for CPU tensors torch otherwise picks its per-tensor Python loop
    (eight ops a parameter, 17 ms of a 210 ms CPU step). ``swift sft`` trains with the same
    (``adamw_torch_fused``)."""
    from megatron_swift.platform.mcore_compat import torch_adam_parts

    for part in torch_adam_parts(optimizer):
        for group in part.optimizer.param_groups:
            group.update(fused=True, foreach=False)
        part.optimizer.defaults.update(fused=True, foreach=False)


def zero_grads(ddp_chunks: list, optimizer) -> None:
    for chunk in ddp_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()


def model_parameters(ddp_chunks: list) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, p) for chunk in ddp_chunks for name, p in unwrap(chunk).named_parameters()]


def grad_of(param: torch.nn.Parameter) -> Optional[torch.Tensor]:
    return getattr(param, "main_grad", None) if getattr(param, "main_grad", None) is not None else param.grad


def global_parameter_names(chunk: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """``named_parameters`` with each decoder layer's index made global (pipeline stages and
    virtual chunks number their layers from 0; ``layer_number`` is global and 1-based)."""
    import re

    model = unwrap(chunk)
    offsets = {}
    decoder = getattr(model, "decoder", None)
    for local, layer in enumerate(getattr(decoder, "layers", [])):
        offsets[local] = layer.layer_number - 1
    out = []
    for name, param in model.named_parameters():
        match = re.match(r"decoder\.layers\.(\d+)\.", name)
        if match:
            name = f"decoder.layers.{offsets[int(match.group(1))]}." + name[match.end():]
        out.append((name, param))
    return out


def apply_freezing(chunks: list, num_layers: int, freeze_parameters=(), freeze_parameters_regex=None,
                   freeze_parameters_ratio: float = 0.0, trainable_parameters=(),
                   trainable_parameters_regex=None) -> int:
    """Full-training freezing, by mcore parameter names with global layer indices
    (``embedding.``, ``decoder.layers.3.``, ``decoder.final_layernorm``, ``output_layer``):
    prefixes / a regex to freeze, ``freeze_parameters_ratio`` freezes the embedding and the first
    ``round(ratio x num_layers)`` layers (bottom up); ``trainable_parameters*`` win over freezing.
    Call before wrapping in DDP. Returns how many parameter tensors were frozen on this rank."""
    import re

    freeze_re = re.compile(freeze_parameters_regex) if freeze_parameters_regex else None
    train_re = re.compile(trainable_parameters_regex) if trainable_parameters_regex else None
    frozen_layers = round(freeze_parameters_ratio * num_layers)
    count = 0
    for chunk in chunks:
        for name, param in global_parameter_names(chunk):
            freeze = any(name.startswith(p) for p in freeze_parameters) or bool(freeze_re and freeze_re.search(name))
            if frozen_layers:
                layer = re.match(r"decoder\.layers\.(\d+)\.", name)
                freeze |= name.startswith("embedding.") or bool(layer and int(layer.group(1)) < frozen_layers)
            if any(name.startswith(p) for p in trainable_parameters) or bool(train_re and train_re.search(name)):
                freeze = False
            if freeze:
                param.requires_grad_(False)
                count += 1
    return count
