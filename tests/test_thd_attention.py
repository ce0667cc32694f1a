"""THD (packed, cu_seqlens) core attention for the local spec.

Oracles: ``kernels.attention.reference_attention`` (the plain formula) and megatron-core's own
``DotProductAttention`` run on each sequence alone; megatron's bshd RoPE per sequence for the THD
RoPE path; under TP=2 + sequence parallelism and PP=2 (real 2-process gloo jobs) the same
oracles plus padded-vs-THD model losses.
"""

from __future__ import annotations

import json

import pytest
import torch

from helpers import TESTS, torchrun

LENGTHS = [5, 1, 9, 3]


def make_config(**kw):
    from megatron.core.transformer import TransformerConfig

    base = dict(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2, kv_channels=8,
                attention_dropout=0.0, hidden_dropout=0.0, use_cpu_initialization=True,
                masked_softmax_fusion=False, attention_softmax_in_fp32=True)
    base.update(kw)
    return TransformerConfig(**base)


def make_attention(cls=None, **kw):
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_swift.kernels.attention import THDDotProductAttention

    cls = cls or THDDotProductAttention
    return cls(make_config(**kw), layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")


def thd_inputs(lengths, heads=4, groups=2, dim=8, seed=0, requires_grad=False):
    from megatron.core.packed_seq_params import PackedSeqParams

    g = torch.Generator().manual_seed(seed)
    t = sum(lengths)
    q, k, v = (torch.randn(t, h, dim, generator=g).requires_grad_(requires_grad) for h in (heads, groups, groups))
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max(lengths),
                             max_seqlen_kv=max(lengths))
    return q, k, v, cu, params


def megatron_alone(lengths, q, k, v, **config):
    """megatron-core's ``DotProductAttention`` run on every sequence of a THD row separately."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    plain = make_attention(DotProductAttention, **config)
    cu = [0] + torch.tensor(lengths).cumsum(0).tolist()
    return torch.cat([plain(q[a:b].unsqueeze(1), k[a:b].unsqueeze(1), v[a:b].unsqueeze(1), None).squeeze(1)
                      for a, b in zip(cu[:-1], cu[1:])])


def test_thd_equals_each_sequence_alone(megatron_world1):
    """Output and gradients of one THD call == attention run on every sequence separately (GQA):
    megatron's own kernel and the plain formula. Causal softmax attention runs through SDPA."""
    from megatron_swift.kernels.attention import reference_attention

    attn = make_attention()
    assert attn._fused_attention_fits()
    q, k, v, cu, params = thd_inputs(LENGTHS, requires_grad=True)
    out = attn(q, k, v, None, packed_seq_params=params)
    assert out.shape == (sum(LENGTHS), 4 * 8)
    bounds = list(zip(cu[:-1].tolist(), cu[1:].tolist()))
    torch.testing.assert_close(out, megatron_alone(LENGTHS, q, k, v), rtol=1e-5, atol=1e-6)
    ref = torch.cat([reference_attention(q[a:b], k[a:b], v[a:b]) for a, b in bounds])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)

    w = torch.randn_like(out)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_thd_keeps_megatrons_kernel_where_sdpa_would_differ(megatron_world1):
    """Attention dropout in training (drawn from megatron's RNG tracker), sliding windows and
    query-key layer scaling: the first two stay megatron's per-sequence kernel (bit-identical), the
    last is SDPA with megatron's combined scale."""
    q, k, v, cu, params = thd_inputs([6, 11, 4], seed=3)
    attn = make_attention(attention_dropout=0.5).train()
    assert not attn._fused_attention_fits()
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    states, cpu_state = tracker.get_states(), torch.get_rng_state()
    out = attn(q, k, v, None, packed_seq_params=params)
    tracker.set_states(states)
    torch.set_rng_state(cpu_state)
    assert torch.equal(out, megatron_alone([6, 11, 4], q, k, v, attention_dropout=0.5))
    windowed = make_attention(window_size=(2, 0))
    assert not windowed._fused_attention_fits()
    out = windowed(q, k, v, None, packed_seq_params=params)
    assert torch.equal(out, megatron_alone([6, 11, 4], q, k, v, window_size=(2, 0)))
    assert not torch.allclose(out, make_attention()(q, k, v, None, packed_seq_params=params))
    scaled = make_attention(apply_query_key_layer_scaling=True, fp16=True, params_dtype=torch.float16)
    assert scaled._fused_attention_fits() and scaled.scale_mask_softmax.scale is not None
    halves = [t.half() for t in (q, k, v)]
    torch.testing.assert_close(scaled(*halves, None, packed_seq_params=params).float(),
                               megatron_alone([6, 11, 4], *halves, apply_query_key_layer_scaling=True, fp16=True,
                                              params_dtype=torch.float16).float(), rtol=2e-3, atol=2e-3)


def test_no_attention_across_boundaries(megatron_world1):
    attn = make_attention()
    q, k, v, cu, params = thd_inputs(LENGTHS)
    out = attn(q, k, v, None, packed_seq_params=params)
    k2, v2 = k.clone(), v.clone()
    a, b = int(cu[2]), int(cu[3])  # change the third sequence's keys/values
    k2[a:b] += 1.0
    v2[a:b] -= 1.0
    out2 = attn(q, k2, v2, None, packed_seq_params=params)
    assert torch.equal(out[:a], out2[:a]) and torch.equal(out[b:], out2[b:])
    assert not torch.equal(out[a:b], out2[a:b])
    # and within a sequence it is causal: the first token of a sequence sees only itself
    from megatron_swift.kernels.attention import reference_attention

    assert not torch.allclose(reference_attention(q[a:b], k[a:b], v[a:b], causal=False), out[a:b])


