"""PEFT LoRA adapters <-> our mcore adapters (fused and canonical mode).

HF names come from the converter's family mapping: the rule of an adapted layer's base weight
(``linear_qkv.weight`` <- q/k/v_proj, QKV transform; ``linear_fc1.weight`` <- gate/up_proj,
GATE_UP; ``linear_proj``/``linear_fc2`` COPY split on dim 1) says which HF projections the layer
fuses and how its rows are laid out, and B follows the base weight's row layout exactly:

* column-parallel layer, fused mode: B (``[out, r]``) = the base rule applied to PEFT's
  per-projection B's; A is shared, so PEFT's A's of the fused projections must be equal (an
  adapter with different A's, e.g. trained by ``swift sft``, makes ``settings_from_peft`` choose
  the canonical mode for that layer).
* column-parallel layer, canonical mode: each projection's A as it is, its B's rows split evenly
  over TP (QKV and GATE_UP split every projection into contiguous per-rank row blocks).
* row-parallel layer: A (``[r, in]``) is split like the base weight's columns, B is replicated.

Export is the inverse: B rows split back to the projections, A repeated for each of them
(B_q A + B_k A + B_v A is the fused delta exactly); canonical: each projection's own factors.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from typing import Callable, Optional

import torch

from .lora import FUSED_GROUPS, LoraSettings, is_lora_layer, mcore_targets

PEFT_PREFIX = "base_model.model."


def _adapter_files(adapter_dir: str) -> tuple[dict, str]:
    cfg_path = os.path.join(adapter_dir, "adapter_config.json")
    weights = os.path.join(adapter_dir, "adapter_model.safetensors")
    if not os.path.isfile(cfg_path) or not os.path.isfile(weights):
        raise ValueError(f"argument --adapters {adapter_dir}: not a PEFT adapter directory (needs "
                         f"adapter_config.json and adapter_model.safetensors)")
    with open(cfg_path) as f:
        return json.load(f), weights


def settings_from_peft(settings: LoraSettings, adapter_dir: str) -> LoraSettings:
    """The adapter's own rank / alpha / rslora / bias / targets (as ms-swift does with --adapters)."""
    cfg, weights = _adapter_files(adapter_dir)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"argument --adapters {adapter_dir}: a {cfg.get('peft_type')} adapter; only LoRA is built")
    if cfg.get("use_dora"):
        raise ValueError(f"argument --adapters {adapter_dir}: a DoRA adapter; DoRA is not built")
    if cfg.get("modules_to_save"):
        raise ValueError(f"argument --adapters {adapter_dir}: modules_to_save {cfg['modules_to_save']} in a PEFT "
                         f"adapter is not built")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise ValueError(f"argument --adapters {adapter_dir}: per-module rank_pattern/alpha_pattern is not built")
    if cfg.get("target_parameters"):
        raise ValueError(f"argument --adapters {adapter_dir}: target_parameters {cfg['target_parameters']} (PEFT's "
                         f"adapters on fused 3-D expert tensors) are not built; only per-module LoRA is read")
    targets = cfg.get("target_modules") or ["all-linear"]
    if isinstance(targets, str):
        raise ValueError(f"argument --adapters {adapter_dir}: a regex target_modules {targets!r} is not built")
    targets = tuple(sorted(set(targets) - {"lm_head"}))
    mcore_targets(targets)  # unknown targets: a clear error
    return replace(settings, rank=int(cfg["r"]), alpha=float(cfg["lora_alpha"]),
                   use_rslora=bool(cfg.get("use_rslora", False)), bias=cfg.get("bias", "none") or "none",
                   target_modules=targets, target_regex=None,
                   canonical=tuple(sorted(set(settings.canonical) | _separate_factors(weights))))


def _separate_factors(weights: str) -> set:
    """The fused mcore layers whose HF projections have different A's somewhere in the adapter
    (each needs its own adapter: canonical mode)."""
    from safetensors import safe_open

    out = set()
    with safe_open(weights, framework="pt") as f:
        keys = {k.replace(".default.", "."): k for k in f.keys()}
        for fused, members in FUSED_GROUPS.items():
            first = f".{members[0]}.lora_A.weight"
            for key in (k for k in keys if k.endswith(first) and fused not in out):
                a = f.get_tensor(keys[key])
                for m in members[1:]:
                    sibling = keys.get(key[: -len(first)] + f".{m}.lora_A.weight")
                    if sibling is not None and not torch.equal(f.get_tensor(sibling), a):
                        out.add(fused)
    return out


