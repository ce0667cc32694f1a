"""Cross-argument validation and defaults derived from the HF ``config.json`` (stdlib only).

Called once by :func:`megatron_swift.args.parse_args`, before any relaunch; fills the derived
fields (``world_size``, ``data_parallel_size``, ``num_micro_batches``, ``hf_config``,
``model_dir``) and the defaults that depend on other arguments, so later code can trust them.
"""
from __future__ import annotations

import json
import os
import re
from typing import List, Mapping, Optional

from megatron_swift.args.capabilities import Capabilities
from megatron_swift.args.dist_env import is_torchrun_worker
from megatron_swift.args.errors import ArgumentError
from megatron_swift.args.support import check_support
from megatron_swift.checkpoint import layout
from megatron_swift.args.sections import DPO_LOSS_TYPES, DTYPES, GRPO_LOSS_TYPES, KTO_LOSS_TYPES
from megatron_swift.model.shapes import EXPERT_KEYS  # torch-free, like the rest of the model's families layer

HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
SHARD_SIZE_RE = re.compile(r"^\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?$", re.IGNORECASE)


def validate(args, world_size: int, env: Optional[Mapping[str, str]] = None,
             caps: Optional[Capabilities] = None) -> None:
    """Validate ``args`` in place and fill its derived fields. Raises ArgumentError.

    ``env`` (launch environment) only matters inside torchrun workers: checks that other ranks'
    work could invalidate (an export output_dir that rank 0 already created) run on rank 0 only.
    ``caps`` (what this machine can run) is detected from ``env`` unless given (tests play a GPU host).
    """
    if args.command == "rollout":
        _check_rollout_server(args)
        return
    training = args.command in ("pt", "sft", "rlhf")
    caps = caps or Capabilities.detect(env)
    if training:
        _check_training_flags(args)
    else:
        _check_export_flags(args)
    _check_parallel_flags(args)
    check_support(args, caps)
    _resolve_timeout(args)
    _resolve_model(args)
    _resolve_dtype(args)
    _check_world(args, world_size)
    _check_context_parallel_backend(args, caps)
    _check_model_shape(args)
    if training:
        from megatron_swift.data.checks import check_dataset_args  # stdlib only, like this module

        check_dataset_args(args)
        _check_moe_layout(args, caps)
        _check_model_overrides(args)
        _check_extra_megatron_kwargs(args)
        _check_training_paths(args)
        _resolve_training_defaults(args)
        _resolve_machine_defaults(args, caps)
        _check_save_dir(args)
    if args.command == "rlhf":
        _check_rlhf(args)
    if args.command == "export":
        env = {} if env is None else env
        _resolve_export(args, first_rank=not is_torchrun_worker(env) or env.get("RANK", "0") == "0")


# ---------------------------------------------------------------------------------------- helpers

def _check_rollout_server(args) -> None:
    """``megatron rollout``: a local model directory, and only what the server builds."""
    if not args.model:
        raise ArgumentError("megatron rollout: --model is required (a local Hugging Face model directory)")
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise ArgumentError(f"--model {args.model}: not a local Hugging Face model directory (no config.json)")
    if args.vllm_tensor_parallel_size != 1:
        raise ArgumentError(f"--vllm_tensor_parallel_size {args.vllm_tensor_parallel_size}: the rollout server runs "
                            "one in-process vLLM engine (tensor parallel 1); start several servers for more")



def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _fmt(values) -> str:
    return ", ".join(str(v) for v in values)


def _text_config(cfg: Optional[dict]) -> dict:
    """The language-model part of a (possibly multimodal) HF config."""
    if not cfg:
        return {}
    for key in ("text_config", "llm_config", "language_config"):
        sub = cfg.get(key)
        if isinstance(sub, dict) and "num_attention_heads" not in cfg:
            return {**cfg, **sub}
    return cfg


def _model_label(args) -> str:
    return f"model '{args.model}'" if args.model else "the model"


def _legacy_checkpoint(path: str) -> Optional[str]:
    """The iteration dir of a Megatron-LM legacy (per-rank ``mp_rank_XX/model_optim_rng.pt``)
    checkpoint in ``path``, or None."""
    try:
        entries = [e for e in os.listdir(path) if e.startswith("iter_") or e == layout.RELEASE]
    except OSError:
        return None
    for entry in entries:
        sub = os.path.join(path, entry)
        if os.path.isdir(sub) and any(e.startswith("mp_rank_") for e in os.listdir(sub)):
            return sub
    return None


