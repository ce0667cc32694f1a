"""GRPO's math (megatron_swift/rlhf/grpo.py) against independent oracles: advantages against a numpy
re-implementation of ms-swift's / the papers' formulas; per-token losses and their reductions against
TRL 1.16's own ``GRPOTrainer._compute_loss`` (called on a stand-in trainer with the same log-probs) and
formulas written here; rollout importance sampling and mismatch metrics against formulas."""

from __future__ import annotations

import collections
import math
import types

import numpy as np
import pytest
import torch

from megatron_swift.rlhf.grpo import (GRPOLossSettings, advantages, k3_kl, mismatch_sums, per_token_loss,
                                      reduce_loss, reward_statistics, rollout_is_weights)


# ------------------------------------------------------------------------------------------ advantages

def numpy_advantages(r_funcs, weights, k, estimator, scale):
    """Written from the GRPO / RLOO / REINFORCE++ / Dr.GRPO / GDPO definitions, loop by loop."""
    n, f = r_funcs.shape
    r = np.array([sum(weights[j] * r_funcs[i, j] for j in range(f) if not np.isnan(r_funcs[i, j]))
                  for i in range(n)])
    adv = np.zeros(n)
    if scale == "gdpo":
        total = np.zeros(n)
        for j in range(f):
            for g in range(n // k):
                vals = r_funcs[g * k:(g + 1) * k, j]
                ok = vals[~np.isnan(vals)]
                mu = ok.mean() if len(ok) else 0.0
                sd = ok.std(ddof=1) if len(ok) > 1 else 0.0
                for i in range(k):
                    v = vals[i]
                    total[g * k + i] += weights[j] * (0.0 if np.isnan(v) else (v - mu) / (sd + 1e-8))
        return (total - total.mean()) / (total.std(ddof=1) + 1e-8), r
    for g in range(n // k):
        group = r[g * k:(g + 1) * k]
        for i in range(k):
            if estimator == "rloo":
                others = np.delete(group, i)
                adv[g * k + i] = group[i] - others.mean()  # the leave-one-out baseline
            else:
                adv[g * k + i] = group[i] - group.mean()
    if scale == "none":
        return adv, r
    src = adv if estimator == "reinforce_plus_plus" else r
    if scale == "batch":
        std = np.full(n, src.std(ddof=1))
    else:
        std = np.concatenate([np.full(k, src[g * k:(g + 1) * k].std(ddof=1)) for g in range(n // k)])
    return adv / (std + 1e-4), r


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce_plus_plus"])
@pytest.mark.parametrize("scale", ["group", "batch", "none", "gdpo"])
def test_advantages_equal_numpy(estimator, scale):
    gen = torch.Generator().manual_seed(0)
    k, groups = 4, 3
    r = torch.rand(k * groups, 2, generator=gen, dtype=torch.float64)
    r[:k, 0] = 1.0  # a group whose first reward has zero spread
    r[5, 1] = float("nan")  # a function that gave no reward
    w = torch.tensor([1.0, 0.5], dtype=torch.float64)
    got, rewards = advantages(r, w, k, estimator, scale)
    want, want_r = numpy_advantages(r.numpy(), w.numpy(), k, estimator, scale)
    np.testing.assert_allclose(rewards.numpy(), want_r, rtol=1e-12)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-12)
    if scale != "gdpo":  # group means removed: advantages sum to 0 within each group
        np.testing.assert_allclose(got.view(groups, k).sum(1).numpy(), 0, atol=1e-9)


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce_plus_plus"])
def test_kl_penalty_is_subtracted_from_the_rewards(estimator):
    gen = torch.Generator().manual_seed(4)
    r = torch.rand(8, 2, generator=gen, dtype=torch.float64)
    kl = torch.rand(8, generator=gen, dtype=torch.float64)
    w = torch.tensor([1.0, 2.0], dtype=torch.float64)
    got, rewards = advantages(r, w, 4, estimator, "batch", kl_penalty=kl)
    # the penalty as one more reward column of weight 1
    want, want_r = numpy_advantages(torch.cat([r, -kl[:, None]], 1).numpy(), [1.0, 2.0, 1.0], 4, estimator, "batch")
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9)
    np.testing.assert_allclose(rewards.numpy(), want_r, rtol=1e-12)


def test_advantages_zero_spread_group_gives_zero_and_bad_groups_raise():
    r = torch.tensor([[1.0], [1.0], [0.0], [1.0]])
    adv, _ = advantages(r, torch.ones(1), 2, "grpo", "group")
    assert adv[:2].abs().max() == 0 and adv[2] < 0 < adv[3]
    with pytest.raises(ValueError, match="num_generations=3"):
        advantages(r, torch.ones(1), 3)


def test_reward_statistics():
    r = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    stats = reward_statistics(r.sum(1), r, ["acc", "fmt"], 2)
    assert stats["reward"] == pytest.approx(1.25)
    assert stats["frac_reward_zero_std"] == 0.5
    assert stats["rewards/acc/mean"] == 0.75 and stats["rewards/fmt/mean"] == 0.5
    assert stats["reward_std"] == pytest.approx(math.sqrt(0.5) / 2)


# ------------------------------------------------------------------------------------------ losses vs TRL

def _batch(seed=0, b=4, t=6):
    gen = torch.Generator().manual_seed(seed)
    logps = -torch.rand(b, t, generator=gen, dtype=torch.float64) * 2
    old = logps + 0.3 * torch.randn(b, t, generator=gen, dtype=torch.float64)  # off-policy: ratios clip
    ref = logps + 0.2 * torch.randn(b, t, generator=gen, dtype=torch.float64)
    adv = torch.randn(b, generator=gen, dtype=torch.float64)
    mask = torch.ones(b, t, dtype=torch.float64)
    for i, n in enumerate([6, 3, 5, 1][:b]):
        mask[i, n:] = 0
    return logps, old, ref, adv, mask


def trl_loss(logps, old, ref, adv, mask, s: GRPOLossSettings, num_items=None):
    """TRL 1.16's GRPOTrainer._compute_loss on a stand-in trainer that returns ``logps``."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    acc = types.SimpleNamespace(num_processes=1, reduce=lambda x, reduction: x, gather=lambda x: x,
                                gather_for_metrics=lambda x: x, sync_gradients=True)
    fake = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=s.importance_sampling_level,
        beta=s.beta, loss_type=s.loss_type, epsilon_low=s.epsilon, epsilon_high=s.eps_high,
        args=types.SimpleNamespace(delta=s.delta, use_bias_correction_kl=False, sapo_temperature_pos=s.tau_pos,
                                   sapo_temperature_neg=s.tau_neg, steps_per_generation=1),
        use_vllm=False, vllm_importance_sampling_correction=False, model=types.SimpleNamespace(training=True),
        max_completion_length=s.max_completion_length, current_gradient_accumulation_steps=1, accelerator=acc,
        _entropy_bonus_enabled=False, aux_loss_enabled=False, _metrics=collections.defaultdict(
            lambda: collections.defaultdict(list)))
    b, t = logps.shape
    inputs = {"prompt_ids": torch.zeros(b, 1, dtype=torch.long), "prompt_mask": torch.ones(b, 1),
              "completion_ids": torch.zeros(b, t, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref}
    if num_items is not None:
        inputs["num_items_in_batch"] = torch.tensor(float(num_items))
    loss = GRPOTrainer._compute_loss(fake, None, inputs)
    return loss, fake._metrics["train"]


CASES = [
    dict(loss_type="grpo"), dict(loss_type="bnpo"), dict(loss_type="dr_grpo", max_completion_length=8),
    dict(loss_type="dapo"), dict(loss_type="grpo", epsilon_high=0.28), dict(loss_type="grpo", delta=1.3),
    dict(loss_type="grpo", importance_sampling_level="sequence"), dict(loss_type="dapo", beta=0.0),
    dict(loss_type="cispo", epsilon_high=1.1), dict(loss_type="sapo"), dict(loss_type="sapo", beta=0.0),
    dict(loss_type="bnpo", importance_sampling_level="sequence", delta=1.05, epsilon=0.1),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_loss_and_gradient_equal_trl(case):
    s = GRPOLossSettings(**case)
    logps, old, ref, adv, mask = _batch()
    ours_logps = logps.clone().requires_grad_(True)
    trl_logps = logps.clone().requires_grad_(True)
    tokens = float(mask.sum())
    loss, m, sums = per_token_loss(ours_logps, adv, mask, s, old_logps=old, ref_logps=ref)
    num, den = reduce_loss(loss, m, s, tokens_per_share=tokens)
    ours = num / den
    want, metrics = trl_loss(trl_logps, old, ref, adv, mask, s, num_items=tokens)
    tol = dict(rtol=1e-6, atol=1e-9) if s.loss_type == "sapo" else dict(rtol=1e-10, atol=1e-12)  # TRL: fp32 τ
    torch.testing.assert_close(ours, want, **tol)
    ours.backward()
    want.backward()
    torch.testing.assert_close(ours_logps.grad, trl_logps.grad, **tol)
    assert ours_logps.grad.abs().sum() > 0
    if s.beta:
        assert float(sums["kl"][0] / sums["kl"][1]) == pytest.approx(metrics["kl"][0], rel=1e-9)
    # TRL measures clipping on the ratio after --delta capped it (so high clips vanish when delta < 1 + ε_high);
    # ms-swift and this code measure it on the ratio itself
    if s.loss_type in ("grpo", "bnpo", "dr_grpo", "dapo") and s.delta is None:
        for name in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
            assert float(sums[name][0] / sums[name][1]) == pytest.approx(metrics[name][0], rel=1e-9, abs=1e-12)
        assert sums["clip_ratio/region_mean"][0] > 0  # the case exercises clipping
    if s.loss_type == "cispo":
        assert float(sums["cispo_clip_ratio"][0] / sums["cispo_clip_ratio"][1]) == \
            pytest.approx(metrics["cispo_clip_ratio"][0], rel=1e-9)


def test_token_level_formulas_written_out():
    """grpo at the token level, written from the paper: -min(ρA, clip(ρ)A) + β·k3, sequence token means."""
    s = GRPOLossSettings(loss_type="grpo", beta=0.04, epsilon=0.2, epsilon_high=0.3, delta=1.25)
    logps, old, ref, adv, mask = _batch(1)
    loss, m, _ = per_token_loss(logps, adv, mask, s, old_logps=old, ref_logps=ref)
    num, den = reduce_loss(loss, m, s)
    want = 0.0
    for i in range(logps.shape[0]):
        terms = []
        for t in range(logps.shape[1]):
            if not mask[i, t]:
                continue
            rho = math.exp(logps[i, t] - old[i, t])
            a = float(adv[i])
            surrogate = min(min(rho, 1.25) * a, min(max(rho, 0.8), 1.3) * a)
            d = float(ref[i, t] - logps[i, t])
            terms.append(-surrogate + 0.04 * (math.exp(d) - d - 1))
        want += sum(terms) / len(terms)
    assert den == logps.shape[0]
    assert float(num) == pytest.approx(want, rel=1e-12)


def test_sequence_token_level_value_is_sequence_ratio_gradient_is_per_token():
    logps, old, ref, adv, mask = _batch(2)
    base = dict(loss_type="bnpo", beta=0.0, epsilon=10.0)  # no clipping: a plain ratio x advantage
    seq = GRPOLossSettings(importance_sampling_level="sequence", **base)
    st = GRPOLossSettings(importance_sampling_level="sequence_token", **base)
    a, b = logps.clone().requires_grad_(True), logps.clone().requires_grad_(True)
    la, ma, _ = per_token_loss(a, adv, mask, seq, old_logps=old)
    lb, mb, _ = per_token_loss(b, adv, mask, st, old_logps=old)
    torch.testing.assert_close(la * ma, lb * mb)  # same value
    (lb * mb).sum().backward()
    seq_ratio = torch.exp(((logps - old) * mask).sum(-1) / mask.sum(-1))
    torch.testing.assert_close(b.grad, -(seq_ratio * adv).unsqueeze(-1).expand_as(mask) * mask)


def test_on_policy_loss_is_minus_mean_advantage_and_kl_zero_at_reference():
    """ρ = 1 on-policy: the grpo loss value is -mean(A) (+ β·0 when ref = policy)."""
    logps, _, _, adv, mask = _batch(3)
    s = GRPOLossSettings(loss_type="grpo", beta=0.04)
    loss, m, sums = per_token_loss(logps, adv, mask, s, ref_logps=logps.clone())
    num, den = reduce_loss(loss, m, s)
    assert float(num / den) == pytest.approx(float(-adv.mean()), rel=1e-12)
    assert float(sums["kl"][0]) == 0.0


def test_reductions_contract():
    """The four reductions as (numerator, denominator) and dapo's share weighting: K micro batches each
    returning Σℓm·K/N, averaged, give the global token mean."""
    logps, old, ref, adv, mask = _batch(4)
    loss = torch.rand_like(logps)
    total, tokens = float((loss * mask).sum()), float(mask.sum())
    assert reduce_loss(loss, mask, GRPOLossSettings(loss_type="bnpo"))[1] == int(tokens)
    num, den = reduce_loss(loss, mask, GRPOLossSettings(loss_type="dr_grpo", max_completion_length=10))
    assert (float(num), den) == (pytest.approx(total), 40)
    halves = [(loss[:2], mask[:2]), (loss[2:], mask[2:])]
    share = tokens / len(halves)
    per_mb = [reduce_loss(lo, ma, GRPOLossSettings(loss_type="dapo"), tokens_per_share=share) for lo, ma in halves]
    assert sum(float(n) / d for n, d in per_mb) / len(per_mb) == pytest.approx(total / tokens)
    with pytest.raises(ValueError, match="global batch's completion token count"):
        reduce_loss(loss, mask, GRPOLossSettings(loss_type="cispo"))


# ------------------------------------------------------------------------------------------ rollout correction

def test_rollout_importance_sampling_modes():
    old = torch.log(torch.tensor([[1.0, 3.0, 1.5, 0.5], [4.0, 4.0, 4.0, 1.0]], dtype=torch.float64))
    rollout = torch.zeros_like(old)  # ratios = exp(old - rollout) = the numbers above
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.float64)
    w, ex = rollout_is_weights(old, rollout, mask, "token_truncate", 2.0)
    torch.testing.assert_close(w, torch.tensor([[1.0, 2.0, 1.5, 0.5], [2.0, 2.0, 2.0, 1.0]], dtype=torch.float64))
    w, _ = rollout_is_weights(old, rollout, mask, "token_mask", 2.0)
    torch.testing.assert_close(w, torch.tensor([[1.0, 0.0, 1.5, 0.5], [0.0, 0.0, 0.0, 1.0]], dtype=torch.float64))
    geo0, geo1 = (1 * 3 * 1.5) ** (1 / 3), (4 * 4 * 4 * 1) ** (1 / 4)  # 1.65 (kept), 2.83 (over)
    w, ex = rollout_is_weights(old, rollout, mask, "sequence_truncate", 2.0)
    torch.testing.assert_close(w[:, 0], torch.tensor([geo0, 2.0], dtype=torch.float64))
    assert ex[1].all() and not ex[0].any() and geo1 > 2
    w, _ = rollout_is_weights(old, rollout, mask, "sequence_mask", 2.0)
    torch.testing.assert_close(w, torch.tensor([[1.0, 3.0, 1.5, 0.5], [0, 0, 0, 0]], dtype=torch.float64))


def test_rollout_is_weights_multiply_the_loss_and_are_detached():
    logps, _, _, adv, mask = _batch(5)
    rollout = logps.detach() + 0.5 * torch.randn(logps.shape, generator=torch.Generator().manual_seed(1),
                                                 dtype=torch.float64)
    s = GRPOLossSettings(loss_type="bnpo", beta=0.0, rollout_importance_sampling_mode="token_truncate",
                         rollout_importance_sampling_threshold=1.5)
    x = logps.clone().requires_grad_(True)
    loss, m, sums = per_token_loss(x, adv, mask, s, rollout_logps=rollout)
    w = torch.exp(logps - rollout).clamp(max=1.5)
    plain, _, _ = per_token_loss(logps, adv, mask, GRPOLossSettings(loss_type="bnpo", beta=0.0))
    torch.testing.assert_close(loss.detach(), plain * w)
    (loss * m).sum().backward()
    torch.testing.assert_close(x.grad, -(adv.unsqueeze(-1) * w) * mask)  # on-policy: ∇ρ = 1, weights constant
    assert 0 < float(sums["rollout_correction/clipped_frac"][0]) < float(mask.sum())


def test_off_policy_sequence_mask_drops_drifted_negative_sequences():
    logps, _, _, _, mask = _batch(6)
    adv = torch.tensor([-1.0, -1.0, 1.0, 1.0], dtype=torch.float64)
    behaviour = logps + torch.tensor([[0.5], [0.0], [0.5], [0.0]], dtype=torch.float64)  # seq 0, 2 drifted
    s = GRPOLossSettings(loss_type="grpo", beta=0.0, off_policy_sequence_mask_delta=0.1)
    _, m, _ = per_token_loss(logps, adv, mask, s, old_logps=behaviour)
    assert m[0].sum() == 0 and torch.equal(m[1:], mask[1:])  # drifted and A < 0: dropped; A > 0 kept


def test_mismatch_metrics():
    train = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64)
    rollout = torch.tensor([[-1.1, -1.8, -9.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    sums = {k: float(v[0] / v[1]) for k, v in mismatch_sums(train, rollout, mask).items()}
    d = np.array([0.1, -0.2])
    assert sums["rollout/kl"] == pytest.approx(float(-d.mean()))
    assert sums["rollout/abs_diff"] == pytest.approx(0.15)
    assert sums["rollout/k3_kl"] == pytest.approx(float((np.exp(d) - d - 1).mean()))
    assert sums["rollout/chi2_token"] == pytest.approx(float((np.exp(d) ** 2).mean() - 1))
    assert sums["rollout/log_ppl_abs_diff"] == pytest.approx(0.05)


def test_k3_kl_clamps_like_ms_swift():
    f64 = dict(dtype=torch.float64)
    assert float(k3_kl(torch.tensor(50.0, **f64), torch.tensor(0.0, **f64))) == 10.0
    assert float(k3_kl(torch.tensor(0.3, **f64), torch.tensor(0.1, **f64))) == pytest.approx(math.exp(0.2) - 0.2 - 1)


def test_high_entropy_mask_keeps_the_policy_term_on_high_entropy_tokens_only():
    from megatron_swift.rlhf.grpo import high_entropy_mask

    logps, _, ref, adv, mask = _batch(7)
    entropy = torch.rand(logps.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    keep = high_entropy_mask(entropy, mask, 0.25)
    values = entropy[mask.bool()]
    threshold = float(np.quantile(values.numpy(), 0.75))  # numpy's linear interpolation, as torch.quantile
    torch.testing.assert_close(keep, ((entropy >= threshold) & mask.bool()).to(mask.dtype))
    assert 0 < keep.sum() < mask.sum()
    s = GRPOLossSettings(loss_type="bnpo", beta=0.04)
    masked, _, _ = per_token_loss(logps, adv, mask, s, ref_logps=ref, entropy_mask=keep)
    plain, _, _ = per_token_loss(logps, adv, mask, s, ref_logps=ref)
    kl = 0.04 * k3_kl(ref, logps)
    torch.testing.assert_close(masked, (plain - kl) * keep + kl)  # the KL term stays on every token
