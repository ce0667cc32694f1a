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

Routed experts: transformers 5 keeps them as fused 3-D tensors (``mlp.experts.gate_up_proj``
``[E, 2F, H]`` gate first, ``down_proj`` ``[E, H, F]``; the family mapping's ``Stacked``
alternatives), which PEFT adapts with ``target_parameters``: one ``ParamWrapper`` per tensor with
A ``[E*r, in]`` (rows (expert, r)) and B ``[out, r*E]`` (columns (r, expert)), expert e's delta
``B[:, :, e] A[e]`` after reshaping A to ``[E, r, in]`` and B to ``[out, r, E]``. Our per-expert
fc1 adapter (one A for gate and up, B rows ``[gate; up]`` at expert-TP 1) is expert e of the
``gate_up_proj`` adapter, fc2's of the ``down_proj`` one. Wrappers of one module nest in the order
of its parameters (gate_up_proj first, so the inner one): with both adapted, gate_up_proj's keys
are ``mlp.experts.base_layer.lora_*`` and down_proj's ``mlp.experts.lora_*``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch

from .lora import FUSED_GROUPS, LoraSettings, is_lora_layer, mcore_targets

PEFT_PREFIX = "base_model.model."
# families whose fused 3-D expert tensors are read/written as PEFT target_parameters adapters
# (checked against PEFT on the transformers model); other MoE families' expert adapters are refused
STACKED_EXPERT_FAMILIES = ("qwen3_moe",)
# target_parameters of such an adapter -> the mcore layer of each expert that holds the tensor
STACKED_EXPERT_TARGETS = {"mlp.experts.gate_up_proj": "linear_fc1", "mlp.experts.down_proj": "linear_fc2"}


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
        patterns = {**(cfg.get("rank_pattern") or {}), **(cfg.get("alpha_pattern") or {})}
        if any("gate_up_proj" in k for k in patterns):  # PEFT's own conversion for transformers-5 MoE experts
            raise ValueError(f"argument --adapters {adapter_dir}: a rank-2r adapter on the experts' fused gate_up_proj "
                             f"(what PEFT makes of target_modules gate_proj/up_proj or all-linear on a transformers-5 "
                             f"MoE) is not built; read are target_parameters mlp.experts.gate_up_proj / down_proj "
                             f"at the adapter's rank (what `megatron export --mcore_adapters` writes)")
        raise ValueError(f"argument --adapters {adapter_dir}: per-module rank_pattern/alpha_pattern is not built")
    expert_targets = []  # PEFT's adapters of fused 3-D expert tensors -> our per-expert fc1 / fc2
    for param in cfg.get("target_parameters") or ():
        # PEFT matches a parameter path by its end: "down_proj", "experts.down_proj", "model.layers.0.mlp.experts..."
        leaf = next((v for k, v in STACKED_EXPERT_TARGETS.items()
                     if param == k or param.endswith("." + k) or k.endswith("." + param)), None)
        if leaf is None:
            raise ValueError(f"argument --adapters {adapter_dir}: target_parameters {param!r} is not built (read are "
                             f"{', '.join(STACKED_EXPERT_TARGETS)})")
        expert_targets.append(leaf)
    targets = cfg.get("target_modules") or ([] if expert_targets else ["all-linear"])
    if isinstance(targets, str):
        raise ValueError(f"argument --adapters {adapter_dir}: a regex target_modules {targets!r} is not built")
    targets = tuple(sorted((set(targets) - {"lm_head"}) | set(expert_targets)))
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


@dataclass
class _Adapted:
    """One adapted layer of this rank and where its factors live in PEFT's layout."""

    name: str
    module: object
    rule: object  # the converter's rule of the layer's base weight
    projections: list  # HF projection module names (per-module LoRA)
    tp_rank: int
    tp_size: int
    stacked: Optional[str] = None  # routed expert: PEFT's module path of its 3-D tensor's adapter
    expert: Optional[int] = None  # global expert index
    num_experts: int = 0
    stacked_param: str = ""  # the 3-D tensor's parameter name (gate_up_proj / down_proj)
    target_parameter: str = ""  # PEFT's target_parameters entry of it (mlp.experts.gate_up_proj)
    rule_index: int = 0  # position of the rule in the family's mapping (nesting order)


def _stacked_source(rule) -> Optional[tuple]:
    """(HF module path, parameter name) of the fused 3-D tensor holding a routed expert's weight
    (``model.layers.{layer}.mlp.experts``, ``gate_up_proj``), from the rule's ``Stacked``
    alternatives (one per HF projection, parts in the fused row order); None without them."""
    from megatron_swift.converters.mapping import Stacked

    alts = [a for s in rule.hf for a in s.alternatives if isinstance(a, Stacked)]
    if len(alts) != len(rule.hf) or len({a.key for a in alts}) != 1 or [a.part for a in alts] != list(range(len(alts))):
        return None
    module, _, param = alts[0].key.rpartition(".")
    return module, param


