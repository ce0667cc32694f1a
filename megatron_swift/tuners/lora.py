"""LoRA for megatron-core's tensor-parallel linears (one wrapper for column- and row-parallel).

Why our own and not PEFT: PEFT wraps ``nn.Linear``; megatron's linears are sharded over tensor
parallelism, return ``(output, bias)`` and take part in sequence parallelism, so the adapter has to
follow the base layer's sharding and communication (the factorisation ms-swift/mcore-bridge use,
``../shared/notes/lora-on-mcore.md`` section 2):

=================  ===========================================  ============================================
base               A ``[r, in]``                                B ``[out, r]``
=================  ===========================================  ============================================
column-parallel    replicated; sees the local sequence shard     split on out (this rank's output rows);
                   under SP, so its grad is summed over TP       fc1 of a SwiGLU MLP keeps megatron's
                   (``param.sequence_parallel``)                 ``[gate_shard; up_shard]`` rows
row-parallel       split on in (this rank's input columns)       replicated; sees the local sequence shard
                                                                 under SP, so its grad is summed over TP
=================  ===========================================  ============================================

Only the rank-r activation crosses ranks: column: all-gather over the sequence (SP) or an
identity whose backward all-reduces (no SP); row: reduce-scatter over the sequence (SP) or an
all-reduce (no SP). Experts (``SequentialMLP``'s local experts) are ordinary column/row linears
over the expert-TP group, so each expert gets its own adapter; megatron's ``allreduce=False``
marks route their grads to the expert-data-parallel reduce (``trainer.model_setup``).

Parameter names keep the base keys (``...linear_qkv.weight``) and add ``...linear_qkv.lora_A.weight``
/ ``lora_B.weight``; ``sharded_state_dict`` saves the split factor with its TP axis (SwiGLU
factory for fc1), so adapter checkpoints reshard across TP like the base weights.

Initialisation does not depend on the layout: each factor's GLOBAL tensor is drawn from a
generator seeded by (seed, global parameter name) and this rank takes its slice.

Fused and canonical mode. megatron fuses q/k/v into ``linear_qkv`` and gate/up into ``linear_fc1``.
Fused mode puts one A/B on the fused layer (one A shared by its HF projections; what ms-swift
does). Canonical mode gives each targeted HF projection its own adapter,
``linear_qkv.q_proj.lora_A.weight`` / ``lora_B.weight`` (A ``[r, in]`` replicated, B this rank's
rows of that projection), which is PEFT's model exactly. It is chosen per fused layer when the
targets name only some of its projections (``q_proj v_proj``) or a loaded adapter has different
A's for them (``LoraSettings.canonical``). Its forward is the fused one with
``A = [A_q; A_v]`` (rank 2r) and a B whose rows are the projections' B's scattered into the
fused layer's row layout by the converter's own QKV / GATE_UP transform (zero columns where a
projection has no adapter), so communication, SP, experts and the merge are shared with fused mode.
"""

from __future__ import annotations

import contextlib

import math
import re
import zlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

ADAPTER_MARK = ".lora_"  # parameter names of adapter factors contain this
MCORE_LINEARS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
# HF projection -> the mcore layer it is fused into (groups must be targeted together)
HF_TO_MCORE = {"q_proj": "linear_qkv", "k_proj": "linear_qkv", "v_proj": "linear_qkv", "o_proj": "linear_proj",
               "gate_proj": "linear_fc1", "up_proj": "linear_fc1", "down_proj": "linear_fc2"}
FUSED_GROUPS = {"linear_qkv": ("q_proj", "k_proj", "v_proj"), "linear_fc1": ("gate_proj", "up_proj")}
INIT_CHOICES = ("true", "false", "gaussian")