def _check_checkpoint_dir(name: str, path: str, require_checkpoint: bool, detect_legacy: bool = True) -> None:
    """``path`` exists and (when required) resolves to a complete checkpoint: the rule of
    ``megatron_swift.checkpoint.layout.resolve``, the same the trainer and the converters use."""
    full = os.path.expanduser(path)
    if not os.path.isdir(full):
        if not require_checkpoint:
            return  # --exit_on_missing_checkpoint false: nothing to resume yet, start fresh
        raise ArgumentError(f"argument --{name}: directory '{path}' does not exist")
    legacy = _legacy_checkpoint(full) if detect_legacy else None
    if legacy:
        raise ArgumentError(f"argument --{name}: {legacy} is a legacy per-rank torch checkpoint (mp_rank_*); "
                            f"megatron-swift reads torch_dist checkpoints (convert it with Megatron-LM's "
                            f"checkpoint converter, or start from the Hugging Face model)")
    try:
        ref = layout.resolve(full)
    except layout.CheckpointError as exc:
        raise ArgumentError(f"argument --{name}: {exc}") from None
    if ref is None and require_checkpoint:
        partial = [e for e in os.listdir(full) if e.endswith(".tmp")]
        why = f"only the unfinished save(s) {', '.join(sorted(partial))}" if partial else \
            f"no {layout.TRACKER} and no complete iter_* directory"
        hint = ""
        if os.path.basename(os.path.normpath(full)).startswith("iter_"):
            hint = f"; point --{name} at its parent directory (it is an unfinished iteration directory)"
        raise ArgumentError(f"argument --{name}: '{path}' holds no complete mcore checkpoint ({why}){hint}")


def _model_from_args_json(path: Optional[str]) -> Optional[str]:
    """ms-swift's load_args: the ``model`` recorded in ``<checkpoint>/args.json``."""
    model = layout.read_args_json(path).get("model") if path else None
    return model if isinstance(model, str) and model else None


# ----------------------------------------------------------------------------------- flag checks

def _check_training_flags(args) -> None:
    if args.train_iters is None and args.max_epochs is None:
        raise ArgumentError("argument --train_iters or --max_epochs (num_train_epochs) is required")
    if args.streaming and args.train_iters is None:
        raise ArgumentError("argument --train_iters is required with --streaming true (a streamed dataset has no "
                            "length, so --max_epochs cannot give the number of iterations; with both, training "
                            "stops at whichever comes first)")
    if args.lr_warmup_iters and args.lr_warmup_fraction is not None:
        raise ArgumentError(f"arguments --lr_warmup_iters ({args.lr_warmup_iters}) and --lr_warmup_fraction "
                            f"({args.lr_warmup_fraction}) are both given; give only one")
    decay_iters = args.lr_decay_iters or args.train_iters
    if args.lr_warmup_iters and decay_iters and args.lr_warmup_iters >= decay_iters:
        # megatron's scheduler asserts warmup < decay steps deep inside the workers
        raise ArgumentError(f"argument --lr_warmup_iters ({args.lr_warmup_iters}) must be smaller than the LR decay "
                            f"iterations ({decay_iters}: --lr_decay_iters, default --train_iters)")
    if args.recompute_granularity == "full" and (args.recompute_method is None or args.recompute_num_layers is None):
        raise ArgumentError("argument --recompute_granularity full needs --recompute_method (uniform|block) and "
                            "--recompute_num_layers (e.g. --recompute_method uniform --recompute_num_layers 1)")
    if args.overlap_param_gather and args.overlap_grad_reduce is None:
        args.overlap_grad_reduce = True
    if args.overlap_param_gather and not (args.use_distributed_optimizer and args.overlap_grad_reduce):
        raise ArgumentError("argument --overlap_param_gather needs --use_distributed_optimizer true and "
                            "--overlap_grad_reduce true")
    if args.template_backend == "jinja":
        raise ArgumentError("argument --template_backend: 'jinja' supports inference only; use 'swift' for training")
    if args.profile and not args.use_pytorch_profiler:
        raise ArgumentError("argument --profile: CUDA profiler ranges for Nsight Systems are not built; add "
                            "--use_pytorch_profiler true (torch.profiler, a trace and a summary per rank)")
    if args.profile and args.profile_step_end <= args.profile_step_start:
        raise ArgumentError(f"argument --profile_step_end ({args.profile_step_end}) must be greater than "
                            f"--profile_step_start ({args.profile_step_start})")
    if not args.dataset:
        raise ArgumentError("argument --dataset is required for training")
    if args.interleave_prob is not None and len(args.interleave_prob) != len(args.dataset):
        raise ArgumentError(f"argument --interleave_prob: {len(args.interleave_prob)} probabilities for "
                            f"{len(args.dataset)} datasets")
    if args.train_type != "lora":
        for name in ("adapter_load", "adapters"):
            if getattr(args, name):
                raise ArgumentError(f"argument --{name} needs --train_type lora")
    if args.command == "rlhf" and args.generation_batch_size is not None and args.steps_per_generation is not None:
        raise ArgumentError("arguments --generation_batch_size and --steps_per_generation are both given; "
                            "give only one")


