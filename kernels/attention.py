"""Core attention for megatron-core's local (non-Transformer-Engine) layer spec, with THD support.

megatron-core's ``DotProductAttention`` asserts ``packed_seq_params is None``: on a machine without
Transformer Engine there is no padding-free (THD) attention. ``THDDotProductAttention`` is a
drop-in subclass (same constructor and ``forward`` signature) that

* for ordinary ``[s, b, heads, dim]`` batches runs ``DotProductAttention.forward`` unchanged, so the
  local spec's numerics do not move;
* for ``packed_seq_params.qkv_format == "thd"`` (query/key/value ``[t, heads, dim]``, the packed
  sequences back to back, boundaries in ``cu_seqlens``) attends within each sequence separately
  and concatenates the outputs: causal within a sequence, nothing across a boundary. Plain causal
  softmax attention (the usual case) is one ``scaled_dot_product_attention`` call per sequence on
  views of the packed row, GQA inside the kernel (torch's fused flash kernel on CPU: 2x faster than
  megatron's baddbmm/softmax/bmm for fwd+bwd and no [heads, s, s] tensors kept; equal to megatron's
  kernel to ~1e-7); attention dropout in training
  (megatron's RNG tracker), sliding windows and other softmax types run megatron's own kernel per
  sequence, bit-identical to attending to each sequence alone. Returns ``[t, heads_per_rank * dim]``
  (Transformer Engine's THD output shape).

``cu_seqlens_q_padded`` (sequences laid out at padded offsets) is honoured: the attention runs on
each sequence's real tokens and the padding rows of the output are zero. Tensor parallelism
(heads split per rank), GQA (``num_query_groups < num_attention_heads``) and sequence parallelism
(the attention sees the full sequence after the QKV all-gather) need nothing extra. Context
parallelism is refused by the parent class, as for the local spec.

RoPE for THD is megatron-core's own: ``apply_rotary_pos_emb(..., cu_seqlens=...)`` restarts the
positions of every sequence (its unfused path runs on CPU), so the model needs no change.

Multi-latent attention (MLA) builds its core attention with ``k_channels`` / ``v_channels`` (query/key
head dim != value head dim): megatron-core 0.16's ``DotProductAttention`` does not take them (only
Transformer Engine's does), though its math already works per tensor shape; this class accepts
them and sizes its output by the value head dim, so MLA runs on the local spec too.

``reference_attention`` is the plain formula the tests compare against.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


def reference_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        softmax_scale: Optional[float] = None, causal: bool = True) -> torch.Tensor:
    """One sequence: query ``[s, heads, dim]``, key/value ``[s, groups, dim]`` -> ``[s, heads * dim]``
    (softmax in fp32, keys/values repeated over the query heads of their group)."""
    s, heads, dim = query.shape
    groups = key.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(dim)
    k = key.repeat_interleave(heads // groups, dim=1)
    v = value.repeat_interleave(heads // groups, dim=1)
    scores = torch.einsum("qhd,khd->hqk", query.float(), k.float()) * scale
    if causal:
        mask = torch.ones(s, s, dtype=torch.bool, device=query.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("hqk,khd->qhd", probs, v.float()).to(query.dtype)
    return out.reshape(s, heads * dim)


def _segments(packed_seq_params, total: int):
    """(row offsets, real boundaries) of the packed sequences as Python lists. Read from the tensors
    once per micro batch and kept on its ``PackedSeqParams`` (every layer gets the same object), so
    a forward pays one host sync for the boundaries, not one per layer."""
    cached = getattr(packed_seq_params, "_megatron_swift_segments", None)
    if cached is not None:
        return cached
    cu_q = packed_seq_params.cu_seqlens_q
    cu_kv = packed_seq_params.cu_seqlens_kv if packed_seq_params.cu_seqlens_kv is not None else cu_q
    if cu_kv is not cu_q and not torch.equal(cu_q, cu_kv.to(cu_q.device)):
        raise ValueError("THDDotProductAttention: causal self-attention needs cu_seqlens_q == cu_seqlens_kv")
    padded = packed_seq_params.cu_seqlens_q_padded
    starts = (padded if padded is not None else cu_q).tolist()
    real = cu_q.tolist()
    if starts[-1] != total:
        raise ValueError(f"THD attention: cu_seqlens ends at {starts[-1]} but the packed row has {total} tokens")
    packed_seq_params._megatron_swift_segments = (starts, real)
    return starts, real


def _spans(starts, real):
    """Per packed sequence: the slice of its real tokens (None when empty) and how many padding rows
    follow them up to the next sequence's offset."""
    for i in range(len(real) - 1):
        begin, length = starts[i], real[i + 1] - real[i]
        yield (slice(begin, begin + length) if length else None), starts[i + 1] - begin - length


