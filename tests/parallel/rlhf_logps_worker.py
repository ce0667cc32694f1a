"""Vocabulary-parallel log-prob gradients at TP=2 (run under torchrun, 2 gloo ranks, fp64).

Oracle: full-vocabulary ``torch.log_softmax`` autograd on the same logits (padded vocabulary
columns left out), objective ``sum(w * logp)`` with random per-token weights (as advantages or DPO's
per-sequence coefficients give). Measured for ``megatron_swift.rlhf.logprobs.token_logps`` and, to
show the check can fail, for a log-softmax built from plain (autograd-unaware) all-reduces, the
construction of ms-swift's GRPO/GKD log-probs before its fix. Writes OUT/result.json (rank 0).
"""

from __future__ import annotations

import argparse
import json
import os

import torch


def naive_token_logps(shard, labels, start, group):
    """log_softmax over the vocabulary with plain all-reduces (max, sum-exp, target gather)."""
    import torch.distributed as dist

    m = shard.detach().max(-1, keepdim=True).values
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    z = shard - m
    sum_exp = z.exp().sum(-1, keepdim=True)
    dist.all_reduce(sum_exp, group=group)  # no autograd: the other shards' terms get no gradient
    local = labels - start
    owned = (local >= 0) & (local < shard.shape[-1])
    target = z.gather(-1, local.clamp(0, shard.shape[-1] - 1).unsqueeze(-1)).squeeze(-1) * owned
    dist.all_reduce(target, group=group)
    return target - sum_exp.log().squeeze(-1)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    args = p.parse_args()
    from megatron.core import parallel_state as ps

    from megatron_swift.platform import ParallelLayout, destroy_parallel, init_parallel
    from megatron_swift.rlhf.logprobs import token_logps

    init_parallel(ParallelLayout(tensor_model_parallel_size=2), seed=1)
    rank = ps.get_tensor_model_parallel_rank()
    b, s, padded, vocab = 3, 7, 16, 13  # the last 3 columns are vocabulary padding (on rank 1)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(b, s, padded, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, vocab, (b, s), generator=g)
    labels[0, :2] = -100
    labels[2, 5:] = -100
    weights = torch.randn(b, s, generator=g, dtype=torch.float64)
    mask = labels.ne(-100)

    full = logits.clone().requires_grad_(True)
    ref = torch.log_softmax(full[..., :vocab], -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    (ref * weights).sum().backward()
    width = padded // 2
    start = rank * width
    want_grad = full.grad[..., start:start + width]

    shard = logits[..., start:start + width].clone().requires_grad_(True)
    ours = token_logps(shard, labels, vocab_size=vocab)
    (ours * weights).sum().backward()

    shard2 = logits[..., start:start + width].clone().requires_grad_(True)
    naive = naive_token_logps(shard2[..., :], labels.clamp(min=0), start, ps.get_tensor_model_parallel_group())
    naive = naive * mask
    (naive * weights).sum().backward()
    result = {
        "ours_value_max_diff": float((ours - ref.detach()).abs().max()),
        "ours_grad_max_diff": float((shard.grad - want_grad).abs().max()),
        "naive_grad_max_diff": float((shard2.grad - want_grad).abs().max()),
        "padded_columns_grad": float(shard.grad[..., max(0, vocab - start):].abs().max()) if start + width > vocab
        else 0.0,
        "dtype": str(ours.dtype),
    }
    diffs = torch.tensor([result["ours_value_max_diff"], result["ours_grad_max_diff"]], dtype=torch.float64)
    torch.distributed.all_reduce(diffs, op=torch.distributed.ReduceOp.MAX)
    result["ours_value_max_diff"], result["ours_grad_max_diff"] = diffs.tolist()
    if torch.distributed.get_rank() == 0:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "result.json"), "w") as f:
            json.dump(result, f)
    destroy_parallel()


if __name__ == "__main__":
    main()
