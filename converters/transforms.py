"""The shard math of the reusable transforms (see ``mapping.py`` for what each one means).

A transform is one small class (:class:`Transform`): how many HF tensors make one Megatron tensor
(``parts``), their shapes (``hf_shapes``), this TP rank's shard from them (``to_local``) and the HF
tensors from every TP rank's shard (``to_hf``). A new transform is one subclass; rules name an
instance. Pure functions on tensors, no I/O and no process groups, so they are unit-tested on
their own:

* ``hf_shapes``: the HF tensors' shapes a Megatron tensor of a given global shape is made of;
* ``hf_to_local``: this TP rank's Megatron shard, reading only the HF rows/columns it needs
  through a ``read(part, index)`` callback (``index``: one slice per HF dim);
* ``local_shards_to_hf``: every TP rank's shard (in TP rank order) -> the HF tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Sequence

if TYPE_CHECKING:  # torch is imported where tensors are made: family declarations (and the
    import torch  # argument validator reading them) stay torch-free

    from .mapping import Rule

else:
    class _Torch:
        """torch, imported on first use."""

        def __getattr__(self, name):
            import torch as module

            return getattr(module, name)

    torch = _Torch()

Index = tuple  # one slice per dim of the HF tensor
Reader = Callable[[int, Index], "torch.Tensor"]


@dataclass(frozen=True)
class Geometry:
    """What the transforms need to know about the model (from the HF config)."""

    num_heads: int
    num_groups: int
    head_dim: int
    vocab_size: int
    padded_vocab_size: int

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_groups


def geometry(config, settings) -> Geometry:
    """From megatron's TransformerConfig + our GPTSettings."""
    return Geometry(
        num_heads=config.num_attention_heads,
        num_groups=config.num_query_groups or config.num_attention_heads,
        head_dim=config.kv_channels,
        vocab_size=settings.vocab_size,
        padded_vocab_size=settings.padded_vocab_size,
    )


def _rows(start: int, stop: int, ndim: int) -> Index:
    return (slice(start, stop),) + (slice(None),) * (ndim - 1)


def _along(dim: int, start: int, stop: int, ndim: int) -> Index:
    index = [slice(None)] * ndim
    index[dim] = slice(start, stop)
    return tuple(index)


def _cat(shards: Sequence[torch.Tensor], dim: int = 0) -> torch.Tensor:
    return shards[0] if len(shards) == 1 else torch.cat(list(shards), dim=dim)


class Transform:
    """Megatron tensor <-> ``parts`` HF tensors. Subclasses override the three methods."""

    name = "?"
    parts = 1

    def hf_shapes(self, rule: "Rule", shape: tuple, geo: Geometry) -> list[tuple[int, ...]]:
        return [shape]

    def to_local(self, rule: "Rule", read: Reader, local_shape: tuple, tp_rank: int, tp_size: int,
                 geo: Geometry) -> torch.Tensor:
        raise NotImplementedError

    def to_hf(self, rule: "Rule", shards: Sequence[torch.Tensor], geo: Geometry) -> list[torch.Tensor]:
        raise NotImplementedError

    def read_rows(self, rule, read: Reader, local_shape: tuple, tp_rank: int, tp_size: int, geo: Geometry,
                  a: int, b: int) -> torch.Tensor:
        """Rows ``[a, b)`` of this rank's shard (default: the whole shard, sliced)."""
        return self.to_local(rule, read, local_shape, tp_rank, tp_size, geo)[a:b]

    def __repr__(self) -> str:
        return self.name

    def __str__(self) -> str:
        return self.name


class Copy(Transform):
    """Same tensor; split along ``tp_dim`` under TP (``None``: replicated)."""

    name = "copy"

    def to_local(self, rule, read, local_shape, tp_rank, tp_size, geo):
        ndim = len(local_shape)
        if rule.tp_dim is None:
            return read(0, (slice(None),) * ndim)
        n = local_shape[rule.tp_dim]
        return read(0, _along(rule.tp_dim, tp_rank * n, (tp_rank + 1) * n, ndim))

    def to_hf(self, rule, shards, geo):
        if rule.tp_dim is None or len(shards) == 1:
            return [shards[0]]
        return [torch.cat(list(shards), dim=rule.tp_dim)]


class Vocab(Transform):
    """Embedding / output rows, zero-padded to the padded vocabulary; split along rows."""

    name = "vocab"

    def hf_shapes(self, rule, shape, geo):
        return [(geo.vocab_size, *shape[1:])]

    def to_local(self, rule, read, local_shape, tp_rank, tp_size, geo):
        ndim, rows = len(local_shape), local_shape[0]
        start, stop = tp_rank * rows, (tp_rank + 1) * rows
        real_stop = min(stop, geo.vocab_size)
        if start >= real_stop:  # this rank holds padding rows only
            return torch.zeros(local_shape)
        part = read(0, _rows(start, real_stop, ndim))
        if real_stop - start == rows:
            return part
        out = torch.zeros(local_shape, dtype=part.dtype)
        out[: real_stop - start] = part
        return out

    def to_hf(self, rule, shards, geo):
        return [_cat(shards)[: geo.vocab_size]]


