"""Builds Megatron-Core GPT models (one chunk per virtual pipeline stage) from an HF config.

Layer spec: Transformer Engine's where TE imports (the platform says), otherwise megatron-core's
local spec with the modules it lacks swapped in from ``megatron_swift.kernels`` (an RMSNorm that
supports sequence parallelism, THD attention). Either way MoE layers get ``moe_router.TopKRouter``
(router-loss gradients independent of the parallel layout).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
from typing import Optional

import torch
from torch.overrides import TorchFunctionMode

from megatron_swift.platform import get_platform
from megatron_swift.platform.mcore_compat import set_tensor_parallel_attributes

from .config import GPTSettings, transformer_config_from_hf
from .padded_vocab import mask_padded_vocab

logger = logging.getLogger(__name__)


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while "module" in getattr(chunk, "_modules", {}):
        chunk = chunk._modules["module"]
    return chunk


def _swap_modules(spec, replacements: dict):
    """Returns a copy of a (nested) ModuleSpec / submodules dataclass with classes replaced."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    if isinstance(spec, type):
        return replacements.get(spec, spec)
    if isinstance(spec, ModuleSpec):
        module = spec.module
        if isinstance(module, type):
            module = replacements.get(module, module)
        return dataclasses.replace(
            spec, module=module, submodules=_swap_modules(spec.submodules, replacements),
            params=dict(spec.params),
        )
    if isinstance(spec, (list, tuple)):
        return type(spec)(_swap_modules(s, replacements) for s in spec)
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        changes = {f.name: _swap_modules(getattr(spec, f.name), replacements) for f in dataclasses.fields(spec)}
        return dataclasses.replace(spec, **changes)
    return spec


def _local_replacements() -> dict:
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from megatron_swift.kernels.attention import THDDotProductAttention
    from megatron_swift.kernels.norm import RMSNorm

    replacements = {WrappedTorchNorm: RMSNorm, DotProductAttention: THDDotProductAttention}
    try:  # apex's fused norm is what the local spec picks when apex imports
        from megatron.core.fusions.fused_layer_norm import FusedLayerNorm

        replacements[FusedLayerNorm] = RMSNorm
    except ImportError:
        pass
    return replacements


def decoder_block_spec(config, vp_stage: Optional[int] = None, pp_rank: Optional[int] = None):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    from megatron.core.transformer.moe.router import TopKRouter as MegatronTopKRouter

    from .moe_router import TopKRouter

    use_te = get_platform().has_transformer_engine and config.transformer_impl == "transformer_engine"
    spec = get_gpt_decoder_block_spec(
        config, use_transformer_engine=use_te, normalization=config.normalization,
        vp_stage=vp_stage, pp_rank=pp_rank,
    )
    replacements = {MegatronTopKRouter: TopKRouter}  # layout-invariant router-loss scaling
    if not use_te:
        replacements.update(_local_replacements())
    spec = _swap_modules(copy.copy(spec), replacements)
    if not use_te:
        _moe_norm_keys_as_te(spec)
        if getattr(config, "multi_latent_attention", False):
            _mla_replicated_down_projections(spec)
    return spec


def _mla_replicated_down_projections(block_spec) -> None:
    """MLA's down projections replicated on every TP rank, as Transformer Engine's spec has them
    (``TELinear`` duplicated). megatron-core's local spec column-splits them and all-gathers the
    output instead, and then (0.16) never reduces the gradient of the rope key ``k_pos_emb`` over
    the TP ranks' heads: weight gradients are wrong at TP > 1. With megatron-core's replicated
    ``Linear`` (the class MLA accepts besides the TE/column-parallel ones) and sequence
    parallelism, the gradient is reduce-scattered like on a GPU, and checkpoints hold the same
    (replicated) tensors as TE's. Without sequence parallelism TP > 1 is refused for training
    (``ModelFamily.tp_needs_sp``)."""
    from megatron.core.post_training.modelopt.layers import Linear
    from megatron.core.transformer.moe.moe_layer import MoELayer

    for layer in getattr(block_spec, "layer_specs", None) or []:
        attn = getattr(layer.submodules, "self_attention", None)
        sub = getattr(attn, "submodules", None)
        if sub is None or not hasattr(sub, "linear_kv_down_proj"):
            continue
        attn.submodules = dataclasses.replace(sub, linear_q_down_proj=Linear, linear_kv_down_proj=Linear)
        # checkpoint keys as Transformer Engine's MLA spec writes them (norms fused into the next
        # linear), so checkpoints move between a CPU (local) and a GPU (TE) run
        keys = dict(layer.submodules.sharded_state_dict_keys_map)
        keys["self_attention.q_layernorm."] = "self_attention.linear_q_up_proj.layer_norm_"
        keys["self_attention.kv_layernorm."] = "self_attention.linear_kv_up_proj.layer_norm_"
        if getattr(layer.submodules.mlp, "module", None) is not MoELayer:
            keys["pre_mlp_layernorm."] = "mlp.linear_fc1.layer_norm_"
        layer.submodules = dataclasses.replace(layer.submodules, sharded_state_dict_keys_map=keys)


def _init_replicated_linears(model, config) -> None:
    """megatron-core's replicated ``Linear`` keeps torch's default init; give it the model's."""
    from megatron.core.post_training.modelopt.layers import Linear

    if not config.perform_initialization:
        return
    with torch.no_grad():
        for module in model.modules():
            if type(module) is Linear:
                config.init_method(module.weight)