def test_padded_cu_seqlens_and_4d_input(megatron_world1):
    """cu_seqlens_q_padded: each sequence at its padded offset, padding rows of the output zero;
    [t, 1, h, d] inputs are accepted too."""
    import dataclasses

    attn = make_attention()
    q, k, v, cu, params = thd_inputs(LENGTHS)
    compact = attn(q, k, v, None, packed_seq_params=params)
    pad_to = [8, 4, 12, 4]
    cu_pad = torch.tensor([0] + torch.tensor(pad_to).cumsum(0).tolist(), dtype=torch.int32)
    qp, kp, vp = (torch.zeros(sum(pad_to), x.shape[1], x.shape[2]) for x in (q, k, v))
    for (a, b), p in zip(zip(cu[:-1].tolist(), cu[1:].tolist()), cu_pad[:-1].tolist()):
        qp[p:p + b - a], kp[p:p + b - a], vp[p:p + b - a] = q[a:b], k[a:b], v[a:b]
    padded_params = dataclasses.replace(params, cu_seqlens_q_padded=cu_pad, cu_seqlens_kv_padded=cu_pad)
    out = attn(qp.unsqueeze(1), kp.unsqueeze(1), vp.unsqueeze(1), None, packed_seq_params=padded_params)
    for (a, b), p, room in zip(zip(cu[:-1].tolist(), cu[1:].tolist()), cu_pad[:-1].tolist(), pad_to):
        assert torch.equal(out[p:p + b - a], compact[a:b])
        assert not out[p + b - a:p + room].any()


def test_bshd_path_is_megatron_dot_product_attention(megatron_world1):
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(7, 3, h, 8, generator=g) for h in (4, 2, 2))
    ours = make_attention()(q, k, v, None)
    theirs = make_attention(DotProductAttention)(q, k, v, None)
    assert ours.shape == (7, 3, 32) and torch.equal(ours, theirs)


def test_local_spec_uses_thd_attention(megatron_world1):
    from megatron_swift.kernels.attention import THDDotProductAttention
    from megatron_swift.model.builder import decoder_block_spec

    spec = decoder_block_spec(make_config(num_layers=2, normalization="RMSNorm"))
    core = spec.layer_specs[0].submodules.self_attention.submodules.core_attention
    assert core is THDDotProductAttention


def test_rope_restarts_per_sequence_in_thd(megatron_world1):
    """megatron's THD RoPE (apply_rotary_pos_emb with cu_seqlens, unfused path on CPU) == bshd RoPE
    applied to each sequence from position 0."""
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    config = make_config()
    rope = RotaryEmbedding(kv_channels=8, rotary_percent=1.0, rotary_base=10000)
    freqs = rope(max(LENGTHS), packed_seq=True)
    q, _, _, cu, _ = thd_inputs(LENGTHS)
    thd = apply_rotary_pos_emb(q, freqs, config, cu_seqlens=cu)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        alone = apply_rotary_pos_emb(q[a:b].unsqueeze(1), freqs[:b - a], config).squeeze(1)
        torch.testing.assert_close(thd[a:b], alone, rtol=0, atol=1e-6)


def test_thd_rope_without_host_syncs_equals_megatrons(megatron_world1):
    """The installed THD RoPE (platform/mcore_compat: one gather, no per-sequence .item()) gives
    megatron-core's own result bit for bit, for a rotary table of max length (each sequence from
    position 0) and of one row per packed token, and makes no host sync."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    installed = rope_utils._apply_rotary_pos_emb_thd
    original = installed._megatron_swift_original  # the workaround is installed with the platform
    group = ps.get_context_parallel_group()
    for percent in (1.0, 0.5):  # 0.5: part of each head rotates (megatron's split and concatenation)
        rope = RotaryEmbedding(kv_channels=8, rotary_percent=percent, rotary_base=10000)
        for freqs in (rope(max(LENGTHS), packed_seq=True), rope(sum(LENGTHS), packed_seq=True)):
            q, _, _, cu, _ = thd_inputs(LENGTHS)
            q.requires_grad_(True)
            want = original(q, cu, freqs, cp_group=group)
            (want_grad,) = torch.autograd.grad(want, q, torch.ones_like(want))
            for _ in range(2):  # the second layer reuses the micro batch's cosines and sines
                with torch.profiler.profile() as prof:
                    got = installed(q, cu, freqs, cp_group=group)
                assert torch.equal(got, want)
                names = {e.name for e in prof.events()}
                assert "aten::item" not in names and "aten::_local_scalar_dense" not in names
            assert torch.equal(torch.autograd.grad(got, q, torch.ones_like(got))[0], want_grad)
            if percent == 1.0:
                assert "aten::cos" not in names, "cosines recomputed in the second layer"


@pytest.mark.slow
def test_thd_under_tp2_sp_and_pp2(tmp_path):
    """2 gloo ranks: TP=2 + SP (per-rank THD attention vs reference; model losses padded vs THD) and
    PP=2 (1F1B forward: loss and token count padded vs THD)."""
    torchrun(TESTS / "parallel" / "thd_worker.py", 2, ["--out", tmp_path], timeout=240)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["tp2_sp_heads_per_rank"] == [2, 1]  # 4 heads / 2 KV groups split over TP=2
    assert result["tp2_sp_attention_max_diff"] < 1e-5
    assert result["tp2_sp_loss_max_diff"] < 2e-5
    padded_sum, thd_sum = result["tp2_sp_loss_sums"]
    assert abs(padded_sum - thd_sum) < 1e-3
    (pl, pn), (tl, tn) = result["pp2"]["padded"], result["pp2"]["thd"]
    assert pn == tn > 0 and abs(pl - tl) < 1e-5