def _adapted_layers(chunks: list, family):
    """(module, base rule, HF projection module names, tp_rank, tp_size) of every adapted layer."""
    from megatron_swift.converters.mapping import format_key, split_name
    from megatron_swift.converters.registry import mapping_for

    from megatron_swift.model.builder import unwrap

    mapping = mapping_for(family)
    for chunk in chunks:
        model = unwrap(chunk)
        layers = model.decoder.layers if hasattr(model, "decoder") else []
        for name, module in model.named_modules():
            if not is_lora_layer(module):
                continue
            template, li, le = split_name(name + ".weight")
            rule = mapping.rule_for(template)
            layer = layers[li].layer_number - 1 if li is not None else None
            expert = layers[li].mlp.local_expert_indices[le] if le is not None else None
            hf = [format_key(s.key, layer, expert) for s in rule.hf]
            if not all(k.endswith(".weight") for k in hf):
                raise ValueError(f"{name}: its HF weights {hf} are not per-projection Linear weights; a PEFT "
                                 f"adapter for them cannot be written (use --merge_lora true)")
            projections = [k[: -len(".weight")] for k in hf]
            yield name, module, rule, projections, module.tp_group.rank(), module.tp_group.size()


def check_peft_exportable(chunks: list, what: str) -> None:
    """Routed experts: transformers keeps them as fused 3-D tensors, which PEFT adapts only through
    ``target_parameters`` (a layout not written here), so a per-expert PEFT adapter would not load;
    say so before anything is written."""
    from megatron_swift.model.builder import unwrap

    for chunk in chunks:
        for name, module in unwrap(chunk).named_modules():
            if is_lora_layer(module) and ".experts." in name:
                raise ValueError(f"{what}: the adapter has LoRA on routed experts ({name}); transformers keeps them as "
                                 f"fused 3-D tensors, whose PEFT layout (target_parameters) is not written; export "
                                 f"a merged model "
                                 f"(`megatron export --mcore_adapters ... --merge_lora true`) or target only "
                                 f"attention (--target_modules linear_qkv linear_proj)")


def load_peft_adapter(chunks: list, adapter_dir: str, config, gpt_settings) -> None:
    """Fills this rank's adapter factors from a PEFT adapter dir; every adapter tensor must be used
    and every adapted layer must find its tensors."""
    from safetensors import safe_open

    from megatron_swift.converters.transforms import geometry, hf_to_local

    _, weights = _adapter_files(adapter_dir)
    geo = geometry(config, gpt_settings)
    with safe_open(weights, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors = {(k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k).replace(".default.", "."): v
               for k, v in tensors.items()}
    used = set()

    def get(key, name):
        if key not in tensors:
            raise ValueError(f"argument --adapters {adapter_dir}: no {key} (needed by {name}); the adapter does "
                             f"not target what --target_modules adapts, or was trained for another model")
        used.add(key)
        return tensors[key]

    with torch.no_grad():
        for name, module, rule, projections, tp_rank, tp_size in _adapted_layers(chunks, gpt_settings.family):
            parts = module.lora_parts()
            if parts:  # canonical: each targeted projection's own factors
                _check_canonical_rule(name, module, rule)
                for member, proj in zip(module.lora_members, projections):
                    if member not in parts:
                        continue
                    a, b = get(f"{proj}.lora_A.weight", name), get(f"{proj}.lora_B.weight", name)
                    try:
                        if b.shape[0] % tp_size:
                            raise ValueError(f"{proj}.lora_B has {b.shape[0]} rows, not divisible by TP {tp_size}")
                        parts[member].lora_A.weight.copy_(a)
                        parts[member].lora_B.weight.copy_(b.chunk(tp_size, dim=0)[tp_rank])
                    except (RuntimeError, ValueError) as exc:
                        raise ValueError(f"argument --adapters {adapter_dir}: its tensors for {name} do not fit the "
                                         f"model ({exc}); the adapter was trained for another base model") from None
                continue
            a_list = [get(f"{p}.lora_A.weight", name) for p in projections]
            b_list = [get(f"{p}.lora_B.weight", name) for p in projections]
            if any(not torch.equal(a_list[0], a) for a in a_list[1:]):
                raise ValueError(f"argument --adapters {adapter_dir}: {', '.join(projections)} have different LoRA A "
                                 f"matrices but {name} was built with one shared A (fused mode); build the model "
                                 f"with the settings settings_from_peft gives (canonical mode for it)")
            try:
                if module.lora_column:
                    a = a_list[0]
                    b = hf_to_local(rule, lambda i, index: b_list[i][index], tuple(module.lora_B.weight.shape),
                                    tp_rank, tp_size, geo)
                else:
                    a = hf_to_local(rule, lambda i, index: a_list[i][index], tuple(module.lora_A.weight.shape),
                                    tp_rank, tp_size, geo)
                    b = b_list[0]
                module.lora_A.weight.copy_(a)
                module.lora_B.weight.copy_(b)
            except (RuntimeError, ValueError) as exc:
                raise ValueError(f"argument --adapters {adapter_dir}: its tensors for {name} do not fit the model "
                                 f"({exc}); the adapter was trained for another base model") from None
    if torch.distributed.is_initialized():  # what any rank used (pipeline stages / experts hold parts)
        everyone = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, sorted(used))
        used = set().union(*map(set, everyone))
    unused = sorted(k for k in tensors if k not in used)
    if unused:
        raise ValueError(f"argument --adapters {adapter_dir}: tensors the model does not use: {unused[:4]}"
                         f"{' ...' if len(unused) > 4 else ''} (another base model, or targets this model lacks)")