def _moe_norm_keys_as_te(block_spec) -> None:
    """Checkpoint keys that do not depend on the layer spec. The local spec saves every layer's
    pre-MLP norm as ``mlp.linear_fc1.layer_norm_weight`` (TE's name for the norm fused into a dense
    fc1), also in MoE layers, where Transformer Engine's spec keeps ``pre_mlp_layernorm.weight``
    (experts have no fused norm): MoE layers here use TE's name, so checkpoints move between a CPU
    (local) and a GPU (TE) run. ``checkpoint.state`` maps the old name when loading older checkpoints."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    for layer in getattr(block_spec, "layer_specs", None) or []:
        sub = layer.submodules
        mlp = getattr(sub, "mlp", None)
        if getattr(mlp, "module", None) is MoELayer and "pre_mlp_layernorm." in sub.sharded_state_dict_keys_map:
            keys = dict(sub.sharded_state_dict_keys_map)
            del keys["pre_mlp_layernorm."]
            layer.submodules = dataclasses.replace(sub, sharded_state_dict_keys_map=keys)


def _apply_rope_parameters(model, hf_config, settings: GPTSettings) -> None:
    """Non-default rope (llama3, linear): inv_freq from transformers' own rope init functions."""
    if settings.rope_parameters is None or not hasattr(model, "rotary_pos_emb"):
        return
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope_type = settings.rope_parameters.get("rope_type", settings.rope_parameters.get("type"))
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"))
    if attention_factor not in (None, 1.0):
        raise ValueError(f"rope type {rope_type!r} with attention_factor {attention_factor} is not supported")
    rope = model.rotary_pos_emb
    rope.inv_freq = inv_freq.to(rope.inv_freq.device, rope.inv_freq.dtype)


class _AllocateOnMeta(TorchFunctionMode):
    """Every tensor a meta build creates lands on the meta device, also where megatron or Transformer
    Engine pass an explicit device (``torch.device("meta")``, entered with it, only fills in a missing
    one, and TE / megatron's layers name cpu or cuda)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if kwargs.get("device") is not None:
            kwargs = dict(kwargs, device=torch.device("meta"))
        return func(*args, **kwargs)


def build_model(hf_config, overrides: Optional[dict] = None, where: str = "config.json", meta: bool = False):
    """Builds this rank's model chunks: ``(list[GPTModel], TransformerConfig, GPTSettings)``.

    Needs ``megatron_swift.platform.init_parallel`` with the layout in ``overrides`` first. With
    ``meta`` the parameters take no memory and nothing is initialised: names, shapes, TP attributes
    and ``sharded_state_dict`` work, values do not (the converters use this to plan reads and writes).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    overrides = dict(overrides or {})
    if meta:
        overrides["perform_initialization"] = False
    overrides.setdefault("tensor_model_parallel_size", ps.get_tensor_model_parallel_world_size())
    overrides.setdefault("pipeline_model_parallel_size", ps.get_pipeline_model_parallel_world_size())
    overrides.setdefault("expert_model_parallel_size", ps.get_expert_model_parallel_world_size())
    overrides.setdefault("context_parallel_size", ps.get_context_parallel_world_size())
    vpp = ps.get_virtual_pipeline_model_parallel_world_size()
    if vpp is not None:
        overrides.setdefault("virtual_pipeline_model_parallel_size", vpp)
    config, settings = transformer_config_from_hf(hf_config, overrides, where)

    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp is not None else None
        with torch.device("meta") if meta else contextlib.nullcontext(), \
                _AllocateOnMeta() if meta else contextlib.nullcontext():
            model = GPTModel(
                config=config,
                transformer_layer_spec=decoder_block_spec(config, vp_stage=stage),
                vocab_size=settings.padded_vocab_size,
                max_sequence_length=settings.max_sequence_length,
                pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
                post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
                share_embeddings_and_output_weights=settings.share_embeddings_and_output_weights,
                position_embedding_type="rope",
                rotary_base=settings.rotary_base,
                rotary_percent=settings.rotary_percent,
                parallel_output=True,
                vp_stage=stage,
            )
            if settings.num_labels is not None:  # a reward / sequence-classification model
                from megatron_swift.rlhf.reward import install_value_head

                install_value_head(model, config, settings.num_labels)
        set_tensor_parallel_attributes(model)  # megatron-core < 0.17 marks TP weights only when it inits them
        if not meta:
            _init_replicated_linears(model, config)
        _apply_rope_parameters(model, hf_config, settings)
        if settings.num_labels is None:
            mask_padded_vocab(model, settings.vocab_size, settings.padded_vocab_size)
        model.hf_vocab_size = settings.vocab_size  # the real vocabulary (model.vocab_size is the padded one)
        use_gradient_accumulation_fusion([model], False)
        chunks.append(model if meta else model.to(get_platform().device))
    return chunks, config, settings


def use_gradient_accumulation_fusion(chunks: list, on: bool) -> None:
    """Sets megatron's linears to add their weight gradients straight into DDP's ``main_grad``
    buffers (``gradient_accumulation_fusion``) or to return them as ``.grad``. The buffers exist
    only once the chunks are wrapped in DDP, so ``build_model`` turns the fusion off (export,
    reference models and a plain ``backward()`` work) and ``wrap_ddp`` turns it on as the config
    says."""
    for chunk in chunks:
        for module in chunk.modules():
            if hasattr(module, "gradient_accumulation_fusion"):
                module.gradient_accumulation_fusion = on