def _check_export_flags(args) -> None:
    if args.to_mcore == args.to_hf:
        which = "both" if args.to_mcore else "neither"
        raise ArgumentError(f"arguments --to_mcore and --to_hf: exactly one must be true ({which} given)")
    if not SHARD_SIZE_RE.match(args.max_shard_size.strip()):
        raise ArgumentError(f"argument --max_shard_size: expected a size like 5GB or 500MB, "
                            f"got {args.max_shard_size!r}")


def _check_parallel_flags(args) -> None:
    if args.sequence_parallel and args.tensor_model_parallel_size == 1:
        raise ArgumentError("argument --sequence_parallel needs --tensor_model_parallel_size > 1 "
                            "(it splits the sequence across the TP ranks)")
    if args.virtual_pipeline_model_parallel_size is not None and args.pipeline_model_parallel_size == 1:
        raise ArgumentError("argument --virtual_pipeline_model_parallel_size needs "
                            "--pipeline_model_parallel_size > 1")
    if args.pipeline_model_parallel_size == 1:
        for name in ("decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers"):
            if getattr(args, name) is not None:
                raise ArgumentError(f"argument --{name} needs --pipeline_model_parallel_size > 1")


def _check_context_parallel_backend(args, caps: Capabilities) -> None:
    if args.context_parallel_size > 1 and not caps.transformer_engine:
        # megatron-core's local DotProductAttention (and our THD kernel built on it) has no
        # context-parallel attention; CP needs Transformer Engine's (GPU only).
        raise ArgumentError("argument --context_parallel_size > 1 needs Transformer Engine's attention "
                            "(pip install megatron-swift[gpu] on a CUDA machine); megatron-core's local "
                            "attention has no context parallelism")


def _check_moe_layout(args, caps: Capabilities) -> None:
    """MoE settings that cannot run with this layout or batch format (caught here, not in a worker)."""
    if _num_experts(args) is None:
        return
    dispatcher = args.moe_token_dispatcher_type
    if dispatcher == "flex" and not caps.deep_ep:
        raise ArgumentError("argument --moe_token_dispatcher_type flex needs DeepEP's GPU kernels (deep_ep is not "
                            "installed); use alltoall")
    tp, cp = args.tensor_model_parallel_size, args.context_parallel_size
    ep = args.expert_model_parallel_size
    etp = args.expert_tensor_parallel_size or tp
    if dispatcher == "allgather" and ep > 1 and (tp * cp) % (ep * etp) and args.pipeline_model_parallel_size == 1:
        # The allgather dispatcher gathers equal-sized token blocks over the expert group. Ranks of one
        # TP x CP group hold equal shares of the same micro batch; ranks of different data-parallel
        # replicas hold different micro batches, whose sizes vary (pipeline parallelism fixes them).
        raise ArgumentError(
            f"argument --moe_token_dispatcher_type allgather: the expert-parallel group "
            f"(--expert_model_parallel_size {ep} x --expert_tensor_parallel_size {etp}) spans data-parallel "
            f"replicas whose micro batches differ in size; use --moe_token_dispatcher_type alltoall (or keep "
            f"expert_model_parallel_size x expert_tensor_parallel_size within tensor_model_parallel_size "
            f"x context_parallel_size = {tp * cp})")
    balancing = args.moe_router_load_balancing_type
    if balancing == "seq_aux_loss" and (args.padding_free or args.packing):
        raise ArgumentError("argument --moe_router_load_balancing_type seq_aux_loss balances each row of a micro "
                            "batch, and a padding-free or packed row holds several sequences; use "
                            "--padding_free false (and --packing false), or --moe_router_load_balancing_type "
                            "aux_loss")
    if balancing == "sinkhorn" and (args.moe_aux_loss_coeff or 0) > 0:
        raise ArgumentError(f"argument --moe_aux_loss_coeff {args.moe_aux_loss_coeff}: sinkhorn routing has no "
                            f"auxiliary loss; leave --moe_aux_loss_coeff unset (or 0) with "
                            f"--moe_router_load_balancing_type sinkhorn")


