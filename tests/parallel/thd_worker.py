"""THD (padding-free) attention and batches under real parallel layouts (run under torchrun, 2 ranks).

Oracles, per layout, inside the same job:
  tp2_sp  TP=2 + sequence parallelism: (a) this rank's THD core attention (its heads of a GQA
          layer) equals kernels.attention.reference_attention run on each sequence alone;
          (b) the tiny model's per-token losses for a mixed-length micro batch laid out padded and
          as one THD row are equal.
  pp2     PP=2 with megatron's 1F1B schedule (forward only): the loss sum and token count of four
          micro batches are the same padded and padding-free (fixed THD length, as the pipeline
          needs fixed shapes).
Writes OUT/result.json (rank 0) with the measured differences; the test asserts on them.
"""

from __future__ import annotations

import argparse
import json
import os

import torch


def samples(n: int, seed: int, vocab: int = 1000):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(2, 24, (1,), generator=g))
        ids = torch.randint(0, vocab, (length,), generator=g).tolist()
        prompt = int(torch.randint(0, length - 1, (1,), generator=g))
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def check_tp_sp(result: dict) -> None:
    from megatron.core import parallel_state as ps
    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron_swift.data import Collator
    from megatron_swift.kernels.attention import reference_attention
    from megatron_swift.model import build_model
    from megatron_swift.model.tiny import tiny_hf_config
    from megatron_swift.platform import ParallelLayout, init_parallel

    init_parallel(ParallelLayout(tensor_model_parallel_size=2), seed=11)
    chunks, config, _ = build_model(tiny_hf_config("qwen3"), dict(sequence_parallel=True))
    model = chunks[0].eval()
    core = model.decoder.layers[0].self_attention.core_attention
    heads, groups = core.num_attention_heads_per_partition, core.num_query_groups_per_partition
    dim = core.hidden_size_per_attention_head
    lengths = [3, 11, 1, 7]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    g = torch.Generator().manual_seed(100 + ps.get_tensor_model_parallel_rank())
    t = sum(lengths)
    q, k, v = (torch.randn(t, h, dim, generator=g) for h in (heads, groups, groups))
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max(lengths),
                             max_seqlen_kv=max(lengths))
    with torch.no_grad():
        out = core(q, k, v, None, packed_seq_params=params)
    ref = torch.cat([reference_attention(q[a:b], k[a:b], v[a:b]) for a, b in zip(cu[:-1], cu[1:])])
    result["tp2_sp_attention_max_diff"] = float((out - ref).abs().max())
    result["tp2_sp_heads_per_rank"] = [heads, groups]

    batch = samples(5, seed=3)
    padded = Collator(0, padding_free=False, pad_to_multiple_of=2)(batch)
    thd = Collator(0, padding_free=True, pad_to_multiple_of=2)(batch)
    losses = []
    with torch.no_grad():
        for b in (padded, thd):
            losses.append(model(b["input_ids"], b["position_ids"], attention_mask=None,
                                labels=b["labels"].clamp(min=0), packed_seq_params=b.get("packed_seq_params")))
    lp = losses[0][padded["labels"].ne(-100)]
    lt = losses[1][thd["labels"].ne(-100)]
    result["tp2_sp_loss_max_diff"] = float((lp - lt).abs().max())
    result["tp2_sp_loss_sums"] = [float(lp.sum()), float(lt.sum())]


def check_pp(result: dict) -> None:
    from megatron_swift.data import Collator
    from megatron_swift.model import build_model
    from megatron_swift.model.tiny import tiny_hf_config
    from megatron_swift.platform import ParallelLayout, init_parallel
    from megatron_swift.trainer.step import forward_backward

    init_parallel(ParallelLayout(pipeline_model_parallel_size=2), seed=11)  # re-initialises megatron's groups
    chunks, config, _ = build_model(tiny_hf_config("qwen3"))
    for c in chunks:
        c.eval()
    mbs, max_len, n_micro = 2, 24, 4
    data = samples(mbs * n_micro, seed=5)
    micro = [data[i:i + mbs] for i in range(0, len(data), mbs)]
    out = {}
    for name, collator in (("padded", Collator(0, padding_free=False, fixed_length=max_len)),
                           ("thd", Collator(0, padding_free=True, fixed_length=max_len * mbs))):
        batches = [collator(m) for m in micro]
        seq_length, micro_batch = collator.schedule_shape(mbs, max_len)
        with torch.no_grad():
            res = forward_backward(chunks, iter(batches), n_micro, seq_length, micro_batch, forward_only=True)
        out[name] = [res.loss, res.num_tokens]
    result["pp2"] = out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    args = p.parse_args()
    result = {}
    check_tp_sp(result)
    check_pp(result)
    from megatron_swift.platform import destroy_parallel

    if torch.distributed.get_rank() == 0:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "result.json"), "w") as f:
            json.dump(result, f)
    destroy_parallel()


if __name__ == "__main__":
    main()