@dataclass
class LoraSettings:
    rank: int = 8
    alpha: float = 32
    dropout: float = 0.05
    bias: str = "none"  # none | all (PEFT's meaning: the base biases are trained)
    dtype: Optional[torch.dtype] = None  # of the adapter factors; None: the base weight's
    use_rslora: bool = False
    init_weights: str = "true"
    target_modules: tuple = ("all-linear",)
    target_regex: Optional[str] = None
    modules_to_save: tuple = ()
    seed: int = 42
    lorap_lr_ratio: Optional[float] = None
    peft_adapter: Optional[str] = None  # --adapters: a PEFT adapter dir to start from (settings from its config)
    # fused layers (linear_qkv / linear_fc1) that get one adapter per HF projection even where all
    # of them are targeted: set from a loaded adapter whose projections have different A's
    canonical: tuple = ()

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def settings_record(settings: LoraSettings) -> dict:
    """The LoRA settings the adapters were built with (after ``--adapters`` filled them in from the
    PEFT config), kept in args.json as ``lora``: export rebuilds the same adapters from it (the
    canonical layers are also read from the checkpoint's index, ``canonical_layers_in``)."""
    return {"rank": settings.rank, "alpha": settings.alpha, "use_rslora": settings.use_rslora, "bias": settings.bias,
            "target_modules": list(settings.target_modules), "target_regex": settings.target_regex,
            "modules_to_save": list(settings.modules_to_save), "canonical": list(settings.canonical)}


def canonical_layers_in(checkpoint_dir: str) -> tuple:
    """The fused layers an adapter checkpoint (``--adapter_load`` / ``--mcore_adapters``) holds
    per-projection adapters for, read from its index: resuming or exporting it builds them so."""
    from torch.distributed.checkpoint import FileSystemReader

    from megatron_swift.trainer.checkpoint import find_checkpoint

    ref = find_checkpoint(checkpoint_dir)
    if ref is None:
        return ()
    keys = FileSystemReader(ref.directory).read_metadata().state_dict_metadata
    found = {m.group(1) for m in (re.search(r"\.(linear_qkv|linear_fc1)\.(\w+)\.lora_A\.weight$", k) for k in keys)
             if m and m.group(2) in FUSED_GROUPS[m.group(1)]}
    return tuple(sorted(found))


def is_adapter_param(name: str) -> bool:
    return ADAPTER_MARK in name


def mcore_targets(target_modules) -> dict:
    """User targets -> {mcore layer name: the HF projections of it that are targeted}, ``None``
    for the whole layer (``all-linear``, an mcore name, or every projection a layer fuses). A fused
    layer with only some of its projections targeted (``q_proj v_proj``) gets canonical adapters."""
    names = set(target_modules)
    refused = names & {"all-embedding", "all-router"}
    if refused:
        raise ValueError(f"argument --target_modules {sorted(refused)[0]}: LoRA on embeddings / routers is not "
                         f"built; use modules_to_save word_embeddings to train the embedding fully")
    out: dict = {}
    for name in names:
        if name == "all-linear":
            out.update(dict.fromkeys(MCORE_LINEARS))
        elif name in MCORE_LINEARS:
            out[name] = None
        elif name not in HF_TO_MCORE:
            raise ValueError(f"argument --target_modules {name}: not a LoRA target (all-linear, "
                             f"{', '.join(MCORE_LINEARS)} or {', '.join(HF_TO_MCORE)})")
    for fused, parts in FUSED_GROUPS.items():
        given = tuple(p for p in parts if p in names)
        if given and fused not in out:
            out[fused] = None if len(given) == len(parts) else given
    for hf, mcore in HF_TO_MCORE.items():
        if hf in names and mcore not in FUSED_GROUPS:
            out.setdefault(mcore, None)
    return out


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63))