def _resolve_timeout(args) -> None:
    """--distributed_timeout_minutes and --ddp_timeout set the same process-group timeout."""
    minutes = getattr(args, "distributed_timeout_minutes", None)
    if minutes is None:
        return
    if "ddp_timeout" in args.explicit_args and args.ddp_timeout != minutes * 60:
        raise ArgumentError(f"arguments --distributed_timeout_minutes {minutes} and --ddp_timeout {args.ddp_timeout} "
                            f"(seconds) set the same timeout differently; give one of them")
    args.ddp_timeout = minutes * 60


# model shape overrides -> the config.json keys they contradict when weights of that shape are loaded
_SHAPE_KEYS = {
    "num_layers": ("num_hidden_layers",),
    "hidden_size": ("hidden_size",),
    "ffn_hidden_size": ("intermediate_size",),
    "num_attention_heads": ("num_attention_heads",),
    "num_query_groups": ("num_key_value_heads",),
    "kv_channels": ("head_dim",),
}


def _has_weights(args) -> bool:
    if args.load:
        return True
    return bool(args.model_dir) and any(name.endswith(".safetensors") for name in os.listdir(args.model_dir))


def _check_model_overrides(args) -> None:
    """Shape overrides reshape the model: fine for a model trained from scratch, a contradiction when
    weights of another shape are loaded (named here rather than as a shape error in a worker)."""
    cfg = _text_config(args.hf_config)
    weights = args.hf_config is not None and _has_weights(args)
    for name, keys in _SHAPE_KEYS.items():
        value = getattr(args, name, None)
        saved = _first(cfg, *keys)
        if value is not None and weights and saved is not None and saved != value:
            raise ArgumentError(f"argument --{name} {value}: the weights being loaded have {keys[0]} = {saved} "
                                f"(config.json); shape overrides apply to models trained from scratch")
    if args.normalization == "LayerNorm":
        raise ArgumentError("argument --normalization LayerNorm: the supported model families use RMSNorm")
    heads = args.num_attention_heads or _first(cfg, "num_attention_heads")
    groups = args.num_query_groups or _first(cfg, "num_key_value_heads") or heads
    if args.group_query_attention is not None and heads is not None and groups is not None:
        if args.group_query_attention != (groups < heads):
            raise ArgumentError(f"argument --group_query_attention {str(args.group_query_attention).lower()}: the "
                                f"model has {groups} KV heads for {heads} attention heads")
    if args.no_initialization and "no_initialization" in args.explicit_args and args.hf_config is not None \
            and not _has_weights(args):
        raise ArgumentError(f"argument --no_initialization true: {args.model} has no weights (no *.safetensors and "
                            f"no --load), so the model would train uninitialised; leave it unset to initialise it")


def _check_extra_megatron_kwargs(args) -> None:
    extra = args.extra_megatron_kwargs
    if not extra:
        return
    # The only place argument checking imports megatron-core: TransformerConfig's field names.
    import dataclasses
    import difflib

    from megatron.core.transformer import TransformerConfig

    known = [f.name for f in dataclasses.fields(TransformerConfig)]
    unknown = sorted(set(extra) - set(known))
    if unknown:
        hints = []
        for name in unknown:
            near = difflib.get_close_matches(name, known, n=2)
            hints.append(f"{name} (did you mean {' or '.join(near)}?)" if near else name)
        raise ArgumentError(f"argument --extra_megatron_kwargs (--megatron_extra_kwargs): not TransformerConfig "
                            f"fields: {', '.join(hints)}")


# ------------------------------------------------------------------------------ model / HF config

