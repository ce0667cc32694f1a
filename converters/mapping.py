"""The declarative vocabulary family mappings are written in.

A family mapping is a tuple of :class:`Rule`: one Megatron-Core parameter name (local layer spec,
with ``{layer}`` / ``{expert}`` placeholders for the GLOBAL layer and expert index), the Hugging
Face tensor(s) it is made of, the transform between the two and the tensor-parallel split
dimension of the Megatron tensor. The shared engine does the rest: it finds the rule of every
parameter a rank holds (``plan.py``), reads (``load.py``) or writes (``write_hf.py``) the HF tensors
and shards / gathers them.

Transforms (small classes in ``transforms.py``: shapes, to-local, to-HF; a new one is one subclass):

``COPY``     same tensor; split along ``tp_dim`` under TP (``None``: replicated).
``VOCAB``    embedding / output rows: Megatron pads the vocabulary to a multiple of 128 x TP with
             zero rows; reading pads, writing drops the padding. Split along rows under TP.
``QKV``      ``linear_qkv`` = q, k, v fused PER QUERY GROUP: for each KV head g the rows are
             [the q heads of g, k_g, v_g]. TP splits whole groups.
``GATE_UP``  ``linear_fc1`` of a SwiGLU MLP = [gate; up]; under TP each rank holds
             [gate_shard; up_shard].

HF sources: ``Source.key`` is the layout published Hub checkpoints use, and the one ``to_hf``
writes. ``Source.alternatives`` are other layouts the reader also accepts, e.g. experts fused
into one 3-D tensor (``Stacked``: ``[num_experts, parts * rows, cols]``, the layout of
transformers 5's in-memory MoE modules) or a renamed key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional, Union

from .transforms import COPY, GATE_UP, QKV, VOCAB, Transform

TRANSFORMS = (COPY, VOCAB, QKV, GATE_UP)


@dataclass(frozen=True)
class Stacked:
    """An alternative HF layout: all experts of a layer in one tensor ``[E, parts * rows, cols]``;
    expert ``e``'s matrix holds ``parts`` HF tensors concatenated along its first dim and this
    source is part number ``part`` of them."""

    key: str
    parts: int = 1
    part: int = 0


@dataclass(frozen=True)
class Source:
    key: str
    alternatives: tuple[Union[str, Stacked], ...] = ()


def src(key: str, *alternatives: Union[str, Stacked]) -> Source:
    return Source(key, tuple(alternatives))


@dataclass(frozen=True)
class Rule:
    mcore: str
    hf: tuple[Source, ...]
    transform: Transform = COPY
    tp_dim: Optional[int] = None
    # Where the weights come from when the HF model ties input and output embeddings (the last
    # pipeline stage's copy of the embedding); tied tensors are not written back.
    tied_to: Optional[Source] = None
    # The TP split is whatever the model's parameter says (``tp_dim`` is taken from it): MLA's down
    # projections are replicated in Transformer Engine's spec but column-split in the local spec.
    tp_follows_model: bool = False

    def __post_init__(self):
        if not isinstance(self.transform, Transform):
            raise ValueError(f"rule {self.mcore}: unknown transform {self.transform!r} (a Transform instance)")
        if len(self.hf) != self.transform.parts:
            raise ValueError(f"rule {self.mcore}: transform {self.transform} takes {self.transform.parts} "
                             f"HF tensors, got {len(self.hf)}")

    @property
    def is_expert(self) -> bool:
        return "{expert}" in self.mcore


@dataclass(frozen=True)
class FamilyMapping:
    name: str
    rules: tuple[Rule, ...]
    by_name: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        table = {}
        for rule in self.rules:
            if rule.mcore in table:
                raise ValueError(f"family {self.name}: two rules for {rule.mcore}")
            table[rule.mcore] = rule
        object.__setattr__(self, "by_name", table)

    def rule_for(self, template: str) -> Rule:
        try:
            return self.by_name[template]
        except KeyError:
            raise KeyError(f"family {self.name}: no conversion rule for Megatron parameter {template!r}") from None


# --------------------------------------------------------------------------- Megatron name forms

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_LOCAL_EXPERT = re.compile(r"\.mlp\.experts\.local_experts\.(\d+)\.")
_TE_GROUPED_EXPERT = re.compile(r"\.mlp\.experts\.(linear_fc[12])\.(weight|bias)(\d+)$")

# Transformer Engine spec name -> local spec name (same tensor): TE fuses the norms into the
# following linear layer. The local spec is what runs on CPU; both are read and written.
TE_ALIASES = (
    (".self_attention.linear_qkv.layer_norm_weight", ".input_layernorm.weight"),
    (".mlp.linear_fc1.layer_norm_weight", ".pre_mlp_layernorm.weight"),
    (".self_attention.linear_q_up_proj.layer_norm_weight", ".self_attention.q_layernorm.weight"),
    (".self_attention.linear_kv_up_proj.layer_norm_weight", ".self_attention.kv_layernorm.weight"),
)


def split_name(name: str) -> tuple[str, Optional[int], Optional[int]]:
    """``decoder.layers.3.mlp.experts.local_experts.1.linear_fc1.weight`` ->
    (``decoder.layers.{layer}.mlp.experts.local_experts.{expert}.linear_fc1.weight``, 3, 1).

    Indices are the ones in the name (LOCAL to the pipeline stage / expert-parallel rank); TE
    names are mapped to the local spec's (``linear_qkv.layer_norm_weight`` ->
    ``input_layernorm.weight``, grouped ``experts.linear_fc1.weight{J}`` ->
    ``experts.local_experts.{J}.linear_fc1.weight``).
    """
    layer = expert = None
    m = _LAYER.match(name)
    if m:
        layer = int(m.group(1))
        name = "decoder.layers.{layer}." + name[m.end():]
    m = _TE_GROUPED_EXPERT.search(name)
    if m:
        expert = int(m.group(3))
        name = name[:m.start()] + f".mlp.experts.local_experts.{{expert}}.{m.group(1)}.{m.group(2)}"
    m = _LOCAL_EXPERT.search(name)
    if m:
        expert = int(m.group(1))
        name = name[:m.start()] + ".mlp.experts.local_experts.{expert}." + name[m.end():]
    for te, local in TE_ALIASES:
        if name.endswith(te):
            name = name[: -len(te)] + local
    return name, layer, expert


def format_key(template: str, layer: Optional[int], expert: Optional[int]) -> str:
    return template.replace("{layer}", str(layer)).replace("{expert}", str(expert))


# ------------------------------------------------------------------ building blocks for families

HF_LAYER = "model.layers.{layer}."
L = "decoder.layers.{layer}."


def embeddings() -> tuple[Rule, ...]:
    """Input embedding, final norm and output layer (tied to the embedding when the HF config says)."""
    embed = src("model.embed_tokens.weight")
    return (
        Rule("embedding.word_embeddings.weight", (embed,), VOCAB, tp_dim=0),
        Rule("decoder.final_layernorm.weight", (src("model.norm.weight"),)),
        Rule("output_layer.weight", (src("lm_head.weight"),), VOCAB, tp_dim=0, tied_to=embed),
    )


def attention_norm() -> tuple[Rule, ...]:
    return (Rule(L + "input_layernorm.weight", (src(HF_LAYER + "input_layernorm.weight"),)),)


def attention(qkv_bias: bool = False, qk_norm: bool = False) -> tuple[Rule, ...]:
    a = HF_LAYER + "self_attn."
    rules = [
        *attention_norm(),
        Rule(L + "self_attention.linear_qkv.weight",
             (src(a + "q_proj.weight"), src(a + "k_proj.weight"), src(a + "v_proj.weight")), QKV, tp_dim=0),
        Rule(L + "self_attention.linear_proj.weight", (src(a + "o_proj.weight"),), tp_dim=1),
    ]
    if qkv_bias:
        rules.append(Rule(L + "self_attention.linear_qkv.bias",
                          (src(a + "q_proj.bias"), src(a + "k_proj.bias"), src(a + "v_proj.bias")), QKV, tp_dim=0))
    if qk_norm:
        rules += [
            Rule(L + "self_attention.q_layernorm.weight", (src(a + "q_norm.weight"),)),
            Rule(L + "self_attention.k_layernorm.weight", (src(a + "k_norm.weight"),)),
        ]
    return tuple(rules)


def pre_mlp_norm() -> tuple[Rule, ...]:
    return (Rule(L + "pre_mlp_layernorm.weight", (src(HF_LAYER + "post_attention_layernorm.weight"),)),)


def swiglu(mcore_prefix: str, hf_prefix: str, gate: str = "gate_proj", up: str = "up_proj", down: str = "down_proj",
           stacked_prefix: Optional[str] = None) -> tuple[Rule, ...]:
    """A SwiGLU MLP: ``{mcore_prefix}linear_fc1`` = [gate; up], ``linear_fc2`` = down.

    ``stacked_prefix``: also accept experts fused into ``{stacked_prefix}gate_up_proj`` /
    ``{stacked_prefix}down_proj`` (``[E, 2 * F, H]`` / ``[E, H, F]``, gate first).
    """
    gate_alt = up_alt = down_alt = ()
    if stacked_prefix is not None:
        gate_alt = (Stacked(stacked_prefix + "gate_up_proj", parts=2, part=0),)
        up_alt = (Stacked(stacked_prefix + "gate_up_proj", parts=2, part=1),)
        down_alt = (Stacked(stacked_prefix + "down_proj"),)
    return (
        Rule(mcore_prefix + "linear_fc1.weight",
             (src(f"{hf_prefix}{gate}.weight", *gate_alt), src(f"{hf_prefix}{up}.weight", *up_alt)),
             GATE_UP, tp_dim=0),
        Rule(mcore_prefix + "linear_fc2.weight", (src(f"{hf_prefix}{down}.weight", *down_alt),), tp_dim=1),
    )


def dense_mlp() -> tuple[Rule, ...]:
    return pre_mlp_norm() + swiglu(L + "mlp.", HF_LAYER + "mlp.")


def routed_experts(hf_moe: str = "mlp", gate: str = "gate_proj", up: str = "up_proj", down: str = "down_proj",
                   router_alternatives: tuple = ()) -> tuple[Rule, ...]:
    """Router + per-expert SwiGLU MLPs (``{hf_moe}.experts.{expert}.*``; the fused 3-D layout
    ``mlp.experts.gate_up_proj`` / ``down_proj`` is read too)."""
    return (
        Rule(L + "mlp.router.weight", (src(f"{HF_LAYER}{hf_moe}.gate.weight", *router_alternatives),)),
        *swiglu(L + "mlp.experts.local_experts.{expert}.", f"{HF_LAYER}{hf_moe}.experts.{{expert}}.",
                gate=gate, up=up, down=down, stacked_prefix=HF_LAYER + "mlp.experts."),
    )


def shared_expert() -> tuple[Rule, ...]:
    """Qwen2-MoE's shared expert and its sigmoid gate."""
    return (
        *swiglu(L + "mlp.shared_experts.", HF_LAYER + "mlp.shared_expert."),
        Rule(L + "mlp.shared_experts.gate_weight", (src(HF_LAYER + "mlp.shared_expert_gate.weight"),)),
    )