def _init_global(kind: str, shape: tuple, settings: LoraSettings, name: str) -> torch.Tensor:
    """PEFT's initialisations of the whole (un-sharded) factor. ``kind``: 'A' or 'B'."""
    g = _generator(settings.seed, name)
    fan_in = shape[1]
    kaiming = lambda: (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1) / math.sqrt(fan_in)  # noqa: E731
    if kind == "B" and settings.init_weights in ("true", "gaussian"):
        return torch.zeros(shape, dtype=torch.float64)
    if kind == "A" and settings.init_weights == "gaussian":
        return torch.randn(shape, generator=g, dtype=torch.float64) / settings.rank
    # kaiming_uniform_(a=sqrt(5)) as nn.Linear / PEFT: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    return kaiming()


class _Factor(torch.nn.Module):
    def __init__(self, shape, dtype, device):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(shape, dtype=dtype, device=device))


def _global_b_rows(b_global: torch.Tensor, tp_rank: int, tp_size: int, gated: bool) -> torch.Tensor:
    """This rank's rows of a column-parallel B (megatron's own row split of the base weight)."""
    if not gated:
        return b_global.chunk(tp_size, dim=0)[tp_rank]
    gate, up = b_global.chunk(2, dim=0)
    return torch.cat([gate.chunk(tp_size, 0)[tp_rank], up.chunk(tp_size, 0)[tp_rank]], dim=0)


def _fused_layout(leaf: str, gated: bool, config, tp_size: int):
    """(HF projections, the converter's transform rule, this rank's Geometry) of a fused layer
    (megatron's row layout: QKV per query group, SwiGLU fc1 [gate; up]); None for other layers."""
    from megatron_swift.converters.mapping import Rule, src
    from megatron_swift.converters.transforms import GATE_UP, QKV, Geometry

    if leaf == "linear_qkv":
        transform = QKV
    elif leaf == "linear_fc1" and gated:
        transform = GATE_UP
    else:
        return None
    members = FUSED_GROUPS[leaf]
    rule = Rule(leaf, tuple(src(m) for m in members), transform, tp_dim=0)
    groups = config.num_query_groups or config.num_attention_heads
    geo = Geometry(num_heads=config.num_attention_heads // tp_size, num_groups=groups // tp_size,
                   head_dim=config.kv_channels, vocab_size=0, padded_vocab_size=0)
    return members, rule, geo


def scatter_rows(rule, blocks: list, shape: tuple, geo) -> torch.Tensor:
    """The per-projection row blocks of this rank (``blocks[i]``: projection i's local rows) laid
    out as the fused layer's local rows: the converter's transform at "TP 1" with this rank's
    geometry (a module function, so a test can break it and see the model test fail)."""
    return rule.transform.to_local(rule, lambda i, index: blocks[i][index], shape, 0, 1, geo)


class _Part(torch.nn.Module):
    """One HF projection's adapter inside a fused layer (canonical mode)."""

    def __init__(self, a_shape, b_shape, dtype, device):
        super().__init__()
        self.lora_A = _Factor(a_shape, dtype, device)
        self.lora_B = _Factor(b_shape, dtype, device)


def is_lora_layer(module) -> bool:
    return isinstance(module, LoraMixin)