class FusedQKV(Transform):
    """``linear_qkv`` = q, k, v fused per query group ([q heads of g, k_g, v_g]); TP splits groups."""

    name = "qkv"
    parts = 3

    def hf_shapes(self, rule, shape, geo):
        d, rest = geo.head_dim, shape[1:]
        return [(geo.num_heads * d, *rest), (geo.num_groups * d, *rest), (geo.num_groups * d, *rest)]

    def to_local(self, rule, read, local_shape, tp_rank, tp_size, geo):
        ndim, rest = len(local_shape), local_shape[1:]
        d, hpg = geo.head_dim, geo.heads_per_group
        groups = geo.num_groups // tp_size
        if local_shape[0] != groups * (hpg + 2) * d:
            raise ValueError(f"{rule.mcore}: local rows {local_shape[0]} != {groups} query groups x "
                             f"({hpg} + 2) heads x {d}")
        g0, g1 = tp_rank * groups, (tp_rank + 1) * groups
        q = read(0, _rows(g0 * hpg * d, g1 * hpg * d, ndim)).reshape(groups, hpg * d, *rest)
        k = read(1, _rows(g0 * d, g1 * d, ndim)).reshape(groups, d, *rest)
        v = read(2, _rows(g0 * d, g1 * d, ndim)).reshape(groups, d, *rest)
        return torch.cat([q, k, v], dim=1).reshape(local_shape)

    def to_hf(self, rule, shards, geo):
        d, hpg, ng = geo.head_dim, geo.heads_per_group, geo.num_groups
        full = _cat(shards)
        rest = tuple(full.shape[1:])
        grouped = full.reshape(ng, (hpg + 2) * d, *rest)
        q = grouped[:, : hpg * d].reshape(ng * hpg * d, *rest)
        k = grouped[:, hpg * d:(hpg + 1) * d].reshape(ng * d, *rest)
        v = grouped[:, (hpg + 1) * d:].reshape(ng * d, *rest)
        return [q, k, v]


class GateUp(Transform):
    """``linear_fc1`` of a SwiGLU MLP = [gate; up]; each TP rank holds [gate_shard; up_shard]."""

    name = "gate_up"
    parts = 2

    def hf_shapes(self, rule, shape, geo):
        return [(shape[0] // 2, *shape[1:])] * 2

    def to_local(self, rule, read, local_shape, tp_rank, tp_size, geo):
        n, ndim = local_shape[0] // 2, len(local_shape)
        gate = read(0, _rows(tp_rank * n, (tp_rank + 1) * n, ndim))
        up = read(1, _rows(tp_rank * n, (tp_rank + 1) * n, ndim))
        return torch.cat([gate, up], dim=0)

    def read_rows(self, rule, read, local_shape, tp_rank, tp_size, geo, a, b):
        n, ndim = local_shape[0] // 2, len(local_shape)
        if b <= n:
            return read(0, _rows(tp_rank * n + a, tp_rank * n + b, ndim))
        if a >= n:
            return read(1, _rows(tp_rank * n + a - n, tp_rank * n + b - n, ndim))
        return super().read_rows(rule, read, local_shape, tp_rank, tp_size, geo, a, b)

    def to_hf(self, rule, shards, geo):
        n = shards[0].shape[0] // 2
        if len(shards) == 1:
            return [shards[0][:n], shards[0][n:]]
        return [torch.cat([s[:n] for s in shards], dim=0), torch.cat([s[n:] for s in shards], dim=0)]


COPY, VOCAB, QKV, GATE_UP = Copy(), Vocab(), FusedQKV(), GateUp()


def hf_shapes(rule: "Rule", global_shape: Sequence[int], geo: Geometry) -> list[tuple[int, ...]]:
    return rule.transform.hf_shapes(rule, tuple(global_shape), geo)


def global_shape_of(rule: "Rule", local_shape: Sequence[int], tp_size: int) -> tuple[int, ...]:
    shape = list(local_shape)
    if rule.tp_dim is not None:
        shape[rule.tp_dim] *= tp_size
    return tuple(shape)


def hf_to_local(rule: "Rule", read: Reader, local_shape: Sequence[int], tp_rank: int, tp_size: int,
                geo: Geometry, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """This TP rank's shard of the Megatron tensor (``local_shape``), read from the HF tensors;
    with ``rows=(a, b)`` only rows ``[a, b)`` of it (the gate or up half of a ``GATE_UP`` shard is
    read on its own)."""
    local_shape = tuple(local_shape)
    if rows is not None:
        return rule.transform.read_rows(rule, read, local_shape, tp_rank, tp_size, geo, *rows)
    return rule.transform.to_local(rule, read, local_shape, tp_rank, tp_size, geo)


def local_shards_to_hf(rule: "Rule", shards: Sequence[torch.Tensor], geo: Geometry) -> list[torch.Tensor]:
    """All TP ranks' shards (TP rank order) -> the HF tensors of ``rule.hf`` (same order)."""
    return rule.transform.to_hf(rule, shards, geo)