def _adapted_layers(chunks: list, family, num_experts: int = 0):
    """Every adapted layer of this rank (``_Adapted``). Routed experts of the families in
    ``STACKED_EXPERT_FAMILIES`` get the PEFT path of their 3-D tensor's adapter, nested as PEFT
    nests the wrappers of one module (in the order of its parameters, i.e. of the family's rules)."""
    from megatron_swift.converters.mapping import HF_LAYER, format_key, split_name
    from megatron_swift.converters.registry import mapping_for

    from megatron_swift.model.builder import unwrap

    mapping = mapping_for(family)
    stack_experts = mapping.name in STACKED_EXPERT_FAMILIES
    found = []
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
            item = _Adapted(name, module, rule, [k[: -len(".weight")] for k in hf], module.tp_group.rank(),
                            module.tp_group.size())
            source = _stacked_source(rule) if expert is not None and stack_experts else None
            if source is not None:
                item.stacked, item.expert, item.num_experts = format_key(source[0], layer, None), expert, num_experts
                item.stacked_param, item.rule_index = source[1], mapping.rules.index(rule)
                item.target_parameter = f"{source[0].replace(HF_LAYER, '', 1)}.{source[1]}"
            found.append(item)
    # nesting: of a module's adapted 3-D tensors the first (in rule order) is the innermost wrapper
    adapted = {}
    for item in found:
        if item.stacked is not None:
            adapted.setdefault(item.stacked, {})[item.rule_index] = item.stacked_param
    for item in found:
        if item.stacked is not None:
            later = sum(1 for i in adapted[item.stacked] if i > item.rule_index)
            item.stacked = item.stacked + ".base_layer" * later
    return found


def expert_target_parameters(chunks: list, family) -> list:
    """Collective when distributed (pipeline stages hold different layers): PEFT's
    ``target_parameters`` of the adapted 3-D expert tensors (``mlp.experts.gate_up_proj``)."""
    out = {item.target_parameter for item in _adapted_layers(chunks, family) if item.stacked is not None}
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        everyone = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, sorted(out))
        out = set().union(*map(set, everyone))
    return sorted(out)


def check_peft_exportable(chunks: list, what: str, family=None) -> None:
    """Say before anything is written when the adapter has no PEFT form: routed experts of families
    whose 3-D expert layout is not written here, per-projection (canonical) expert adapters (PEFT's
    ``gate_up_proj`` adapter has one A for gate and up), or experts adapted in some layers / for
    some experts only (PEFT's ``target_parameters`` adapt every layer's tensor)."""
    from megatron_swift.converters.registry import mapping_for

    from megatron_swift.model.builder import unwrap

    stack = family is not None and mapping_for(family).name in STACKED_EXPERT_FAMILIES
    hint = ("; export a merged model (`megatron export --mcore_adapters ... --merge_lora true`) or target only "
            "attention (--target_modules linear_qkv linear_proj)")
    experts = {}
    for chunk in chunks:
        for name, module in unwrap(chunk).named_modules():
            if not is_lora_layer(module) or ".experts." not in name:
                continue
            if not stack:
                raise ValueError(f"{what}: the adapter has LoRA on routed experts ({name}); transformers keeps them as "
                                 f"fused 3-D tensors, whose PEFT layout (target_parameters) is written for "
                                 f"{', '.join(STACKED_EXPERT_FAMILIES)} only" + hint)
            if module.lora_parts():
                raise ValueError(f"{what}: {name} has per-projection (canonical) adapters; PEFT's adapter of the "
                                 f"fused gate_up_proj tensor has one A for gate and up" + hint)
            experts.setdefault(name.rsplit(".", 1)[-1], set()).add(name)
    for chunk in chunks:  # every expert linear of an adapted kind must be adapted
        for name, module in unwrap(chunk).named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if ".experts.local_experts." in name and leaf in experts and name not in experts[leaf]:
                raise ValueError(f"{what}: {leaf} is adapted on some experts but not on {name}; PEFT's "
                                 f"target_parameters adapt one expert tensor in every layer" + hint)


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
        for item in _adapted_layers(chunks, gpt_settings.family, config.num_moe_experts or 0):
            name, module, rule, projections, tp_rank, tp_size = (item.name, item.module, item.rule, item.projections,
                                                                 item.tp_rank, item.tp_size)
            if item.stacked is not None:  # a routed expert: its slice of the 3-D tensor's adapter
                if module.lora_parts():
                    raise ValueError(f"argument --adapters {adapter_dir}: {name} was built with per-projection "
                                     f"(canonical) adapters; PEFT's {item.stacked_param} adapter has one A for them")
                a = get(f"{item.stacked}.lora_A.weight", name)
                b = get(f"{item.stacked}.lora_B.weight", name)
                r, e = module.lora_A.weight.shape[0], item.num_experts
                if a.shape[0] != r * e or b.shape[1] != r * e:
                    raise ValueError(f"argument --adapters {adapter_dir}: {item.stacked} has A {tuple(a.shape)} and B "
                                     f"{tuple(b.shape)}; {name} needs rank {r} x {e} experts")
                try:
                    a_e, b_e = expert_factors(a, b, r, e, item.expert)
                    module.lora_A.weight.copy_(a_e)
                    module.lora_B.weight.copy_(b_e)
                except RuntimeError as exc:
                    raise ValueError(f"argument --adapters {adapter_dir}: its tensors for {name} do not fit the "
                                     f"model ({exc}); the adapter was trained for another base model") from None
                continue
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
    out, experts = {}, {}
    for item in _adapted_layers(chunks, gpt_settings.family, config.num_moe_experts or 0):
        name, module, rule, projections, tp_size = item.name, item.module, item.rule, item.projections, item.tp_size
        if item.stacked is not None:  # a routed expert: stacked below, once every rank's experts are here
            if module.lora_parts():
                raise ValueError(f"{name}: per-projection (canonical) expert adapters have no PEFT layout")
            experts[(item.stacked, item.expert)] = (value(module.lora_A.weight).detach().float().cpu().clone(),
                                                    value(module.lora_B.weight).detach().float().cpu().clone())
            continue
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
        torch.distributed.all_gather_object(everyone, (out, experts))
        for part, part_experts in everyone:
            for k, v in part.items():
                out.setdefault(k, v)
            for k, v in part_experts.items():
                experts.setdefault(k, v)
    out.update(_stack_experts(experts, config.num_moe_experts or 0))
    return out


