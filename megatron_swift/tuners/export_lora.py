"""``megatron export --mcore_adapters ADAPTER --to_hf true``: an mcore LoRA adapter checkpoint ->
a PEFT adapter dir (``--merge_lora false``) or a merged HF model (``--merge_lora true``).

The base comes from ``--model`` (HF safetensors) or ``--mcore_model``, else from the adapter
checkpoint's args.json (the ``--model`` it was trained on), as in ms-swift. The model is built
in fp32 at the export layout, the base and the adapter are loaded into it (megatron reshards the
adapter from its training layout), and the merge ``W + s * B @ A`` is computed per rank in fp32
on this private copy (never on live training weights), then written in the checkpoint's dtype.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Optional

import torch

logger = logging.getLogger(__name__)


def _recorded(adapter_dir: str) -> dict:
    path = os.path.join(adapter_dir, "args.json")
    if not os.path.isfile(path):
        raise ValueError(f"--mcore_adapters {adapter_dir}: no args.json (the LoRA settings and the base model are "
                         f"read from it); give the directory `megatron sft --train_type lora --save` wrote")
    with open(path) as f:
        recorded = json.load(f)
    if recorded.get("train_type") != "lora":
        raise ValueError(f"--mcore_adapters {adapter_dir}: not a LoRA run (train_type "
                         f"{recorded.get('train_type')!r}); export full checkpoints with --mcore_model")
    return recorded


def lora_settings_of(recorded: dict):
    """The adapters' settings: the ``lora`` record of the run (what was built, e.g. with the rank and
    targets an ``--adapters`` PEFT config gave) or, for older checkpoints, the run's arguments."""
    from .lora import LoraSettings

    built = recorded.get("lora")
    if built:
        return LoraSettings(rank=built["rank"], alpha=built["alpha"], dropout=0.0, bias=built["bias"],
                            use_rslora=built["use_rslora"], init_weights="true",
                            target_modules=tuple(built["target_modules"]), target_regex=built["target_regex"],
                            modules_to_save=tuple(built["modules_to_save"]), canonical=tuple(built["canonical"]))
    return LoraSettings(rank=recorded["lora_rank"], alpha=recorded["lora_alpha"], dropout=0.0,
                        bias=recorded.get("lora_bias", "none"), use_rslora=recorded.get("use_rslora", False),
                        init_weights="true", target_modules=tuple(recorded.get("target_modules") or ["all-linear"]),
                        target_regex=recorded.get("target_regex"),
                        modules_to_save=tuple(recorded.get("modules_to_save") or ()))


@torch.no_grad()
def merge_adapters(chunks: list) -> int:
    """W += s * B @ A on this rank's shards, in the weights' dtype (fp32 here); the adapters are then
    switched off. Column base: this rank's B rows x the replicated A; row base: the replicated B x
    this rank's A columns: exactly this rank's slice of the full delta, no communication."""
    from megatron_swift.model.builder import unwrap

    from .lora import is_lora_layer

    merged = 0
    for chunk in chunks:
        for module in unwrap(chunk).modules():
            if is_lora_layer(module) and getattr(module, "lora_enabled", True):
                a, b = module.lora_factors()  # canonical mode: the projections' factors in the fused layout
                delta = (b.to(torch.float32) @ a.to(torch.float32)) * module.lora_scaling
                module.weight.copy_((module.weight.to(torch.float32) + delta).to(module.weight.dtype))
                module.lora_enabled = False
                merged += 1
    return merged


def export_lora(adapter_dir: str, out_dir: str, *, merge: bool, model_dir: Optional[str], mcore_model: Optional[str],
                overrides: dict, torch_dtype: Optional[str], max_shard_size: str, exist_ok: bool) -> None:
    """Collective over the export job (``init_parallel`` done at the export layout)."""
    import torch.distributed as dist

    from megatron_swift.converters.convert import hf_config_from_dict
    from megatron_swift.converters.hf_dir import save_mcore_as_hf, torch_dtype_of
    from megatron_swift.converters.load import load_hf_into_mcore
    from megatron_swift.converters.outdir import atomic_output_dir
    from megatron_swift.model import build_model
    from megatron_swift.trainer.checkpoint import load_checkpoint

    from .lora import apply_lora_everywhere
    from .peft_io import adapter_to_peft, check_peft_exportable, expert_target_parameters, save_peft_adapter

    from dataclasses import replace

    from .lora import canonical_layers_in

    recorded = _recorded(adapter_dir)
    settings = lora_settings_of(recorded)
    canonical = set(settings.canonical) | set(canonical_layers_in(adapter_dir))
    settings = replace(settings, canonical=tuple(sorted(canonical)))
    if not model_dir and not mcore_model:
        model_dir = recorded.get("model_dir")
        if not model_dir or not os.path.isdir(model_dir):
            raise ValueError(f"--mcore_adapters {adapter_dir}: its base model {model_dir!r} (args.json) is not a local "
                             f"directory; give the base with --model or --mcore_model")
    if not merge and (settings.modules_to_save or settings.bias == "all"):
        raise ValueError("--merge_lora false: a PEFT adapter with modules_to_save / lora_bias all is not built; "
                         "export with --merge_lora true")
    hf_config = hf_config_from_dict(recorded["hf_config"])
    chunks, config, gpt = build_model(hf_config, dict(overrides, params_dtype=torch.float32,
                                                      perform_initialization=False))
    apply_lora_everywhere(chunks, config, settings)
    if not merge:
        check_peft_exportable(chunks, "--merge_lora false", gpt.family)
    if mcore_model:
        load_checkpoint(mcore_model, chunks, finetune=True, part="base", what="--mcore_model")
    else:
        load_hf_into_mcore(chunks, model_dir, config, gpt)
    try:
        load_checkpoint(adapter_dir, chunks, finetune=True, part="trainable", what="--mcore_adapters")
    except Exception as exc:  # a checkpoint of another model: name the argument
        raise ValueError(f"--mcore_adapters {adapter_dir}: does not fit the base model "
                         f"({model_dir or mcore_model}): {str(exc).splitlines()[0][:300]}") from None
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if not merge:
        tensors = adapter_to_peft(chunks, config, gpt)
        expert_params = expert_target_parameters(chunks, gpt.family)
        with atomic_output_dir(out_dir, exist_ok) as tmp:
            if rank0:
                save_peft_adapter(tensors, tmp, settings, recorded.get("model"), expert_params)
        logger.info("wrote the PEFT adapter (%d tensors) to %s", len(tensors), out_dir)
        return
    merged = merge_adapters(chunks)
    dtype = torch_dtype_of(torch_dtype) or torch_dtype_of(recorded.get("torch_dtype")) or \
        torch_dtype_of(getattr(hf_config, "dtype", None)) or torch.float32
    save_mcore_as_hf(chunks, config, gpt, hf_config, out_dir, source_dir=model_dir if model_dir else None,
                     torch_dtype=dtype, max_shard_size=max_shard_size, exist_ok=exist_ok)
    logger.info("merged %d adapters (fp32) into the base and wrote %s", merged, out_dir)