def _resolve_model(args) -> None:
    if args.model is None:
        if args.command == "export":
            source = args.mcore_model if args.mcore_model is not None or not args.mcore_adapters \
                else args.mcore_adapters[0]
        else:  # under LoRA the adapter checkpoint also names its base
            source = args.load if args.load is not None or args.train_type != "lora" else args.adapter_load
        args.model = _model_from_args_json(source)
    if args.model is None:
        if args.command == "export" and args.to_hf:
            raise ArgumentError("argument --model is required with --to_hf (the HF model whose config and "
                                "tokenizer the output uses), unless --mcore_model has an args.json naming it")
        raise ArgumentError("argument --model is required (a hub id like Qwen/Qwen2.5-7B-Instruct or a local "
                            "Hugging Face model directory)")
    path = os.path.expanduser(args.model)
    if os.path.isdir(path):
        cfg_file = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_file):
            raise ArgumentError(f"argument --model: directory '{args.model}' has no config.json")
        try:
            with open(cfg_file, encoding="utf-8") as fh:
                cfg = json.load(fh)
        except (OSError, ValueError) as exc:
            raise ArgumentError(f"argument --model: cannot read '{cfg_file}': {exc}") from None
        if not isinstance(cfg, dict):
            raise ArgumentError(f"argument --model: '{cfg_file}' is not a JSON object")
        args.hf_config = cfg
        args.model_dir = os.path.abspath(path)
        _check_safetensors_files(args.model_dir)
        declared = cfg.get("model_type")
        if args.model_type and declared and args.model_type != declared:
            raise ArgumentError(f"argument --model_type {args.model_type}: {args.model} is a {declared!r} model "
                                f"(config.json); the family comes from config.json, leave --model_type unset")
        return
    if os.path.exists(path):
        raise ArgumentError(f"argument --model: '{args.model}' is a file, not a model directory")
    looks_like_path = (path.startswith(("/", ".", "~")) or "\\" in path or path.count("/") > 1)
    if looks_like_path:
        raise ArgumentError(f"argument --model: directory '{args.model}' does not exist")
    if not HUB_ID_RE.match(args.model):
        raise ArgumentError(f"argument --model: '{args.model}' is neither an existing directory nor a hub model id "
                            f"(org/name)")
    args.hf_config = None
    args.model_dir = None


def _config_dtype(cfg: dict) -> Optional[str]:
    text = _text_config(cfg)
    for key in ("torch_dtype", "dtype"):
        value = text.get(key, cfg.get(key))
        if isinstance(value, str):
            value = value.replace("torch.", "")
            if value in DTYPES:
                return value
    return "float32"  # transformers' default when config.json names none


def _resolve_dtype(args) -> None:
    has_flags = hasattr(args, "bf16")
    bf16 = args.bf16 if has_flags else None
    fp16 = args.fp16 if has_flags else None
    if bf16 and fp16:
        raise ArgumentError("arguments --bf16 and --fp16 are both true; give only one")
    implied = "bfloat16" if bf16 else "float16" if fp16 else None
    explicit_dtype = "torch_dtype" in args.explicit_args
    if explicit_dtype and implied is not None and args.torch_dtype != implied:
        flag = "bf16" if bf16 else "fp16"
        raise ArgumentError(f"argument --torch_dtype {args.torch_dtype} contradicts --{flag} true")
    if implied is not None:
        args.torch_dtype = implied
    elif args.torch_dtype is None and args.hf_config is not None:
        args.torch_dtype = _config_dtype(args.hf_config)
    if has_flags and args.torch_dtype is not None:
        # a flag explicitly false turns the model's dtype off
        if (bf16 is False and args.torch_dtype == "bfloat16") or (fp16 is False and args.torch_dtype == "float16"):
            if explicit_dtype:
                flag = "bf16" if args.torch_dtype == "bfloat16" else "fp16"
                raise ArgumentError(f"argument --torch_dtype {args.torch_dtype} contradicts --{flag} false")
            args.torch_dtype = "float32"
        args.bf16 = args.torch_dtype == "bfloat16"
        args.fp16 = args.torch_dtype == "float16"


def _first(cfg: dict, *keys):
    for key in keys:
        value = cfg.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _num_experts(args) -> Optional[int]:
    if getattr(args, "num_experts", None) is not None:
        return args.num_experts
    return _first(_text_config(args.hf_config), *EXPERT_KEYS)


def _check_model_shape(args) -> None:
    """The model layer's shape check (``megatron_swift.model.shapes``) on config.json plus the
    shape overrides of the command line."""
    from megatron_swift.model.shapes import LayoutError, check_layout, layout_of

    cfg = dict(_text_config(args.hf_config))
    for arg, key in (("num_attention_heads", "num_attention_heads"), ("num_query_groups", "num_key_value_heads"),
                     ("ffn_hidden_size", "intermediate_size"), ("num_layers", "num_hidden_layers")):
        if getattr(args, arg, None) is not None:
            cfg[key] = getattr(args, arg)
    if cfg.get("num_attention_heads") is None and cfg.get("n_head") is not None:
        cfg["num_attention_heads"] = cfg["n_head"]
    family = cfg.get("model_type") or getattr(args, "model_type", None)
    try:
        check_layout(family, cfg, layout_of(vars(args)), where=_model_label(args), num_experts=_num_experts(args),
                     training=args.command in ("sft", "pt", "rlhf"))
    except LayoutError as e:
        raise ArgumentError(f"argument --{e.argument.replace('/', '/--')}: {e.value} {e.detail}") from None


