"""Small helpers family declarations use to turn HF config values into TransformerConfig fields
(the computed part of a family's config map; see ``families.py``)."""

from __future__ import annotations

from typing import Any


def rope_parameters(hf_config) -> dict:
    """The rope parameters across transformers 4 (rope_theta + rope_scaling) and 5 layouts."""
    params = getattr(hf_config, "rope_parameters", None)
    if params is None:
        params = dict(getattr(hf_config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    params = dict(params)
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    params.setdefault("rope_type", "default")
    return params


def moe_layer_pattern(hf_config, first_dense: int = 0) -> Any:
    """Megatron's ``moe_layer_freq``: 1 (every layer MoE) or a 0/1 list; dense layers are the
    first ``first_dense``, the ``mlp_only_layers`` and those off the ``decoder_sparse_step``."""
    step = getattr(hf_config, "decoder_sparse_step", 1) or 1
    dense = set(getattr(hf_config, "mlp_only_layers", None) or [])
    pattern = [0 if (i < first_dense or i in dense or (i + 1) % step != 0) else 1
               for i in range(hf_config.num_hidden_layers)]
    return 1 if all(pattern) else pattern


def softmax_moe_fields(hf_config, num_experts: int, expert_ffn: int, normalize_topk: bool) -> dict:
    """A softmax router (HF: softmax over all experts, top-k, renormalise iff ``normalize_topk``;
    megatron's default softmax over the top-k logits equals the renormalised form, pre_softmax
    reproduces the un-normalised one) with the auxiliary load-balancing loss."""
    return dict(
        num_moe_experts=num_experts,
        moe_ffn_hidden_size=expert_ffn,
        moe_router_topk=hf_config.num_experts_per_tok,
        moe_router_pre_softmax=not normalize_topk,
        moe_aux_loss_coeff=float(getattr(hf_config, "router_aux_loss_coef", 0.0) or 0.0),
        moe_router_load_balancing_type="aux_loss",
        moe_router_dtype="fp32",
        moe_token_dispatcher_type="alltoall",
        moe_layer_freq=moe_layer_pattern(hf_config),
    )


def sigmoid_group_moe_fields(hf_config, where: str = "config.json") -> dict:
    """DeepSeek-V3-style routing: sigmoid scores, ``e_score_correction_bias`` as megatron's expert
    bias (aux-loss-free balancing, updated by megatron's finalize_model_grads), group-limited top-k
    (``n_group`` / ``topk_group``: the group score is the sum of its top-2 biased scores),
    renormalised top-k weights times ``routed_scaling_factor``; shared experts; the first
    ``first_k_dense_replace`` layers dense."""
    topk = hf_config.num_experts_per_tok
    n_group, topk_group = getattr(hf_config, "n_group", 1) or 1, getattr(hf_config, "topk_group", 1) or 1
    if not getattr(hf_config, "norm_topk_prob", True) and topk > 1:
        raise ValueError(f"{where}: norm_topk_prob=false with sigmoid routing is not supported (megatron-core "
                         f"renormalises the top-k sigmoid scores)")
    groups = {}
    if n_group > 1:
        # megatron scores a group by the sum of its top (topk // group_topk) experts, HF by its top 2
        if topk % topk_group or topk // topk_group != 2:
            raise ValueError(f"{where}: n_group={n_group} with num_experts_per_tok={topk} and topk_group="
                             f"{topk_group} is not supported: megatron-core scores a group by its top "
                             f"num_experts_per_tok/topk_group experts, transformers by its top 2")
        groups = dict(moe_router_num_groups=n_group, moe_router_group_topk=topk_group)
    shared = (getattr(hf_config, "n_shared_experts", 0) or 0) * hf_config.moe_intermediate_size
    fields = dict(
        num_moe_experts=hf_config.n_routed_experts,
        moe_ffn_hidden_size=hf_config.moe_intermediate_size,
        moe_router_topk=topk,
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_topk_scaling_factor=float(getattr(hf_config, "routed_scaling_factor", 1.0) or 1.0),
        moe_aux_loss_coeff=float(getattr(hf_config, "router_aux_loss_coef", 0.0) or 0.0),
        moe_router_load_balancing_type="aux_loss",
        moe_router_dtype="fp32",
        moe_token_dispatcher_type="alltoall",
        moe_layer_freq=moe_layer_pattern(hf_config, getattr(hf_config, "first_k_dense_replace", 0) or 0),
        **groups,
    )
    if shared:
        fields["moe_shared_expert_intermediate_size"] = shared
    return fields


def mla_fields(hf_config, where: str = "config.json") -> dict:
    """Multi-head latent attention (megatron-core's ``MLATransformerConfig``), rope or YaRN."""
    params = rope_parameters(hf_config)
    rope_type = params["rope_type"]
    heads = hf_config.num_attention_heads
    fields = dict(
        multi_latent_attention=True,
        q_lora_rank=hf_config.q_lora_rank,
        kv_lora_rank=hf_config.kv_lora_rank,
        qk_head_dim=hf_config.qk_nope_head_dim,
        qk_pos_emb_head_dim=hf_config.qk_rope_head_dim,
        v_head_dim=hf_config.v_head_dim,
        num_query_groups=heads,
        kv_channels=hf_config.qk_nope_head_dim + hf_config.qk_rope_head_dim,
        qk_layernorm=True,  # q_a_layernorm / kv_a_layernorm
        rotary_base=float(params.get("rope_theta", 10000.0)),
        add_qkv_bias=False,
    )
    if not getattr(hf_config, "rope_interleave", True):
        raise ValueError(f"{where}: rope_interleave=false is not supported with MLA (megatron-core applies "
                         f"DeepSeek's interleaved rope)")
    if getattr(hf_config, "attention_bias", False):
        raise ValueError(f"{where}: attention_bias=true is not supported with MLA")
    if rope_type == "default":
        fields.update(rope_type="rope", rotary_scaling_factor=1.0)
    elif rope_type == "yarn":
        fields.update(
            rope_type="yarn",
            rotary_scaling_factor=float(params["factor"]),
            original_max_position_embeddings=int(params.get("original_max_position_embeddings")
                                                 or hf_config.max_position_embeddings),
            beta_fast=float(params.get("beta_fast") or 32.0),
            beta_slow=float(params.get("beta_slow") or 1.0),
            mscale=float(params.get("mscale") or 1.0),
            mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
        )
    else:
        raise ValueError(f"{where}: rope type {rope_type!r} is not supported with MLA (supported: default, yarn)")
    return fields
