"""GRPORollout on 2 data-parallel gloo ranks with a scripted engine (tests/parallel/grpo_rollout_worker.py):
what the micro batches carry against a re-computation from the completions themselves (rewards from
an ms-swift-style plugin, group advantages over the whole generation batch, the packed row's gather
index and labels, dapo's token share), dynamic sampling, and the loss of one train_step (on-policy
dapo: -Σ A·len / Σ len)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import TESTS, torchrun

WORKER = TESTS / "parallel" / "grpo_rollout_worker.py"


@pytest.mark.slow
def test_rollout_micro_batches_advantages_and_dynamic_sampling(tmp_path):
    from megatron_swift.model.tiny import tiny_hf_config
    from megatron_swift.template.tiny_tokenizer import make_tiny_tokenizer

    root = tmp_path / "root"
    make_tiny_tokenizer(str(root / "hf"), "qwen3")
    tiny_hf_config("qwen3").save_pretrained(str(root / "hf"))
    torchrun(WORKER, 2, ["--root", root, "--out", tmp_path / "out", "--dynamic_sample"], timeout=240)
    ranks = [json.load(open(tmp_path / "out" / f"rank{r}.json")) for r in (0, 1)]
    lengths, advs = [], []
    for rec in ranks:
        for mb in rec["micro_batches"]:
            lengths += mb["lengths"]
            advs += mb["advantages"]
            idx = np.array(mb["token_index"])
            mask = np.array(mb["mask"]).astype(bool)
            ids, labels = np.array(mb["input_ids"][0]), np.array(mb["labels"][0])
            # the gather index points at the positions whose label is the completion token
            assert (labels[idx[mask]] == ids[idx[mask] + 1]).all()
            assert (labels != -100).sum() == mask.sum() == sum(mb["lengths"])
    lengths, advs = np.array(lengths), np.array(advs)
    rewards = (lengths % 2 == 0).astype(float)  # the plugin's reward, recomputed from the completions
    groups = rewards.reshape(-1, 4)
    assert (groups.std(1) > 0).all()  # dynamic sampling replaced the groups whose rewards agree
    assert ranks[0]["engine_calls"] > 1
    want = ((groups - groups.mean(1, keepdims=True)) / (groups.std(1, ddof=1, keepdims=True) + 1e-4)).reshape(-1)
    np.testing.assert_allclose(advs, want, rtol=1e-5)
    share = lengths.sum() / sum(len(rec["micro_batches"]) for rec in ranks)  # tokens / (micro batches x DP)
    assert all(mb["tokens_per_share"] == pytest.approx(share) for rec in ranks for mb in rec["micro_batches"])
    for rec in ranks:
        assert rec["loss"] == pytest.approx(-(advs * lengths).sum() / lengths.sum(), abs=1e-6)
        assert rec["rollout_metrics"]["reward"] == pytest.approx(rewards.mean())
        assert rec["rollout_metrics"]["completions/mean_length"] == pytest.approx(lengths.mean())
        assert rec["grad_norm"] > 0 and "rollout/kl" in rec["metrics"]
    logged = [json.loads(line) for line in open(tmp_path / "out" / "completions.jsonl")]
    assert len(logged) == len(lengths) // 2 and {"prompt", "completion", "rewards", "advantage"} <= set(logged[0])


@pytest.mark.slow
def test_steps_per_generation_reuses_the_generation_with_old_logps(tmp_path):
    """--steps_per_generation 2: one generation feeds two steps (no second engine call); the old
    log-probs (a forward-only pass of the policy right after generating) equal the first step's
    training log-probs (its loss is the on-policy value), and the second step trains the other half
    off-policy (after an update: ratios move, the loss is no longer the on-policy value)."""
    from megatron_swift.model.tiny import tiny_hf_config
    from megatron_swift.template.tiny_tokenizer import make_tiny_tokenizer

    root = tmp_path / "root"
    make_tiny_tokenizer(str(root / "hf"), "qwen3")
    tiny_hf_config("qwen3").save_pretrained(str(root / "hf"))
    torchrun(WORKER, 2, ["--root", root, "--out", tmp_path / "out", "--steps_per_generation", "2"], timeout=240)
    ranks = [json.load(open(tmp_path / "out" / f"rank{r}.json")) for r in (0, 1)]
    losses = []
    for k in (0, 1):
        lengths = np.array([x for rec in ranks for mb in rec["steps"][k]["micro_batches"] for x in mb["lengths"]])
        advs = np.array([x for rec in ranks for mb in rec["steps"][k]["micro_batches"] for x in mb["advantages"]])
        losses.append((ranks[0]["steps"][k]["loss"], -(advs * lengths).sum() / lengths.sum()))
        assert all(mb["has_old_logps"] for rec in ranks for mb in rec["steps"][k]["micro_batches"])
        assert ranks[0]["steps"][k]["engine_calls"] == 1
    assert losses[0][0] == pytest.approx(losses[0][1], abs=1e-6)  # π_old = π at the generation's first step
    assert abs(losses[1][0] - losses[1][1]) > 1e-6  # the second step is off-policy
    assert ranks[0]["steps"][0]["micro_batches"][0]["input_ids"] != ranks[0]["steps"][1]["micro_batches"][0]["input_ids"]
    assert ranks[0]["steps"][1]["rollout_metrics"] == {}  # rewards are logged once per generation


@pytest.mark.slow
def test_kl_in_reward_subtracts_beta_kl_before_the_advantages(tmp_path):
    """--kl_in_reward (beta 0.5): rewards - beta x Σ_t (logπ_old - logπ_ref) per completion, then the group
    advantages; the loss has no KL term (on-policy dapo: -Σ A·len / Σ len)."""
    from megatron_swift.model.tiny import tiny_hf_config
    from megatron_swift.template.tiny_tokenizer import make_tiny_tokenizer

    root = tmp_path / "root"
    make_tiny_tokenizer(str(root / "hf"), "qwen3")
    tiny_hf_config("qwen3").save_pretrained(str(root / "hf"))
    torchrun(WORKER, 2, ["--root", root, "--out", tmp_path / "out", "--kl_in_reward"], timeout=240)
    ranks = [json.load(open(tmp_path / "out" / f"rank{r}.json")) for r in (0, 1)]
    mbs = [mb for rec in ranks for mb in rec["micro_batches"]]
    lengths = np.array([x for mb in mbs for x in mb["lengths"]])
    advs = np.array([x for mb in mbs for x in mb["advantages"]])
    kl = np.array([x for mb in mbs for x in mb["kl"]])
    assert np.abs(kl).max() > 1e-3  # the reference differs from the policy
    groups = ((lengths % 2 == 0).astype(float) - 0.5 * kl).reshape(-1, 4)
    want = ((groups - groups.mean(1, keepdims=True)) / (groups.std(1, ddof=1, keepdims=True) + 1e-4)).reshape(-1)
    np.testing.assert_allclose(advs, want, rtol=1e-4, atol=1e-5)
    assert ranks[0]["loss"] == pytest.approx(-(advs * lengths).sum() / lengths.sum(), abs=1e-6)
    assert "kl" not in ranks[0]["metrics"] and ranks[0]["rollout_metrics"]["kl_in_reward/kl"] == \
        pytest.approx(kl.mean(), rel=1e-4)