# ----------------------------------------------------------------------------------- world size

def _check_world(args, world_size: int) -> None:
    tp, pp, cp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.context_parallel_size
    model_parallel = tp * pp * cp
    if world_size % model_parallel:
        raise ArgumentError(
            f"arguments --tensor_model_parallel_size ({tp}) x --pipeline_model_parallel_size ({pp}) x "
            f"--context_parallel_size ({cp}) = {model_parallel} must divide the world size {world_size} "
            f"(NPROC_PER_NODE x NNODES, or WORLD_SIZE inside torchrun)")
    dp = world_size // model_parallel
    args.world_size = world_size
    args.data_parallel_size = dp
    ep = args.expert_model_parallel_size
    etp = args.expert_tensor_parallel_size or tp
    if ep > 1 or etp != tp:
        if etp == tp and (dp * cp) % ep:
            raise ArgumentError(
                f"argument --expert_model_parallel_size: {ep} must divide data_parallel_size x "
                f"context_parallel_size ({dp} x {cp} = {dp * cp}); valid values: {_fmt(_divisors(dp * cp))}")
        if world_size % (etp * ep * pp):
            raise ArgumentError(
                f"argument --expert_model_parallel_size: --expert_tensor_parallel_size ({etp}) x "
                f"--expert_model_parallel_size ({ep}) x --pipeline_model_parallel_size ({pp}) = {etp * ep * pp} "
                f"must divide the world size ({world_size})")
    if args.command == "export":
        return
    mbs, gbs = args.micro_batch_size, args.global_batch_size
    unit = mbs * dp
    if gbs % unit:
        lower = (gbs // unit) * unit
        near = [v for v in (lower, lower + unit) if v > 0]
        mbs_ok = [m for m in range(1, gbs + 1) if gbs % (m * dp) == 0][:8]
        alt = f"; or --micro_batch_size in {{{_fmt(mbs_ok)}}}" if mbs_ok else ""
        raise ArgumentError(
            f"argument --global_batch_size: {gbs} is not divisible by micro_batch_size ({mbs}) x "
            f"data_parallel_size ({dp}) = {unit}; valid global_batch_size values near it: {_fmt(near)}{alt}")
    args.num_micro_batches = gbs // unit


# ------------------------------------------------------------------------------------- training

def _check_resume_optimizer(args) -> None:
    """The distributed and the plain optimizer store their state differently: a resume cannot switch."""
    if args.finetune or args.no_load_optim:
        return
    saved = layout.read_args_json(args.load).get("use_distributed_optimizer")
    if isinstance(saved, bool) and saved != args.use_distributed_optimizer:
        raise ArgumentError(
            f"argument --use_distributed_optimizer {str(args.use_distributed_optimizer).lower()}: the checkpoint in "
            f"--load {args.load} holds the state of a {'distributed' if saved else 'plain'} optimizer; resume with "
            f"--use_distributed_optimizer {str(saved).lower()}, or load the model weights only with "
            f"--no_load_optim true")


def _check_training_paths(args) -> None:
    if args.load is not None:
        _check_checkpoint_dir("load", args.load, args.exit_on_missing_checkpoint, args.auto_detect_ckpt_format)
        _check_resume_optimizer(args)
    if args.adapter_load is not None:
        _check_checkpoint_dir("adapter_load", args.adapter_load, args.exit_on_missing_checkpoint)
    for path in args.adapters:
        if not os.path.isfile(os.path.join(os.path.expanduser(path), "adapter_config.json")):
            raise ArgumentError(f"argument --adapters {path}: not a PEFT adapter directory (no adapter_config.json)")
    if args.command == "rlhf":
        if args.ref_load is not None:
            _check_checkpoint_dir("ref_load", args.ref_load, args.exit_on_missing_checkpoint)
        if args.ref_adapter_load is not None:
            _check_checkpoint_dir("ref_adapter_load", args.ref_adapter_load, args.exit_on_missing_checkpoint)


def _writable(path: str) -> Optional[str]:
    """None when ``path`` (or the directory it would be created in) is writable, else why not."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        return f"{probe} is a file"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable"
    return None


def _check_save_dir(args) -> None:
    """A --save directory that already holds a run is resumed (--load pointing at it) or refused:
    training into it from scratch would overwrite its checkpoints and append to its logging.jsonl."""
    save = os.path.expanduser(args.save)
    problem = _writable(save)
    if problem:
        raise ArgumentError(f"argument --save {args.save}: {problem}")
    resumed_from = args.adapter_load if args.train_type == "lora" else args.load  # LoRA: --load is the base
    resuming = resumed_from is not None and os.path.abspath(os.path.expanduser(resumed_from)) == os.path.abspath(save)
    if args.add_version and not resuming:
        return  # a new v<N>-<timestamp> directory inside it
    if resuming or args.overwrite_output_dir or not os.path.isdir(save):
        return
    try:
        existing = layout.resolve(save)
        what = f"the checkpoints of a run (latest: {os.path.basename(existing.directory)})" if existing else None
    except layout.CheckpointError as exc:
        what = f"checkpoints ({exc})"
    if what:
        how = "--adapter_load" if args.train_type == "lora" else "--load"
        raise ArgumentError(f"argument --save {args.save}: it already holds {what}; resume that run with {how} "
                            f"{args.save}, write elsewhere (another --save, or --add_version true), or start over "
                            f"in it with --overwrite_output_dir true (deletes them)")


def _check_safetensors_files(model_dir: str) -> None:
    """Each *.safetensors of a local model has a readable header and the bytes it promises (a
    truncated download is named here, not as a read error in every worker)."""
    import struct

    for name in sorted(os.listdir(model_dir)):
        if not name.endswith(".safetensors"):
            continue
        path = os.path.join(model_dir, name)
        size = os.path.getsize(path)
        try:
            with open(path, "rb") as fh:
                (length,) = struct.unpack("<Q", fh.read(8))
                if length > size - 8:
                    raise ValueError(f"its header says {length} bytes but the file has {size}")
                header = json.loads(fh.read(length))
        except (OSError, ValueError, struct.error) as exc:
            raise ArgumentError(f"argument --model: {path} is not a readable safetensors file ({exc})") from None
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
        if ends and 8 + length + max(ends) > size:
            raise ArgumentError(f"argument --model: {path} is truncated ({size} bytes, its tensors need "
                                f"{8 + length + max(ends)}); download it again")


def _model_basename(model: str) -> str:
    return os.path.basename(os.path.normpath(os.path.expanduser(model)))


def _resolve_machine_defaults(args, caps: Capabilities) -> None:
    """Defaults left to the machine when the user said nothing: grad-reduce and param-gather overlap
    with the distributed optimizer on GPUs; no recompute of core attention where the attention kernel
    does not store the attention matrix anyway (what selective recompute exists to drop): Transformer
    Engine's flash / fused attention, or without TE the local spec's THD attention on padding-free
    batches (one SDPA flash call per sequence, kernels/attention.py) when there is no attention dropout.
    (Sliding-window models fall back to megatron's kernel per sequence there; they keep one
    sequence's matrix per layer without this recompute.)"""
    overlap = caps.gpu and args.use_distributed_optimizer and args.data_parallel_size > 1
    if args.overlap_grad_reduce is None:
        args.overlap_grad_reduce = overlap
    if args.overlap_param_gather is None:
        args.overlap_param_gather = overlap and args.overlap_grad_reduce
    recompute_given = {"recompute_granularity", "recompute_modules"} & set(args.explicit_args)
    flash_thd = (args.padding_free or args.packing) and args.attention_dropout == 0
    if (caps.transformer_engine or flash_thd) and not recompute_given and args.recompute_modules == ["core_attn"]:
        args.recompute_granularity = "none"


def _resolve_training_defaults(args) -> None:
    if args.lr is None:
        args.lr = 1e-4 if args.train_type == "lora" else 1e-5
    if args.min_lr > args.lr:
        raise ArgumentError(f"argument --min_lr: {args.min_lr} is larger than --lr ({args.lr})")
    if args.save is None:
        args.save = os.path.join("megatron_output", _model_basename(args.model))
    if args.eval_interval is None:
        args.eval_interval = args.save_interval
    if args.lr_decay_iters is None and args.train_iters is not None:
        args.lr_decay_iters = args.train_iters


def _check_rlhf(args) -> None:
    kind = args.rlhf_type
    if args.beta is None:
        args.beta = {"simpo": 2.0, "grpo": 0.04, "gkd": 0.5}.get(kind, 0.1)
    choices = {"dpo": DPO_LOSS_TYPES, "kto": KTO_LOSS_TYPES, "grpo": GRPO_LOSS_TYPES}.get(kind)
    if choices is not None:
        if args.loss_type is None:
            args.loss_type = choices[0]
        elif args.loss_type not in choices:
            raise ArgumentError(f"argument --loss_type: invalid choice {args.loss_type!r} for --rlhf_type {kind} "
                                f"(choose from {', '.join(choices)})")
    if args.ref_load is None and not args.reference_free and kind in ("dpo", "kto", "grpo", "ppo") and args.beta != 0:
        args.ref_load = args.load
    if kind == "grpo":
        _check_grpo(args)
    if kind == "gkd" and args.teacher_model is None:
        raise ArgumentError("argument --teacher_model is required for --rlhf_type gkd")


def _check_grpo(args) -> None:
    """GRPO's batch sizes count completions: a generation batch of ``generation_batch_size`` completions is
    ``generation_batch_size / num_generations`` prompts, split over the data-parallel ranks (each rank
    generates whole groups), then trained in micro batches of ``micro_batch_size`` completions."""
    if not args.reward_funcs and args.reward_model is None:
        raise ArgumentError("argument --reward_funcs is required for --rlhf_type grpo (accuracy, format, cosine, "
                            "repetition, soft_overlong, or a name an --external_plugins file registers)")
    if args.num_generations < 2:
        raise ArgumentError("argument --num_generations: GRPO needs at least 2 completions per prompt")
    if "split_dataset_ratio" not in (args.explicit_args or []):
        args.split_dataset_ratio = 0.0  # no held-out prompts: GRPO evaluation is not built (support.py)
    if args.reward_weights is not None and len(args.reward_weights) != len(args.reward_funcs):
        raise ArgumentError(f"argument --reward_weights: {len(args.reward_weights)} weights for "
                            f"{len(args.reward_funcs)} reward functions (--reward_funcs)")
    if args.generation_batch_size is not None and args.generation_batch_size % args.global_batch_size:
        raise ArgumentError(f"argument --generation_batch_size ({args.generation_batch_size}): must be a multiple of "
                            f"--global_batch_size ({args.global_batch_size}): each generation feeds whole steps")
    if args.steps_per_generation is None:
        args.steps_per_generation = (args.generation_batch_size // args.global_batch_size
                                     if args.generation_batch_size else 1)
    if args.generation_batch_size is None:
        args.generation_batch_size = args.global_batch_size * args.steps_per_generation
    gen, g, dp = args.generation_batch_size, args.num_generations, args.data_parallel_size
    if gen % g:
        raise ArgumentError(f"argument --num_generations: the generation batch of {gen} completions "
                            f"(--global_batch_size {args.global_batch_size} x steps_per_generation "
                            f"{args.steps_per_generation}) is not a whole number of groups of {g}: make "
                            f"--global_batch_size a multiple of --num_generations")
    prompts = gen // g
    if prompts % dp:
        raise ArgumentError(f"argument --global_batch_size: {gen} completions are {prompts} prompts x "
                            f"{g} generations, which do not split over {dp} data-parallel ranks: make "
                            f"global_batch_size / num_generations a multiple of {dp}")
    if "soft_overlong" in args.reward_funcs:
        if args.soft_cache_length is None:
            raise ArgumentError("argument --soft_cache_length is required by the soft_overlong reward")
        if args.soft_max_length is None:
            args.soft_max_length = args.max_completion_length
        if args.soft_cache_length >= args.soft_max_length:
            raise ArgumentError(f"argument --soft_cache_length ({args.soft_cache_length}) must be smaller than "
                                f"--soft_max_length ({args.soft_max_length})")
    if args.cosine_max_len is None:
        args.cosine_max_len = args.max_completion_length


# --------------------------------------------------------------------------------------- export

def _resolve_export(args, first_rank: bool = True) -> None:
    if args.to_hf:
        if args.mcore_model is None and not args.mcore_adapters:
            raise ArgumentError("argument --mcore_model is required with --to_hf")
        if args.mcore_model is not None:
            _check_checkpoint_dir("mcore_model", args.mcore_model, True)
    for path in args.mcore_adapters:
        _check_checkpoint_dir("mcore_adapters", path, True)
    if args.output_dir is None:
        if args.to_mcore:
            base = args.model_dir or os.path.join(".", _model_basename(args.model))
            args.output_dir = f"{os.path.normpath(base)}-mcore"
        else:
            source = args.mcore_model if args.mcore_model is not None else args.mcore_adapters[0]
            args.output_dir = f"{os.path.normpath(os.path.expanduser(source))}-hf"
    if first_rank and os.path.exists(os.path.expanduser(args.output_dir)) and not args.exist_ok:
        raise ArgumentError(f"argument --output_dir: '{args.output_dir}' already exists "
                            f"(pass --exist_ok true to overwrite)")
