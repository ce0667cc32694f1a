"""Parsed ``megatron pt/sft`` arguments -> the settings each training component takes.

The argument dataclasses use the user's names (SPEC.md); megatron-core uses its own field names.
This is the one place that translates, so the model builder, optimizer and loop stay unaware of
the CLI.
"""

from __future__ import annotations

import torch

from megatron_swift.platform import ParallelLayout

from .model_setup import OptimizerSettings

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# user name -> TransformerConfig field, copied when the user gave a value (None = from config.json)
_RENAMED = {
    "num_experts": "num_moe_experts",
    "norm_epsilon": "layernorm_epsilon",
    "decoder_first_pipeline_num_layers": "num_layers_in_first_pipeline_stage",
    "decoder_last_pipeline_num_layers": "num_layers_in_last_pipeline_stage",
}
_SAME_NAME = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
    "add_qkv_bias", "qk_layernorm", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size",
    "moe_router_topk", "moe_router_pre_softmax", "moe_aux_loss_coeff", "moe_z_loss_coeff",
    "moe_expert_capacity_factor", "moe_grouped_gemm", "padded_vocab_size", "rotary_base",
)
_ALWAYS = (
    "sequence_parallel", "calculate_per_token_loss", "moe_token_dispatcher_type", "moe_router_dtype",
    "moe_router_load_balancing_type", "moe_permute_fusion", "attention_softmax_in_fp32", "deterministic_mode",
    "cross_entropy_loss_fusion",
)


def parallel_layout(args) -> ParallelLayout:
    return ParallelLayout.from_args(args)


def params_dtype(args) -> torch.dtype:
    if args.bf16:
        return torch.bfloat16
    if args.fp16:
        return torch.float16
    return _DTYPES.get(args.torch_dtype or "float32", torch.float32)


def model_overrides(args) -> dict:
    """TransformerConfig/GPTSettings overrides for ``megatron_swift.model.build_model``."""
    overrides = {name: getattr(args, name) for name in _ALWAYS}
    for user_name in _SAME_NAME:
        if getattr(args, user_name) is not None:
            overrides[user_name] = getattr(args, user_name)
    for user_name, field in _RENAMED.items():
        if getattr(args, user_name) is not None:
            overrides[field] = getattr(args, user_name)
    if args.moe_router_load_balancing_type in ("sinkhorn", "none") and args.moe_aux_loss_coeff is None:
        overrides["moe_aux_loss_coeff"] = 0.0  # no auxiliary loss (config.json's coefficient does not apply)
    if args.untie_embeddings_and_output_weights is not None:
        overrides["share_embeddings_and_output_weights"] = not args.untie_embeddings_and_output_weights
    if args.swiglu is False:
        raise ValueError("--swiglu false: only SwiGLU models are supported")
    dtype = params_dtype(args)
    overrides.update(params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16)
    overrides.update(
        masked_softmax_fusion=not args.no_masked_softmax_fusion,
        bias_dropout_fusion=not args.no_bias_dropout_fusion,
        bias_activation_fusion=not args.no_bias_swiglu_fusion,
        apply_rope_fusion=not args.no_rope_fusion,
        gradient_accumulation_fusion=not args.no_gradient_accumulation_fusion,
    )
    if args.recompute_granularity != "none":
        overrides["recompute_granularity"] = args.recompute_granularity
        if args.recompute_granularity == "full":
            overrides.update(recompute_method=args.recompute_method, recompute_num_layers=args.recompute_num_layers)
        else:
            overrides["recompute_modules"] = list(args.recompute_modules)
    overrides.update(args.extra_megatron_kwargs or {})
    return overrides


def optimizer_settings(args) -> OptimizerSettings:
    return OptimizerSettings(
        optimizer=args.optimizer, lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
        sgd_momentum=args.sgd_momentum, clip_grad=args.clip_grad,
        use_distributed_optimizer=args.use_distributed_optimizer,
        overlap_grad_reduce=args.overlap_grad_reduce, overlap_param_gather=args.overlap_param_gather,
    )