class LoraMixin:
    """Mixed into the class of a megatron ColumnParallelLinear / RowParallelLinear instance
    (``add_lora``), so the module keeps its name, parameters, checkpoint keys and forward; the
    adapter's output is added to the base output."""

    lora_column: bool
    lora_gated: bool
    lora_scaling: float
    lora_dropout: float

    def _lora_tp(self):
        group = self.tp_group
        return group.rank(), group.size()

    def forward(self, input_, *args, **kwargs):
        output, bias = super().forward(input_, *args, **kwargs)
        if not getattr(self, "lora_enabled", True):
            return output, bias
        return output + self.lora_delta(input_).to(output.dtype), bias

    def lora_parts(self) -> dict:
        """{HF projection: its ``_Part``} (canonical mode); empty in fused mode."""
        return {m: getattr(self, m) for m in self.lora_members if m in self.lora_targeted} \
            if self.lora_targeted else {}

    def lora_factors(self) -> tuple:
        """(A ``[r', in]``, B ``[out_local, r']``) of this rank: the adapter's delta is
        ``x A^T B^T * scaling``. Fused mode: the factors. Canonical mode: the projections' A's
        stacked and their B's as a block matrix in the fused row layout."""
        if not self.lora_targeted:
            return self.lora_A.weight, self.lora_B.weight
        parts = list(self.lora_parts().values())
        a = torch.cat([p.lora_A.weight for p in parts], dim=0)
        r, k = parts[0].lora_A.weight.shape[0], len(parts)
        blocks, j = [], 0
        for member, rows in zip(self.lora_members, self.lora_member_rows):
            if member in self.lora_targeted:
                blocks.append(F.pad(getattr(self, member).lora_B.weight, (j * r, (k - j - 1) * r)))
                j += 1
            else:
                blocks.append(a.new_zeros(rows, k * r))
        b = scatter_rows(self.lora_rule, blocks, (sum(self.lora_member_rows), k * r), self.lora_geo)
        return a, b

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        from megatron.core.tensor_parallel import mappings

        a, b = self.lora_factors()
        x = x.to(a.dtype)
        _, tp_size = self._lora_tp()
        if self.lora_dropout > 0 and self.training:
            x = self._lora_dropout(x, tp_size)
        h = F.linear(x, a)
        if tp_size > 1:
            group = self.tp_group
            if self.lora_column:  # h: [s(/tp), b, r], the same on every rank; B's output is split
                h = (mappings.gather_from_sequence_parallel_region(h, True, group=group) if self.sequence_parallel
                     else mappings.copy_to_tensor_model_parallel_region(h, group=group))
            else:  # h: partial sums over this rank's input columns
                h = (mappings.reduce_scatter_to_sequence_parallel_region(h, group=group) if self.sequence_parallel
                     else mappings.reduce_from_tensor_model_parallel_region(h, group=group))
        return F.linear(h, b) * self.lora_scaling

    def _lora_dropout(self, x, tp_size):
        # a replicated input (column base, no SP) needs the same mask on every TP rank: the default
        # generator (megatron keeps it TP-identical); split inputs draw from the TP-rank stream
        if tp_size > 1 and (self.sequence_parallel or not self.lora_column):
            from megatron.core.tensor_parallel import get_cuda_rng_tracker

            with get_cuda_rng_tracker().fork():
                return F.dropout(x, self.lora_dropout, True)
        return F.dropout(x, self.lora_dropout, True)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        from megatron.core.tensor_parallel.layers import make_tp_sharded_tensor_for_checkpoint
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

        out = super().sharded_state_dict(prefix, sharded_offsets, metadata)  # A/B there as replicated
        for member, part in self.lora_parts().items():  # canonical: B = this rank's rows of the projection
            key = f"{prefix}{member}.lora_B.weight"
            out[key] = make_tp_sharded_tensor_for_checkpoint(
                part.lora_B.weight, key, tp_axis=0, prepend_offsets=sharded_offsets, tp_group=self.tp_group,
                dp_cp_group=(metadata or {}).get("dp_cp_group"))
        if self.lora_targeted:
            return out
        key = f"{prefix}lora_B.weight" if self.lora_column else f"{prefix}lora_A.weight"
        factor = self.lora_B.weight if self.lora_column else self.lora_A.weight
        sharded = make_tp_sharded_tensor_for_checkpoint(
            factor, key, tp_axis=0 if self.lora_column else 1, prepend_offsets=sharded_offsets,
            tp_group=self.tp_group, dp_cp_group=(metadata or {}).get("dp_cp_group"))
        if self.lora_gated:
            singleton = (metadata or {}).get("singleton_local_shards", False)
            sharded = apply_swiglu_sharded_factory(sharded, sharded_offsets, singleton)
        out[key] = sharded
        return out


_CLASSES: dict = {}


@contextlib.contextmanager
def adapters_disabled(chunks: list):
    """The base model: every adapted layer returns its base output (DPO/KTO's reference under LoRA)."""
    layers = [m for chunk in chunks for m in chunk.modules() if isinstance(m, LoraMixin)]
    for m in layers:
        m.lora_enabled = False
    try:
        yield len(layers)
    finally:
        for m in layers:
            m.lora_enabled = True


