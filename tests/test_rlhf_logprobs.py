"""Per-token / per-sequence log-probs of megatron_swift.rlhf.logprobs.

* TP=2 gradient (2 gloo ranks): vs full-vocabulary ``log_softmax`` autograd in fp64 with random
  per-token weights; the same job measures a plain-all-reduce log-softmax, which must be far off
  (so the check can fail). Tolerance 1e-5: megatron's CE computes in fp32 (observed ~2e-7).
* Sequence sums: a THD row (with its padding segment) gives the same per-sequence sums as the
  padded rows of the same sequences, and the padding segment is not counted.
"""

from __future__ import annotations

import json

import pytest
import torch

from helpers import TESTS, torchrun


@pytest.mark.slow
def test_vocab_parallel_logps_gradient_tp2(tmp_path):
    torchrun(TESTS / "parallel" / "rlhf_logps_worker.py", 2, ["--out", tmp_path], timeout=180)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["ours_value_max_diff"] < 1e-5
    assert result["ours_grad_max_diff"] < 1e-5
    assert result["padded_columns_grad"] == 0.0
    assert result["naive_grad_max_diff"] > 1e-2  # plain all-reduces lose the -softmax term off the owner rank


def test_sequence_sums_thd_equal_padded(megatron_world1):
    from megatron_swift.data import Collator
    from megatron_swift.rlhf.logprobs import sequence_sums, token_logps

    g = torch.Generator().manual_seed(0)
    pairs = []
    for n in (5, 9):
        ids = [torch.randint(0, 50, (n,), generator=g).tolist() for _ in range(2)]
        pairs.append({"chosen_input_ids": ids[0], "chosen_labels": [-100, -100] + ids[0][2:],
                      "rejected_input_ids": ids[1] + [7, 8, 9], "rejected_labels": [-100] + ids[1][1:] + [7, 8, 9]})
    padded = Collator(0, padding_free=False)(pairs)
    thd = Collator(0, padding_free=True, pad_to_multiple_of=16)(pairs)  # a trailing padding segment
    assert padded["num_pairs"] == thd["num_pairs"] == 2
    assert thd["packed_seq_params"].cu_seqlens_q.numel() == 6  # 4 sequences + the padding segment
    sums = []
    for batch in (padded, thd):
        # the same logits per token in both layouts: a function of the token id and position in its sequence
        logits = torch.sin(batch["input_ids"].unsqueeze(-1) * 0.37 + batch["position_ids"].unsqueeze(-1)
                           + torch.arange(64) * 0.11) * 4
        sums.append(sequence_sums(token_logps(logits, batch["labels"], vocab_size=60), batch, 4))
    assert torch.allclose(sums[0], sums[1], atol=1e-5), sums
    ones = sequence_sums(torch.ones_like(thd["labels"], dtype=torch.float32), thd, 5)
    assert ones.tolist()[:4] == [5.0, 9.0, 8.0, 12.0]  # collation order: chosen, chosen, rejected, rejected