def adapter_to_peft(chunks: list, config, gpt_settings, value: Optional[Callable] = None) -> dict:
    """Collective: every adapted layer's factors in PEFT layout (HF names without the
    ``base_model.model.`` prefix), gathered over TP and from all ranks; complete on every rank.
    ``value(param)``: what to take of each factor (default its data; tests pass its gradient)."""
    from megatron_swift.converters.transforms import geometry, local_shards_to_hf

    value = value or (lambda p: p.detach())
    geo = geometry(config, gpt_settings)
    out = {}
    for name, module, rule, projections, tp_rank, tp_size in _adapted_layers(chunks, gpt_settings.family):
        parts = module.lora_parts()
        if parts:  # canonical: each projection's A as it is, its B gathered over TP
            _check_canonical_rule(name, module, rule)
            for member, proj in zip(module.lora_members, projections):
                if member in parts:
                    a = value(parts[member].lora_A.weight).detach().float().cpu().clone()
                    b = value(parts[member].lora_B.weight).detach().float().cpu().clone()
                    out[f"{proj}.lora_A.weight"], out[f"{proj}.lora_B.weight"] = a, _gather_tp(b, module)
            continue
        # copies: the values may be views of buffers that later steps overwrite (grad buffers)
        a = value(module.lora_A.weight).detach().float().cpu().clone()
        b = value(module.lora_B.weight).detach().float().cpu().clone()
        split = b if module.lora_column else a
        if tp_size > 1:
            shards = [torch.empty_like(split) for _ in range(tp_size)]
            torch.distributed.all_gather(shards, split.contiguous(), group=module.tp_group)
        else:
            shards = [split]
        if module.lora_column:
            bs = local_shards_to_hf(rule, shards, geo)
            for p, bp in zip(projections, bs):
                out[f"{p}.lora_A.weight"], out[f"{p}.lora_B.weight"] = a.clone(), bp.contiguous()
        else:
            (full_a,) = local_shards_to_hf(rule, shards, geo)
            out[f"{projections[0]}.lora_A.weight"], out[f"{projections[0]}.lora_B.weight"] = full_a, b.clone()
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        everyone = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, out)
        for part in everyone:
            for k, v in part.items():
                out.setdefault(k, v)
    return out


def _gather_tp(local: torch.Tensor, module) -> torch.Tensor:
    if module.tp_group.size() == 1:
        return local
    shards = [torch.empty_like(local) for _ in range(module.tp_group.size())]
    torch.distributed.all_gather(shards, local.contiguous(), group=module.tp_group)
    return torch.cat(shards, dim=0)


def _check_canonical_rule(name: str, module, rule) -> None:
    """The family's HF projections of a fused layer must be the parts of megatron's layout that the
    canonical adapters follow (the converter's QKV / GATE_UP rule with one HF tensor per part)."""
    if rule.transform is not module.lora_rule.transform or len(rule.hf) != len(module.lora_members):
        raise ValueError(f"{name}: the model family maps it with {rule.transform} from {len(rule.hf)} HF tensors; "
                         f"per-projection (canonical) adapters need the {module.lora_rule.transform} layout")


def save_peft_adapter(tensors: dict, out_dir: str, settings: LoraSettings, base_model: Optional[str]) -> None:
    """``adapter_config.json`` + ``adapter_model.safetensors`` as PEFT writes them."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    modules = sorted({k.split(".lora_")[0].rsplit(".", 1)[-1] for k in tensors})
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": settings.rank, "lora_alpha": settings.alpha,
           "lora_dropout": settings.dropout, "use_rslora": settings.use_rslora, "bias": settings.bias,
           "target_modules": modules, "modules_to_save": None, "init_lora_weights": True, "use_dora": False,
           "fan_in_fan_out": False, "base_model_name_or_path": base_model, "inference_mode": True}
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    save_file({PEFT_PREFIX + k: v.contiguous() for k, v in sorted(tensors.items())},
              os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})


PEFT_SUBDIR = "peft"


class PeftCopy:
    """``--save_safetensors`` under LoRA: each saved iteration also as a PEFT adapter dir
    (``<iter>/peft/``), written before the checkpoint is published (the Checkpointer's hook)."""

    def __init__(self, config, gpt_settings, settings: LoraSettings, base_model: Optional[str]):
        self.config, self.gpt_settings, self.settings, self.base_model = config, gpt_settings, settings, base_model

    def write(self, chunks: list, checkpoint_dir: str) -> str:
        """Collective: every rank calls it with its chunks."""
        out = os.path.join(checkpoint_dir, PEFT_SUBDIR)
        tensors = adapter_to_peft(chunks, self.config, self.gpt_settings)
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            save_peft_adapter(tensors, out, self.settings, self.base_model)
        return out