def _lora_class(base_cls: type) -> type:
    if base_cls not in _CLASSES:
        _CLASSES[base_cls] = type(f"Lora{base_cls.__name__}", (LoraMixin, base_cls), {})
    return _CLASSES[base_cls]


def add_lora(module, settings: LoraSettings, global_name: str, gated: bool = False, config=None,
             canonical: Optional[tuple] = None) -> None:
    """Turns a megatron Column/RowParallelLinear into its LoRA version in place. ``canonical``: the
    HF projections of a fused layer (``linear_qkv`` / gated ``linear_fc1``; needs ``config``) that
    get their own adapters; None: one adapter on the layer (fused mode)."""
    from megatron.core.tensor_parallel.layers import (ColumnParallelLinear, RowParallelLinear,
                                                      set_tensor_model_parallel_attributes)

    if isinstance(module, ColumnParallelLinear):
        column = True
        if module.gather_output:
            raise ValueError(f"{global_name}: LoRA on a column-parallel layer that gathers its output is not built")
    elif isinstance(module, RowParallelLinear):
        column = False
        if not module.input_is_parallel:
            raise ValueError(f"{global_name}: LoRA on a row-parallel layer with a replicated input is not built")
    else:
        raise ValueError(f"{global_name}: LoRA is built for megatron-core's local ColumnParallelLinear/"
                         f"RowParallelLinear, not {type(module).__name__} (run with the local layer spec: "
                         f"--transformer_impl local)")
    tp_rank, tp_size = module.tp_group.rank(), module.tp_group.size()
    if module.is_expert and tp_size > 1:
        raise ValueError("argument --expert_tensor_parallel_size: LoRA on experts split by expert tensor "
                         "parallelism is not built (use expert_tensor_parallel_size 1)")
    weight = module.weight
    r = settings.rank
    dtype = settings.dtype or weight.dtype
    in_global = module.input_size
    out_global = module.output_size
    meta = weight.device.type == "meta"
    layout = _fused_layout(global_name.rsplit(".", 1)[-1], gated, config, tp_size) if canonical else None
    factors = []  # (split, replicated) parameters
    if layout is not None:  # canonical: one adapter per targeted projection
        members, rule, geo = layout
        from megatron_swift.converters.transforms import hf_shapes

        rows = [shape[0] * tp_size for shape in hf_shapes(rule, (out_global // tp_size, r), geo)]  # global
        for member, rows_global in zip(members, rows):
            if member not in canonical:
                continue
            name = f"{global_name}.{member}"
            a_global = _init_global("A", (r, in_global), settings, f"{name}.lora_A.weight")
            b_global = _init_global("B", (rows_global, r), settings, f"{name}.lora_B.weight")
            b_local = b_global.chunk(tp_size, dim=0)[tp_rank]  # QKV and GATE_UP split each projection evenly
            part = _Part(tuple(a_global.shape), tuple(b_local.shape), dtype, weight.device)
            if not meta:
                with torch.no_grad():
                    part.lora_A.weight.copy_(a_global)
                    part.lora_B.weight.copy_(b_local)
            setattr(module, member, part)
            factors.append((part.lora_B.weight, part.lora_A.weight))
        module.lora_members, module.lora_targeted = members, tuple(m for m in members if m in canonical)
        module.lora_member_rows = [n // tp_size for n in rows]
        module.lora_rule, module.lora_geo = rule, geo
    else:
        a_global = _init_global("A", (r, in_global), settings, f"{global_name}.lora_A.weight")
        b_global = _init_global("B", (out_global, r), settings, f"{global_name}.lora_B.weight")
        if column:
            a_local = a_global
            b_local = _global_b_rows(b_global, tp_rank, tp_size, gated)
        else:
            a_local = a_global.chunk(tp_size, dim=1)[tp_rank]
            b_local = b_global
        module.lora_A = _Factor(tuple(a_local.shape), dtype, weight.device)
        module.lora_B = _Factor(tuple(b_local.shape), dtype, weight.device)
        if not meta:
            with torch.no_grad():
                module.lora_A.weight.copy_(a_local)
                module.lora_B.weight.copy_(b_local)
        factors.append((module.lora_B.weight, module.lora_A.weight) if column else
                       (module.lora_A.weight, module.lora_B.weight))
        module.lora_members, module.lora_targeted = (), ()
    for split, replicated in factors:
        set_tensor_model_parallel_attributes(split, True, 0 if column else 1, 1)
        set_tensor_model_parallel_attributes(replicated, False, -1, 1)
        if module.sequence_parallel:
            replicated.sequence_parallel = True  # sees a sequence shard: megatron sums its grad over TP
        if module.is_expert:
            for p in (split, replicated):
                p.allreduce = False  # expert-data-parallel reduce, as the expert's own weights
    module.__class__ = _lora_class(type(module))
    module.lora_column, module.lora_gated = column, gated
    module.lora_scaling, module.lora_dropout = settings.scaling, settings.dropout


def _global_module_names(model) -> list:
    """(global name, module) of every module of a GPTModel chunk: layer indices made global
    (``layer_number``) and local expert indices made global (the MoE layer's ``local_expert_indices``)."""
    out = []
    layers = getattr(getattr(model, "decoder", None), "layers", [])
    layer_offset = {i: layer.layer_number - 1 for i, layer in enumerate(layers)}
    expert_index = {}
    for i, layer in enumerate(layers):
        indices = getattr(layer.mlp, "local_expert_indices", None)
        if indices is not None:
            expert_index[i] = list(indices)
    for name, module in model.named_modules():
        m = re.match(r"decoder\.layers\.(\d+)\.", name)
        if m:
            local = int(m.group(1))
            rest = name[m.end():]
            e = re.search(r"experts\.local_experts\.(\d+)\.", rest)
            if e and local in expert_index:
                rest = rest[:e.start(1)] + str(expert_index[local][int(e.group(1))]) + rest[e.end(1):]
            name = f"decoder.layers.{layer_offset[local]}.{rest}"
        out.append((name, module))
    return out


def apply_lora(chunks: list, config, settings: LoraSettings) -> dict:
    """Adds adapters to the targeted linears of the (unwrapped or Float16Module-wrapped) chunks
    and freezes everything else (but ``modules_to_save`` and, with ``bias all``, the biases).
    Call before DDP so megatron allocates grad buffers and optimizer state for trainable
    parameters only. Collective-free; raises ValueError naming the argument for bad input.
    Returns counts: ``adapted`` layers and ``trainable`` / ``frozen`` parameter elements (this rank)."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from megatron_swift.model.builder import unwrap

    if settings.rank <= 0:
        raise ValueError(f"argument --lora_rank {settings.rank}: must be >= 1")
    if settings.alpha <= 0:
        raise ValueError(f"argument --lora_alpha {settings.alpha}: must be > 0")
    if settings.init_weights not in INIT_CHOICES:
        raise ValueError(f"argument --init_weights {settings.init_weights}: built are {', '.join(INIT_CHOICES)}")
    tied = any(getattr(unwrap(c), "share_embeddings_and_output_weights", False) for c in chunks)
    if tied and set(settings.modules_to_save) & {"word_embeddings", "output_layer", "embedding"}:
        raise ValueError(f"argument --modules_to_save {' '.join(settings.modules_to_save)}: the model ties its input "
                         f"and output embeddings; untie them (--untie_embeddings_and_output_weights true) to train "
                         f"them as modules_to_save")
    regex = re.compile(settings.target_regex) if settings.target_regex else None
    targets = None if regex else mcore_targets(settings.target_modules)
    unknown = set(settings.canonical) - set(FUSED_GROUPS)
    if unknown:
        raise ValueError(f"canonical LoRA on {sorted(unknown)}: only {', '.join(FUSED_GROUPS)} fuse projections")
    adapted = 0
    for chunk in chunks:
        model = unwrap(chunk)
        for name, module in _global_module_names(model):
            if not isinstance(module, (ColumnParallelLinear, RowParallelLinear)) or not name.startswith("decoder."):
                continue
            leaf = name.rsplit(".", 1)[-1]
            hit = bool(regex.fullmatch(name)) if regex else leaf in targets
            if hit:
                gated = leaf == "linear_fc1" and config.gated_linear_unit
                fused = _fused_layout(leaf, gated, config, 1)
                members = None if regex else targets[leaf]
                if members is None and leaf in settings.canonical:
                    members = FUSED_GROUPS[leaf]  # e.g. a PEFT adapter with different q/k/v A's
                if members is not None and fused is None:
                    members = None  # not a fused layer (an MLP without a gate): one adapter is exact
                add_lora(module, settings, name, gated=gated, config=config, canonical=members)
                adapted += 1
    trainable = frozen = 0
    for chunk in chunks:
        model = unwrap(chunk)
        for name, param in model.named_parameters():
            train = is_adapter_param(name) or (settings.bias == "all" and name.endswith(".bias")) or \
                any(re.search(rf"(^|\.){re.escape(m)}\.", name) for m in settings.modules_to_save)
            param.requires_grad_(train)
            if train:
                trainable += param.numel()
            else:
                frozen += param.numel()
        embedding = getattr(model, "embedding", None)
        if embedding is not None:
            # a frozen embedding's output needs no grad, and megatron's (reentrant) recompute then
            # drops the graph of every checkpointed layer: make it require grad (a leaf, no cost)
            embedding.register_forward_hook(_input_requires_grad)
    return {"adapted": adapted, "trainable": trainable, "frozen": frozen}


def _input_requires_grad(module, inputs, output):
    if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and not output.requires_grad:
        output.requires_grad_(True)
    return output


def check_targets_matched(adapted_total: int, settings: LoraSettings) -> None:
    if adapted_total == 0:
        what = f"--target_regex {settings.target_regex}" if settings.target_regex else \
            f"--target_modules {' '.join(settings.target_modules)}"
        raise ValueError(f"argument {what}: matches no linear layer of the model")


def lora_plus_overrides(settings: LoraSettings, lr: float, min_lr: float) -> Optional[dict]:
    """LoRA+ (``--lorap_lr_ratio``): B's learning rate x ratio, through megatron-core's optimizer
    param-group overrides."""
    if not settings.lorap_lr_ratio:
        return None
    from megatron.core.optimizer import ParamKey
    from megatron.core.optimizer_param_scheduler import ParamGroupOverride

    k = settings.lorap_lr_ratio
    return {ParamKey(name="*.lora_B.weight"): ParamGroupOverride(max_lr=lr * k, min_lr=min_lr * k)}


def apply_lora_everywhere(chunks: list, config, settings: LoraSettings) -> dict:
    """``apply_lora`` on this rank's chunks, then (collective) checks the targets matched some layer
    somewhere in the model and logs the trainable share."""
    import logging

    counts = apply_lora(chunks, config, settings)
    totals = torch.tensor([counts["adapted"], counts["trainable"], counts["frozen"]], dtype=torch.float64)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals)  # sums over replicas too: only the zero test and ratio matter
    check_targets_matched(int(totals[0].item()), settings)
    logging.getLogger("megatron_swift").info(
        "LoRA rank %d alpha %g on %d linear layers (this rank): %d trainable parameter elements, %d frozen "
        "(%.3f%% trainable)", settings.rank, settings.alpha, counts["adapted"], counts["trainable"],
        counts["frozen"], 100.0 * totals[1].item() / max(totals[1].item() + totals[2].item(), 1))
    return counts
