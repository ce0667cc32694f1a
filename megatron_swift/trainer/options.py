"""Parsed ``megatron pt/sft`` arguments -> the typed settings each training component takes.

The argument dataclasses use the user's names (SPEC.md); megatron-core uses its own field names.
This is the one place that translates, so the model builder, optimizer, loop and checkpointing stay
unaware of the CLI. ``training_settings(args)`` reads every argument the trainer uses (the data
and template layers read theirs through ``DataOptions.from_args`` / ``template_from_args``);
tests/test_argument_usage.py checks that, with the refusal rules of ``args/support.py``, this
covers every argument.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from megatron_swift.platform import ParallelLayout

from .model_setup import OptimizerSettings
from .profiling import ProfileSettings

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# user name -> TransformerConfig field, copied when the user gave a value (None = from config.json)
_RENAMED = {
    "num_experts": "num_moe_experts",
    "norm_epsilon": "layernorm_epsilon",
    "decoder_first_pipeline_num_layers": "num_layers_in_first_pipeline_stage",
    "decoder_last_pipeline_num_layers": "num_layers_in_last_pipeline_stage",
    "max_position_embeddings": "max_sequence_length",  # GPTModel's (RoPE is prepared up to it)
}
_SAME_NAME = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
    "add_qkv_bias", "qk_layernorm", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size",
    "moe_router_topk", "moe_router_pre_softmax", "moe_aux_loss_coeff", "moe_z_loss_coeff",
    "moe_expert_capacity_factor", "moe_grouped_gemm", "padded_vocab_size", "rotary_base",
    "apply_query_key_layer_scaling",
)
_ALWAYS = (
    "sequence_parallel", "calculate_per_token_loss", "moe_token_dispatcher_type", "moe_router_dtype",
    "moe_router_load_balancing_type", "moe_permute_fusion", "attention_softmax_in_fp32", "deterministic_mode",
    "cross_entropy_loss_fusion", "cross_entropy_fusion_impl", "attention_dropout", "hidden_dropout",
    "moe_enable_deepep", "moe_shared_expert_overlap", "use_cpu_initialization",
)
# positive fusion flag -> the TransformerConfig field; None = the platform decides by capability
_FUSIONS = {
    "masked_softmax_fusion": "masked_softmax_fusion",
    "bias_dropout_fusion": "bias_dropout_fusion",
    "bias_swiglu_fusion": "bias_activation_fusion",
    "apply_rope_fusion": "apply_rope_fusion",
    "gradient_accumulation_fusion": "gradient_accumulation_fusion",
}


def parallel_layout(args) -> ParallelLayout:
    return ParallelLayout.from_args(args)


def params_dtype(args) -> torch.dtype:
    if args.bf16:
        return torch.bfloat16
    if args.fp16:
        return torch.float16
    return _DTYPES.get(args.torch_dtype or "float32", torch.float32)


def _fusion(args, name: str) -> Optional[bool]:
    """True/False when the user decided (the positive flag, or its no_* flag); None = when available."""
    negative = f"no_{name.replace('apply_', '')}"
    if getattr(args, negative):
        return False
    return getattr(args, name)


def model_overrides(args) -> dict:
    """TransformerConfig/GPTSettings overrides for ``megatron_swift.model.build_model``.

    Fusions left to the machine are absent here; the platform turns on what it has
    (``Platform.adjust_model_fields``)."""
    overrides = {name: getattr(args, name) for name in _ALWAYS}
    for user_name in _SAME_NAME:
        if getattr(args, user_name) is not None:
            overrides[user_name] = getattr(args, user_name)
    for user_name, config_field in _RENAMED.items():
        if getattr(args, user_name) is not None:
            overrides[config_field] = getattr(args, user_name)
    if args.moe_router_load_balancing_type in ("sinkhorn", "none") and args.moe_aux_loss_coeff is None:
        overrides["moe_aux_loss_coeff"] = 0.0  # no auxiliary loss (config.json's coefficient does not apply)
    if args.untie_embeddings_and_output_weights is not None:
        overrides["share_embeddings_and_output_weights"] = not args.untie_embeddings_and_output_weights
    overrides["add_bias_linear"] = not args.disable_bias_linear
    for user_name, config_field in _FUSIONS.items():
        decided = _fusion(args, user_name)
        if decided is not None:
            overrides[config_field] = decided
    if args.attention_backend != "auto":
        overrides["attention_backend"] = args.attention_backend
    dtype = params_dtype(args)
    overrides.update(params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16)
    if args.apply_query_key_layer_scaling is None and dtype == torch.float16:
        overrides["apply_query_key_layer_scaling"] = True  # the seed's default: on with fp16
    method, num_layers = args.recompute_method, args.recompute_num_layers  # set only with "full" (validated)
    if args.recompute_granularity != "none":
        overrides["recompute_granularity"] = args.recompute_granularity
        if args.recompute_granularity == "full":
            overrides.update(recompute_method=method, recompute_num_layers=num_layers)
        else:
            overrides["recompute_modules"] = list(args.recompute_modules)
    overrides["perform_initialization"] = not args.no_initialization
    overrides.update(args.extra_megatron_kwargs or {})
    return overrides


def optimizer_settings(args) -> OptimizerSettings:
    return OptimizerSettings(
        optimizer=args.optimizer, lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
        sgd_momentum=args.sgd_momentum, clip_grad=args.clip_grad,
        use_distributed_optimizer=args.use_distributed_optimizer,
        overlap_grad_reduce=args.overlap_grad_reduce, overlap_param_gather=args.overlap_param_gather,
        use_precision_aware_optimizer=args.use_precision_aware_optimizer,
        main_grads_dtype=args.main_grads_dtype, main_params_dtype=args.main_params_dtype,
        exp_avg_dtype=args.exp_avg_dtype, exp_avg_sq_dtype=args.exp_avg_sq_dtype,
    )


@dataclass
class ModelSource:
    """Where the model comes from and how its config is read."""

    model: str
    model_dir: Optional[str]  # None for a hub id until it is downloaded
    model_type: Optional[str]
    use_hf: bool = False
    hub_token: Optional[str] = None
    model_revision: Optional[str] = None
    trust_remote_code: bool = False
    rope_scaling: Optional[dict] = None  # replaces config.json's rope scaling
    transformer_impl: Optional[str] = None  # "local" forces megatron's local spec on a TE machine


@dataclass
class CheckpointSettings:
    save: str  # before add_version's v<N>-<timestamp>
    add_version: bool = True
    save_interval: Optional[int] = None
    save_total_limit: Optional[int] = None
    save_optim: bool = True
    save_rng: bool = True
    save_safetensors: bool = False
    async_save: bool = False
    load: Optional[str] = None
    finetune: bool = False
    load_optim: bool = True
    load_rng: bool = True
    overwrite: bool = False  # --overwrite_output_dir: a fresh run replaces the checkpoints in --save
    # LoRA: checkpoints hold the trainable parameters only (adapters, modules_to_save); the base
    # comes from --model / --load, the adapter checkpoint to resume from is --adapter_load
    adapter_only: bool = False
    adapter_load: Optional[str] = None


@dataclass
class ExitSettings:
    """When a run saves and exits early (preemption, time slots); it resumes with --load = --save."""

    signal_handler: bool = False  # SIGTERM / SIGUSR1
    interval: Optional[int] = None  # every N-th iteration
    duration_minutes: Optional[float] = None


@dataclass
class LoggingSettings:
    log_interval: int = 5
    report_to: frozenset = frozenset({"tensorboard"})  # of tensorboard, wandb, swanlab
    tensorboard_dir: Optional[str] = None  # default <save>/runs
    tensorboard_log_interval: int = 1
    tensorboard_queue_size: int = 50
    log_timers: bool = True
    log_memory: bool = True
    log_validation_ppl: bool = True
    log_learning_rate: bool = True
    log_params_norm: bool = False
    log_throughput: bool = False
    logging_level: Optional[str] = None
    wandb_project: Optional[str] = None
    wandb_exp_name: Optional[str] = None
    wandb_save_dir: Optional[str] = None
    profile: ProfileSettings = field(default_factory=ProfileSettings)


@dataclass
class FreezeSettings:
    freeze_parameters: list = field(default_factory=list)
    freeze_parameters_regex: Optional[str] = None
    freeze_parameters_ratio: float = 0.0
    trainable_parameters: list = field(default_factory=list)
    trainable_parameters_regex: Optional[str] = None


@dataclass
class TrainingSettings:
    command: str
    seed: int
    layout: ParallelLayout
    source: ModelSource
    model_overrides: dict
    optimizer: OptimizerSettings
    checkpoint: CheckpointSettings
    logging: LoggingSettings
    freeze: FreezeSettings
    exit: ExitSettings
    # how long to train: train_iters and/or max_epochs (with both, whichever ends first)
    train_iters: Optional[int] = None
    max_epochs: Optional[int] = None
    lr_decay_style: str = "cosine"
    lr_decay_iters: Optional[int] = None
    lr_warmup_iters: int = 0
    lr_warmup_fraction: Optional[float] = None
    eval_iters: int = -1
    eval_interval: Optional[int] = None
    global_batch_size: int = 16
    micro_batch_size: int = 1
    distributed_backend: Optional[str] = None
    timeout_seconds: int = 18000000
    prefetch_steps: int = 0  # micro-batch groups a background thread prepares ahead
    manual_gc: bool = False
    manual_gc_interval: int = 0
    dataset_preview: int = 0
    lora: Optional["LoraSettings"] = None  # noqa: F821  (--train_type lora)


def lora_settings(args):
    """``--train_type lora``: the adapter settings (megatron_swift.tuners.lora); None for full training."""
    if args.train_type != "lora":
        return None
    from megatron_swift.tuners.lora import LoraSettings

    return LoraSettings(
        rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout, bias=args.lora_bias,
        dtype=_DTYPES[args.lora_dtype] if args.lora_dtype else None, use_rslora=args.use_rslora,
        init_weights=str(args.init_weights).lower(), target_modules=tuple(args.target_modules),
        target_regex=args.target_regex, modules_to_save=tuple(args.modules_to_save), seed=args.seed,
        lorap_lr_ratio=args.lorap_lr_ratio, peft_adapter=args.adapters[0] if args.adapters else None)


def _report_to(args) -> frozenset:
    targets = set(args.report_to or ["tensorboard"])
    if "all" in targets:
        from megatron_swift.args.capabilities import Capabilities

        caps = Capabilities.detect()
        targets = {"tensorboard"} | ({"wandb"} if caps.wandb else set()) | ({"swanlab"} if caps.swanlab else set())
    if args.wandb_project:
        targets.add("wandb")
    targets.discard("none")
    return frozenset(targets)


def _rope_scaling(args) -> Optional[dict]:
    value = args.rope_scaling
    if value is None or isinstance(value, dict):
        return value
    return {"rope_type": value}  # a bare type name: its other fields come from config.json


def training_settings(args) -> TrainingSettings:
    """Every argument ``megatron pt/sft`` uses, read once, typed (the data and template layers read
    theirs through ``DataOptions.from_args`` and ``template_from_args``)."""
    return TrainingSettings(
        command=args.command,
        seed=args.seed,
        layout=parallel_layout(args),
        source=ModelSource(model=args.model, model_dir=args.model_dir, model_type=args.model_type,
                           use_hf=args.use_hf, hub_token=args.hub_token, model_revision=args.model_revision,
                           trust_remote_code=args.trust_remote_code, rope_scaling=_rope_scaling(args),
                           transformer_impl=args.transformer_impl),
        model_overrides=model_overrides(args),
        optimizer=optimizer_settings(args),
        checkpoint=CheckpointSettings(
            save=args.save, add_version=args.add_version, save_interval=args.save_interval,
            save_total_limit=args.save_total_limit, save_optim=not args.no_save_optim, save_rng=not args.no_save_rng,
            save_safetensors=args.save_safetensors, async_save=args.async_save, load=args.load,
            finetune=args.finetune, load_optim=not args.no_load_optim, load_rng=not args.no_load_rng,
            overwrite=args.overwrite_output_dir, adapter_only=args.train_type == "lora",
            adapter_load=args.adapter_load),
        exit=ExitSettings(signal_handler=args.exit_signal_handler, interval=args.exit_interval,
                          duration_minutes=args.exit_duration_in_mins),
        logging=LoggingSettings(
            log_interval=args.log_interval, report_to=_report_to(args), tensorboard_dir=args.tensorboard_dir,
            tensorboard_log_interval=args.tensorboard_log_interval, tensorboard_queue_size=args.tensorboard_queue_size,
            log_timers=args.log_timers_to_tensorboard, log_memory=args.log_memory_to_tensorboard,
            log_validation_ppl=args.log_validation_ppl_to_tensorboard,
            log_learning_rate=not args.no_log_learning_rate_to_tensorboard, log_params_norm=args.log_params_norm,
            log_throughput=args.log_throughput, logging_level=args.logging_level, wandb_project=args.wandb_project,
            wandb_exp_name=args.wandb_exp_name, wandb_save_dir=args.wandb_save_dir,
            profile=ProfileSettings(enabled=bool(args.profile) & bool(args.use_pytorch_profiler),
                                    step_start=args.profile_step_start, step_end=args.profile_step_end,
                                    ranks=list(args.profile_ranks))),
        freeze=FreezeSettings(
            freeze_parameters=list(args.freeze_parameters), freeze_parameters_regex=args.freeze_parameters_regex,
            freeze_parameters_ratio=args.freeze_parameters_ratio, trainable_parameters=list(args.trainable_parameters),
            trainable_parameters_regex=args.trainable_parameters_regex),
        train_iters=args.train_iters, max_epochs=args.max_epochs, lr_decay_style=args.lr_decay_style,
        lr_decay_iters=args.lr_decay_iters, lr_warmup_iters=args.lr_warmup_iters,
        lr_warmup_fraction=args.lr_warmup_fraction, eval_iters=args.eval_iters, eval_interval=args.eval_interval,
        global_batch_size=args.global_batch_size, micro_batch_size=args.micro_batch_size,
        distributed_backend=args.distributed_backend, timeout_seconds=args.ddp_timeout,
        prefetch_steps=args.num_workers, manual_gc=args.manual_gc, manual_gc_interval=args.manual_gc_interval,
        dataset_preview=args.dataset_preview, lora=lora_settings(args),
    )