def expert_factors(a: torch.Tensor, b: torch.Tensor, rank: int, num_experts: int, expert: int) -> tuple:
    """Expert ``expert``'s (A ``[r, in]``, B ``[out, r]``) of PEFT's 3-D tensor adapter (A rows
    (expert, r), B columns (r, expert)); a module function, so a test can break it and see the
    model test fail."""
    return a.reshape(num_experts, rank, -1)[expert], b.reshape(b.shape[0], rank, num_experts)[:, :, expert]


def _stack_experts(experts: dict, num_experts: int) -> dict:
    """{(PEFT module path, expert): (A_e, B_e)} -> PEFT's 3-D tensor adapters: A ``[E*r, in]`` with
    rows (expert, r), B ``[out, r*E]`` with columns (r, expert)."""
    out = {}
    for path in sorted({p for p, _ in experts}):
        missing = [e for e in range(num_experts) if (path, e) not in experts]
        if missing:
            raise ValueError(f"{path}: experts {missing} have no adapter; PEFT's target_parameters adapt all of them")
        a_list, b_list = zip(*(experts[(path, e)] for e in range(num_experts)))
        out[f"{path}.lora_A.weight"] = torch.cat(a_list, dim=0).contiguous()
        out[f"{path}.lora_B.weight"] = torch.stack(b_list, dim=-1).reshape(b_list[0].shape[0], -1).contiguous()
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


def save_peft_adapter(tensors: dict, out_dir: str, settings: LoraSettings, base_model: Optional[str],
                      expert_params: Optional[list] = None) -> None:
    """``adapter_config.json`` + ``adapter_model.safetensors`` as PEFT writes them."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    paths = {k.split(".lora_")[0] for k in tensors}
    stacked = {p for p in paths if p.endswith(".experts") or p.endswith(".experts.base_layer")}
    modules = sorted({p.rsplit(".", 1)[-1] for p in paths - stacked})
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": settings.rank, "lora_alpha": settings.alpha,
           "lora_dropout": settings.dropout, "use_rslora": settings.use_rslora, "bias": settings.bias,
           "target_modules": modules, "modules_to_save": None, "init_lora_weights": True, "use_dora": False,
           "fan_in_fan_out": False, "base_model_name_or_path": base_model, "inference_mode": True}
    if stacked:  # routed experts: their 3-D tensors, as target_parameters
        if not expert_params:
            raise ValueError(f"{out_dir}: expert adapters {sorted(stacked)[:2]} need their target_parameters")
        cfg["target_parameters"] = sorted(set(expert_params))
        cfg["lora_dropout"] = 0.0  # PEFT's ParamWrapper takes none (dropout is a training-time setting)
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
        expert_params = expert_target_parameters(chunks, self.gpt_settings.family)
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            save_peft_adapter(tensors, out, self.settings, self.base_model, expert_params)
        return out
