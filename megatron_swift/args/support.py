"""Arguments that are accepted by name but not (or not everywhere) built: refused before workers start.

Every rule names the argument, says why, and what to use instead. A value the rule does not refuse
is used by the run (the settings builders in ``megatron_swift.trainer.options`` and
``megatron_swift.export`` read it); ``tests/test_argument_usage.py`` checks that every argument is
either read by a settings builder or covered by a rule here, so nothing is parsed and ignored.
Stdlib only: runs in the launcher before torch is imported.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

from megatron_swift.args.capabilities import Capabilities
from megatron_swift.args.errors import ArgumentError

LORA_FIELDS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_bias", "lora_dtype", "use_rslora", "target_modules",
               "target_regex", "modules_to_save", "init_weights", "lorap_lr_ratio")
AGENT_LOSS_SCALES = ("react", "hermes", "qwen", "agentflan", "alpha_umi")
PRECISION_AWARE_DTYPES = ("main_grads_dtype", "main_params_dtype", "exp_avg_dtype", "exp_avg_sq_dtype")
POSITIVE_FUSIONS = ("masked_softmax_fusion", "bias_dropout_fusion", "bias_swiglu_fusion", "apply_rope_fusion")


@dataclass(frozen=True)
class Rule:
    fields: Tuple[str, ...]
    commands: Tuple[str, ...]
    check: Callable  # (args, caps) -> Optional[str]: the refusal message, or None


def _given(args, name: str) -> bool:
    return name in (getattr(args, "explicit_args", None) or [])


def _needs_gpu_kernel(what: str, caps: Capabilities, kernel: str = "Transformer Engine") -> str:
    return f"{what} needs {kernel}'s GPU kernels ({caps.describe()})"


TRAIN = ("pt", "sft", "rlhf")
ALL = ("pt", "sft", "rlhf", "export")


LORA_INITS = ("true", "false", "gaussian")


def _lora(args, caps):
    if args.train_type != "lora":
        given = [n for n in LORA_FIELDS + ("merge_lora", "adapters", "adapter_load") if _given(args, n)]
        if given:
            return f"argument --{given[0]}: applies to LoRA training (--train_type lora)"
        return None
    if args.command == "rlhf" and args.rlhf_type not in ("dpo", "kto"):
        return (f"argument --train_type lora: LoRA for `megatron rlhf --rlhf_type {args.rlhf_type}` is not built "
                f"yet (dpo and kto are); use --train_type full")
    if str(args.init_weights).lower() not in LORA_INITS:
        return (f"argument --init_weights {args.init_weights}: built are {', '.join(LORA_INITS)} (PiSSA, OLoRA, "
                f"LoftQ are not)")
    for name in ("all-embedding", "all-router"):
        if name in args.target_modules:
            return (f"argument --target_modules {name}: LoRA on embeddings / routers is not built; train the "
                    f"embedding fully with --modules_to_save word_embeddings")
    if len(args.adapters) > 1:
        return "argument --adapters: one PEFT adapter at a time"
    if args.merge_lora:
        return "argument --merge_lora: merging after training is not built yet (the run saves the adapter)"
    if args.save_safetensors and (args.modules_to_save or args.lora_bias == "all"):
        return ("argument --save_safetensors: the PEFT copy of an adapter with --modules_to_save / --lora_bias all "
                "is not built; export a merged model with `megatron export --mcore_adapters ... --merge_lora true`")
    given = [n for n in ("freeze_parameters", "freeze_parameters_regex", "freeze_parameters_ratio",
                         "trainable_parameters", "trainable_parameters_regex") if _given(args, n)]
    if given:
        return (f"argument --{given[0]}: applies to --train_type full; with LoRA only the adapters (and "
                f"--modules_to_save, --lora_bias all) are trained")
    return None


def _dora(args, caps):
    return "argument --use_dora: DoRA is not built; LoRA options are --lora_rank/--lora_alpha/..." \
        if args.use_dora else None


def _task(args, caps):
    reward_model = args.command == "rlhf" and args.rlhf_type == "rm"
    if reward_model:  # a *ForSequenceClassification with one label (ms-swift: task_type seq_cls, num_labels 1)
        if args.task_type not in ("causal_lm", "seq_cls"):
            return f"argument --task_type {args.task_type}: a reward model (--rlhf_type rm) is seq_cls"
        if args.num_labels is not None and args.num_labels != 1:
            return (f"argument --num_labels {args.num_labels}: a reward model (--rlhf_type rm) has one score "
                    f"(num_labels 1)")
        if _given(args, "problem_type"):
            return "argument --problem_type: a reward model trains on pairs (Bradley-Terry); leave it unset"
        return None
    if args.command == "export" and args.task_type == "seq_cls":  # converting a reward / classification model
        if _given(args, "problem_type"):
            return "argument --problem_type: conversion does not use it; leave it unset"
        if args.mcore_adapters:
            return "argument --task_type seq_cls: LoRA adapters of reward models are not built (export the full model)"
        return None
    if args.task_type != "causal_lm":
        return (f"argument --task_type {args.task_type}: only causal_lm is built (reward models come with "
                f"`megatron rlhf --rlhf_type rm`; `megatron export --task_type seq_cls` converts them)")
    for name in ("num_labels", "problem_type"):
        if _given(args, name):
            return f"argument --{name}: applies to --task_type seq_cls only"
    return None


def _attn_impl(args, caps):
    if _given(args, "attn_impl") and args.command != "export":
        return ("argument --attn_impl: chooses the Hugging Face model's attention (used by `megatron export "
                "--test_convert_precision`); Megatron's attention is chosen by --attention_backend")
    if args.command == "export" and args.attn_impl == "flash_attn" and not caps.gpu:
        return "argument --attn_impl flash_attn: flash-attention needs a GPU; use sdpa or eager"
    return None


def _multimodal(args, caps):
    if _given(args, "max_pixels"):
        return "argument --max_pixels: multimodal models are not supported (text-only LLMs)"
    if _given(args, "local_repo_path"):
        return "argument --local_repo_path: none of the supported model families needs code from another repository"
    return None


def _agent(args, caps):
    if _given(args, "agent_template"):
        return ("argument --agent_template: tool calls are rendered by the chat template itself (--template); "
                "separate agent templates are not built")
    if args.loss_scale in AGENT_LOSS_SCALES:
        return (f"argument --loss_scale {args.loss_scale}: agent loss scales are not built; choose from default, "
                f"last_round, all, ignore_empty_think")
    return None


def _data_loading(args, caps):
    if args.lazy_tokenize:
        return ("argument --lazy_tokenize true: rows are tokenized before training into the datasets cache "
                "(several processes with --dataset_num_proc); tokenizing during training is not built")
    if args.padding_side == "left":
        return ("argument --padding_side left: training batches are right-padded (causal attention without a "
                "padding mask) or padding-free; left padding is for generation")
    if args.dataloader_type != "cyclic":
        return (f"argument --dataloader_type {args.dataloader_type}: batches are read epoch after epoch (cyclic); "
                f"the order comes from --dataset_shuffle / --data_seed")
    if _given(args, "custom_dataset_info"):
        return ("argument --custom_dataset_info: registering datasets by name is not built; give the file, folder or "
                "hub id to --dataset (with --columns to rename columns)")
    if not args.remove_unused_columns:
        return ("argument --remove_unused_columns false: rows are normalised to the columns the template reads; "
                "other columns are not kept")
    if not args.no_create_attention_mask_in_dataloader:
        return ("argument --no_create_attention_mask_in_dataloader false: batches carry no attention mask (causal "
                "attention; padding-free batches mark sequence boundaries with cu_seqlens)")
    return None


def _optimizer_offload(args, caps):
    if args.optimizer_cpu_offload:
        return "argument --optimizer_cpu_offload: optimizer CPU offload is not built yet"
    if _given(args, "optimizer_offload_fraction"):
        return "argument --optimizer_offload_fraction: applies to --optimizer_cpu_offload, which is not built yet"
    return None


def _precision_aware(args, caps):
    if args.use_precision_aware_optimizer:
        if not caps.transformer_engine:
            return _needs_gpu_kernel("argument --use_precision_aware_optimizer", caps) + " (its FusedAdam)"
        if not args.use_distributed_optimizer:
            return "argument --use_precision_aware_optimizer needs --use_distributed_optimizer true"
        return None
    given = [n for n in PRECISION_AWARE_DTYPES if _given(args, n)]
    return f"argument --{given[0]}: applies to --use_precision_aware_optimizer true" if given else None


def _recompute(args, caps):
    if args.recompute_granularity != "full":
        given = [n for n in ("recompute_method", "recompute_num_layers") if _given(args, n)]
        if given:
            return f"argument --{given[0]}: takes effect with --recompute_granularity full"
    if args.recompute_granularity != "selective" and _given(args, "recompute_modules"):
        return "argument --recompute_modules: takes effect with --recompute_granularity selective"
    return None


def _checkpoint_format(args, caps):
    if args.ckpt_format != "torch_dist":
        return (f"argument --ckpt_format {args.ckpt_format}: checkpoints are written with megatron-core's "
                f"dist-checkpointing (torch_dist), which reloads at any parallel layout")
    return None


def _tp_comm_overlap(args, caps):
    return ("argument --tp_comm_overlap: overlapping TP communication with GEMMs (Transformer Engine userbuffers) "
            "is not built") if args.tp_comm_overlap else None


def _kernels(args, caps):
    if args.transformer_impl == "transformer_engine" and not caps.transformer_engine:
        return _needs_gpu_kernel("argument --transformer_impl transformer_engine", caps) + "; use local"
    if args.attention_backend in ("flash", "fused", "unfused") and not caps.transformer_engine:
        return (_needs_gpu_kernel(f"argument --attention_backend {args.attention_backend}", caps)
                + "; use auto or local")
    if args.cross_entropy_loss_fusion and args.cross_entropy_fusion_impl == "te" and not caps.transformer_engine:
        return _needs_gpu_kernel("argument --cross_entropy_fusion_impl te", caps) + "; use native"
    for name in POSITIVE_FUSIONS:
        value = getattr(args, name)
        if value and getattr(args, f"no_{name.replace('apply_', '')}", False):
            return f"arguments --{name} true and --no_{name.replace('apply_', '')} true contradict each other"
        if value and not caps.fused_kernels:
            return _needs_gpu_kernel(f"argument --{name} true", caps) + "; leave it unset (used when available)"
    if args.gradient_accumulation_fusion and args.no_gradient_accumulation_fusion:
        return "arguments --gradient_accumulation_fusion true and --no_gradient_accumulation_fusion true contradict"
    # on CPU torch's addmm stands in for apex (kernels/wgrad.py); a GPU needs apex (or TE's own linears)
    if args.gradient_accumulation_fusion and caps.gpu and not (caps.apex_gradient_accumulation or caps.transformer_engine):
        return (_needs_gpu_kernel("argument --gradient_accumulation_fusion true", caps, "NVIDIA apex or Transformer "
                                  "Engine") + "; leave it unset (used when available)")
    return None


def _moe_kernels(args, caps):
    if args.moe_grouped_gemm and not caps.transformer_engine:
        return _needs_gpu_kernel("argument --moe_grouped_gemm true", caps) + "; leave it unset (used when available)"
    if args.moe_permute_fusion and not caps.transformer_engine:
        return _needs_gpu_kernel("argument --moe_permute_fusion", caps)
    if args.moe_enable_deepep:
        if not caps.deep_ep:
            return f"argument --moe_enable_deepep needs DeepEP (deep_ep) on a GPU ({caps.describe()})"
        if args.moe_token_dispatcher_type != "flex":
            return "argument --moe_enable_deepep needs --moe_token_dispatcher_type flex"
    if args.moe_shared_expert_overlap and not caps.gpu:
        return ("argument --moe_shared_expert_overlap overlaps the shared expert with token dispatch on separate "
                "CUDA streams; this machine has no GPU")
    return None


def _model_shape(args, caps):
    if args.position_embedding_type != "rope":
        return (f"argument --position_embedding_type {args.position_embedding_type}: the supported model families "
                f"use rope")
    if args.rotary_percent != 1.0:
        return (f"argument --rotary_percent {args.rotary_percent}: the supported model families rotate whole heads "
                f"(partial rotary is not built)")
    if args.swiglu is False:
        return "argument --swiglu false: the supported model families use SwiGLU MLPs"
    if not args.disable_bias_linear:
        return ("argument --disable_bias_linear false: the supported model families have no linear biases "
                "(QKV biases follow config.json / --add_qkv_bias)")
    return None


def _report_to(args, caps):
    targets = set(args.report_to or [])
    if "none" in targets and len(targets) > 1:
        return "argument --report_to: 'none' cannot be combined with other targets"
    if "swanlab" in targets and not caps.swanlab:
        return "argument --report_to swanlab needs the swanlab package (pip install swanlab)"
    if ("wandb" in targets or args.wandb_project) and not caps.wandb:
        return "argument --report_to wandb / --wandb_project needs the wandb package (pip install wandb)"
    return None


def _backend(args, caps):
    if args.distributed_backend == "nccl" and not caps.gpu:
        return "argument --distributed_backend nccl needs GPUs (this machine has none); use gloo"
    return None


# megatron rlhf: what each built type reads (megatron_swift/rlhf/settings.py); every other RLHF argument
# belongs to a type that is not built and is refused when given
BUILT_RLHF = ("dpo", "kto", "rm", "grpo")
COMMON_FIELDS = ("rlhf_type", "ref_load", "ref_model", "beta", "loss_type")
DPO_ONLY = ("rpo_alpha", "reference_free", "label_smoothing", "f_divergence_type")
KTO_ONLY = ("desirable_weight", "undesirable_weight")
RM_ONLY = ("center_rewards_coefficient",)
# GRPO (rlhf/settings.py grpo_settings); the vllm_* / sleep_level ones are carried to the rollout engine
GRPO_ONLY = ("max_completion_length", "temperature", "top_k", "top_p", "repetition_penalty", "num_generations",
             "generation_batch_size", "steps_per_generation", "num_iterations", "reward_funcs", "reward_weights",
             "epsilon", "epsilon_high", "delta", "importance_sampling_level", "tau_pos", "tau_neg",
             "advantage_estimator", "scale_rewards", "dynamic_sample", "max_resample_times", "overlong_filter",
             "log_completions", "rollout_importance_sampling_mode", "rollout_importance_sampling_threshold",
             "log_rollout_offpolicy_metrics", "off_policy_sequence_mask_delta", "cosine_min_len_value_wrong",
             "cosine_max_len_value_wrong", "cosine_min_len_value_correct", "cosine_max_len_value_correct",
             "cosine_max_len", "repetition_n_grams", "repetition_max_penalty", "soft_max_length",
             "soft_cache_length", "use_vllm", "vllm_mode", "vllm_server_base_url", "vllm_server_host",
             "vllm_server_port", "vllm_server_timeout", "vllm_server_group_port", "vllm_gpu_memory_utilization",
             "vllm_tensor_parallel_size", "vllm_max_model_len", "vllm_max_num_seqs", "vllm_enforce_eager",
             "vllm_enable_prefix_caching", "sleep_level",
             # refused below when given (not built)
             "kl_in_reward", "log_entropy", "top_entropy_quantile", "reward_model", "offload_model",
             "offload_optimizer")


def _rlhf_only_fields() -> tuple:
    import dataclasses

    from megatron_swift.args.sections import RLHFArguments

    return tuple(f.name for f in dataclasses.fields(RLHFArguments) if f.name not in COMMON_FIELDS + DPO_ONLY)


def _grpo(args) -> Optional[str]:
    """GRPO options that are not built yet (everything else in GRPO_ONLY is read)."""
    if not args.use_vllm:
        return "argument --use_vllm false: GRPO generates with vLLM (--vllm_mode colocate or server)"
    if args.vllm_mode is None:
        return "argument --vllm_mode: GRPO needs --vllm_mode colocate (vLLM in each training process) or server"
    if args.vllm_mode == "colocate" and args.vllm_tensor_parallel_size != 1:
        return ("argument --vllm_tensor_parallel_size: colocated vLLM runs one engine per training rank with tensor "
                "parallel 1 (each rank generates its slice); a larger vLLM TP needs --vllm_mode server")
    if args.kl_in_reward and (args.beta == 0 or args.scale_rewards == "gdpo"):
        why = "--beta 0 has no reference" if args.beta == 0 else "--scale_rewards gdpo normalises each reward alone"
        return f"argument --kl_in_reward: {why}"
    if args.reward_model is not None:
        return ("argument --reward_model: reward models are not built for GRPO; give --reward_funcs (built-in or "
                "from an --external_plugins file)")
    for name in ("offload_model", "offload_optimizer"):
        if getattr(args, name):
            return f"argument --{name}: offloading the trainer's state during generation is not built"
    if _given(args, "padding_free") and not args.padding_free:
        return "argument --padding_free false: GRPO packs completions into THD rows (padding-free) only"
    if args.train_iters is None:
        return ("argument --max_epochs: GRPO counts steps, not epochs (each step generates "
                "global_batch_size / num_generations prompts' completions); give --train_iters")
    if args.val_dataset or (_given(args, "split_dataset_ratio") and args.split_dataset_ratio > 0):
        name = "val_dataset" if args.val_dataset else "split_dataset_ratio"
        return f"argument --{name}: GRPO evaluation (generation on held-out prompts) is not built"
    if args.beta is not None and args.beta == 0 and (args.ref_model or _given(args, "ref_load")):
        return f"argument --{'ref_model' if args.ref_model else 'ref_load'}: --beta 0 uses no reference model"
    if args.loss_type == "cispo" and args.epsilon_high is None:
        return "argument --epsilon_high: --loss_type cispo caps the ratio at epsilon_high; give it (CISPO uses ~5)"
    return None


def _rlhf(args, caps):
    kind = args.rlhf_type
    if kind not in BUILT_RLHF:
        return (f"argument --rlhf_type {kind}: not built yet in this version; --rlhf_type dpo, kto, rm and grpo are "
                f"(gkd/ppo/orpo/simpo/cpo later)")
    reads = {"dpo": DPO_ONLY, "kto": KTO_ONLY, "rm": RM_ONLY, "grpo": GRPO_ONLY}[kind]
    shared = {"dpo": COMMON_FIELDS, "kto": COMMON_FIELDS, "grpo": COMMON_FIELDS,
              # the reward model has no reference and no beta / loss variants
              "rm": ("rlhf_type",)}[kind]
    given = [n for n in _rlhf_only_fields() + DPO_ONLY + COMMON_FIELDS
             if n not in reads + shared and _given(args, n)]
    if given:
        return f"argument --{given[0]}: does not apply to --rlhf_type {kind}"
    if kind == "grpo":
        message = _grpo(args)
        if message:
            return message
    if kind == "kto" and args.loss_type != "apo_zero_unpaired" and args.micro_batch_size < 2:
        return ("argument --micro_batch_size: KTO's KL term pairs each prompt with another sample's completion "
                "inside the micro batch: use --micro_batch_size >= 2 (or --loss_type apo_zero_unpaired, which "
                "has no KL term)")
    if args.reference_free and (args.ref_model or _given(args, "ref_load")):
        name = "ref_model" if args.ref_model else "ref_load"
        return f"argument --{name}: --reference_free true uses no reference model"
    if args.context_parallel_size > 1:
        return ("argument --context_parallel_size: RLHF log-probs under context parallelism are not built; use "
                "tensor/pipeline parallelism (with --sequence_parallel) instead")
    if args.packing:
        return ("argument --packing: RLHF keeps each pair (KTO: sample and KL sequence) in its micro batch; use "
                "--padding_free true (one THD row per micro batch) instead of packing")
    return None


def _export_only(args, caps):
    if args.merge_lora and not args.mcore_adapters:
        return "argument --merge_lora: needs --mcore_adapters (the LoRA adapter checkpoint to merge)"
    if len(args.mcore_adapters) > 1:
        return "argument --mcore_adapters: one adapter checkpoint at a time"
    if args.mcore_adapters and args.to_mcore:
        return ("argument --mcore_adapters with --to_mcore: writing a merged mcore checkpoint is not built yet; "
                "export with --to_hf true (--merge_lora true: a merged HF model, false: a PEFT adapter)")
    if args.mcore_adapters and args.test_convert_precision:
        return "argument --test_convert_precision: not built for LoRA adapter exports"
    if not args.safe_serialization:
        return "argument --safe_serialization false: HF weights are written as safetensors (.bin is not supported)"
    if args.push_to_hub:
        return ("argument --push_to_hub: uploading is not built; upload the output directory with "
                "`huggingface-cli upload` or `modelscope upload`")
    given = [n for n in ("hub_model_id", "hub_private_repo", "commit_message") if _given(args, n)]
    if given:
        return f"argument --{given[0]}: applies to --push_to_hub, which is not built"
    if args.sequence_parallel:
        return "argument --sequence_parallel: conversion does not depend on sequence parallelism; leave it unset"
    if _given(args, "rope_scaling"):
        return ("argument --rope_scaling: conversion keeps config.json's rope settings; give --rope_scaling to "
                "`megatron sft/pt` instead")
    return None


RULES = (
    Rule(("train_type", "merge_lora", "adapters", "adapter_load") + LORA_FIELDS, TRAIN, _lora),
    Rule(("recompute_method", "recompute_num_layers", "recompute_modules"), TRAIN, _recompute),
    Rule(("use_dora",), TRAIN, _dora),
    Rule(("task_type", "num_labels", "problem_type"), ALL, _task),
    Rule(("attn_impl",), ALL, _attn_impl),
    Rule(("max_pixels", "local_repo_path"), TRAIN, _multimodal),
    Rule(("local_repo_path",), ("export",), lambda a, c: _multimodal(a, c) if _given(a, "local_repo_path") else None),
    Rule(("agent_template", "loss_scale"), TRAIN, _agent),
    Rule(("lazy_tokenize", "padding_side", "dataloader_type", "no_create_attention_mask_in_dataloader",
          "custom_dataset_info", "remove_unused_columns"), TRAIN, _data_loading),
    Rule(("optimizer_cpu_offload", "optimizer_offload_fraction"), TRAIN, _optimizer_offload),
    Rule(("use_precision_aware_optimizer",) + PRECISION_AWARE_DTYPES, TRAIN, _precision_aware),
    Rule(("ckpt_format",), TRAIN, _checkpoint_format),
    Rule(("tp_comm_overlap",), TRAIN, _tp_comm_overlap),
    Rule(("transformer_impl", "attention_backend", "cross_entropy_fusion_impl", "gradient_accumulation_fusion")
         + POSITIVE_FUSIONS, TRAIN, _kernels),
    Rule(("moe_grouped_gemm", "moe_permute_fusion", "moe_enable_deepep", "moe_shared_expert_overlap"), TRAIN,
         _moe_kernels),
    Rule(("position_embedding_type", "rotary_percent", "swiglu", "disable_bias_linear"), TRAIN, _model_shape),
    Rule(("report_to",), TRAIN, _report_to),
    Rule(("distributed_backend",), ALL, _backend),
    Rule(_rlhf_only_fields(), ("rlhf",), _rlhf),  # + DPO_ONLY / KTO_ONLY / RM_ONLY when given to another type
    Rule(("merge_lora", "mcore_adapters", "safe_serialization", "push_to_hub", "hub_model_id", "hub_private_repo",
          "commit_message", "sequence_parallel", "rope_scaling"), ("export",), _export_only),
)


def covered_fields(command: str) -> set:
    """Arguments whose every value is either refused by a rule or used (for the usage test)."""
    return {name for rule in RULES if command in rule.commands for name in rule.fields}


def check_support(args, caps: Optional[Capabilities] = None) -> None:
    """Raises ArgumentError for the first accepted-but-not-built argument of ``args``."""
    caps = caps or Capabilities.detect()
    for rule in RULES:
        if args.command in rule.commands:
            message = rule.check(args, caps)
            if message:
                raise ArgumentError(message)