class THDDotProductAttention(DotProductAttention):
    """``DotProductAttention`` that also takes packed (THD) batches and MLA's separate key/value head
    dims; see the module docstring."""

    def __init__(self, *args, k_channels: Optional[int] = None, v_channels: Optional[int] = None, **kwargs):
        super().__init__(*args, **kwargs)
        if v_channels is not None:  # MLA: the output is heads x value head dim
            heads = self.num_attention_heads_per_partition
            self.hidden_size_per_partition = heads * v_channels
            self.hidden_size_per_attention_head = v_channels

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is None or packed_seq_params.qkv_format != "thd":
            return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                   attention_bias=attention_bias, packed_seq_params=None)
        if attention_bias is not None:
            raise ValueError("THDDotProductAttention: attention_bias is not supported")
        if query.dim() == 4:  # [t, 1, heads, dim]
            if query.size(1) != 1:
                raise ValueError(f"THD attention expects one packed row, got batch size {query.size(1)}")
            query, key, value = query.squeeze(1), key.squeeze(1), value.squeeze(1)
        starts, real = _segments(packed_seq_params, query.size(0))
        if self._fused_attention_fits():
            return self._fused_attention(query, key, value, starts, real)
        outputs = []
        for seg, padding in _spans(starts, real):
            if seg is not None:
                out = super().forward(query[seg].unsqueeze(1), key[seg].unsqueeze(1), value[seg].unsqueeze(1), None,
                                      packed_seq_params=None)
                outputs.append(out.squeeze(1))
            if padding > 0:
                outputs.append(query.new_zeros(padding, self.hidden_size_per_partition))
        return torch.cat(outputs, dim=0)

    def _fused_attention_fits(self) -> bool:
        """Whether megatron's attention of one sequence is exactly causal softmax attention, which one
        SDPA call computes: causal mask, plain softmax, no sliding window, no dropout in this pass
        (megatron's dropout draws from its RNG tracker; SDPA's would not)."""
        softmax = self.scale_mask_softmax
        return (softmax.attn_mask_type == AttnMaskType.causal and softmax.window_size is None
                and self.config.softmax_type == "vanilla"
                and (not self.training or self.attention_dropout.p == 0.0))

    def _fused_attention(self, query, key, value, starts, real):
        """The packed row ``[t, heads, dim]`` split into its sequences, one
        ``scaled_dot_product_attention`` per sequence on a ``[1, heads, s, dim]`` view (CPU: the
        fused flash kernel; no [heads, s, s] score and probability tensors kept for backward), keys and
        values shared by the query heads of their group inside the kernel (``enable_gqa``, no
        repeated copies); padding rows of the output are zero."""
        scale = self.softmax_scale * (self.scale_mask_softmax.scale or 1.0)  # query-key layer scaling
        gqa = query.size(1) != key.size(1)
        # One split per tensor, not a slice per sequence: a slice's backward writes its gradient into
        # a zero tensor of the whole row (sequences x row size of memory traffic), a split's backward
        # is one concatenation.
        # pieces alternate: a sequence's real tokens, then the padding rows up to the next offset
        sizes = [n for seg, padding in _spans(starts, real) for n in ((seg.stop - seg.start) if seg else 0, padding)]
        qs, ks, vs = (t.split(sizes, dim=0) for t in (query, key, value))
        outputs = []
        for q, k, v, padding in zip(qs[0::2], ks[0::2], vs[0::2], qs[1::2]):
            if q.size(0):  # [s, heads, dim] -> [1, heads, s, dim]
                # with a batch dimension the CPU backend takes its flash kernel (3-D: math)
                out = torch.nn.functional.scaled_dot_product_attention(
                    q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0),
                    is_causal=True, scale=scale, enable_gqa=gqa)
                outputs.append(out.squeeze(0).transpose(0, 1))
            if padding.size(0):
                outputs.append(padding.new_zeros(padding.size(0), padding.size(1), value.size(-1)))
        out = torch.cat(outputs, dim=0) if len(outputs) > 1 else outputs[0]
        return out.reshape(query.size(0), self.hidden_size_per_partition)
