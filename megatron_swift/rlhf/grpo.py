"""GRPO's math, pure torch: advantages, the per-token surrogate of every ``--loss_type``, its reduction
to the trainer's ``(numerator, denominator)`` contract, rollout importance-sampling correction and the
rollout/trainer mismatch metrics. No process groups here: callers pass the global numbers they need.

Notation (ms-swift / TRL): per completion ``i`` and completion token ``t``, ``logπ`` the training
log-prob (at the sampling temperature), ``logπ_old`` the log-prob of the policy that sampled (on-policy:
``sg(logπ)``), ``logπ_ref`` the reference's, ``A_i`` the advantage, ``m`` the completion mask.

* ratio ``ρ = exp(logπ - logπ_old)`` per token (``importance_sampling_level token``), or per sequence
  ``exp(mean_t(logπ - logπ_old))`` (``sequence``, GSPO), or ``sequence_token`` (GSPO-token: the
  sequence ratio's value with each token's gradient).
* ``grpo|bnpo|dr_grpo|dapo``: ``ℓ = -min(ρ'A, clip(ρ, 1-ε, 1+ε_high)A)``, ``ρ' = min(ρ, δ)`` with
  ``--delta`` (INTELLECT-2 two-sided clip), else ``ρ``.
  ``cispo``: ``ℓ = -sg(min(ρ, ε_high))·A·logπ``. ``sapo``: ``ℓ = -(4/τ)·σ(τ(ρ-1))·A``, ``τ = τ_pos`` when
  ``A > 0``, else ``τ_neg``.
* KL to the reference (k3, ``beta != 0``): ``D = e^{ref-logπ} - (ref-logπ) - 1`` (ratio clamped to ±20
  and D to ±10, as ms-swift), ``ℓ += β·D``.
* rollout importance sampling (``--rollout_importance_sampling_mode``): ``ℓ *= w`` with ``w`` from
  ``exp(logπ_old - logπ_rollout)`` (truncated or masked at the threshold, per token or per sequence).

Reductions (:func:`reduce_loss`), in the trainer's contract (trainer/step.py): each micro batch returns
``(numerator, denominator)``; megatron averages ``numerator / denominator`` over micro batches and
data-parallel ranks, or with ``--calculate_per_token_loss true`` divides the global sum of numerators by
the global sum of denominators.

* ``grpo``, ``sapo``: ``(Σ_i Σ_t ℓm / Σ_t m, number of completions)``: the mean over completions of each
  completion's token mean (per micro batch; globally with calculate_per_token_loss).
* ``bnpo``: ``(Σ ℓm, Σ m)``: the token mean of the micro batch (globally: of the global batch).
* ``dr_grpo``: ``(Σ ℓm, completions x max_completion_length)``.
* ``dapo``, ``cispo``: the token mean over the whole global batch whatever the flag:
  ``(Σ ℓm · K / N, 1)`` with ``N`` the global batch's completion tokens and ``K`` the number of micro
  batches x data-parallel ranks (each micro batch then weighs ``1/K``: ``Σ_all ℓm / N``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")
ADVANTAGE_ESTIMATORS = ("grpo", "rloo", "reinforce_plus_plus")
SCALE_REWARDS = ("group", "batch", "none", "gdpo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence", "sequence_token")
ROLLOUT_IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")

STD_EPS = 1e-4  # advantages / (std + 1e-4), as ms-swift and TRL
LOG_RATIO_BOUND = 20.0  # exp() arguments are clamped here (ms-swift's SAFETY_BOUND)


@dataclass(frozen=True)
class GRPOLossSettings:
    loss_type: str = "grpo"
    beta: float = 0.04
    epsilon: float = 0.2
    epsilon_high: Optional[float] = None  # None: epsilon
    delta: Optional[float] = None
    importance_sampling_level: str = "token"
    tau_pos: float = 1.0
    tau_neg: float = 1.05
    max_completion_length: int = 512
    rollout_importance_sampling_mode: Optional[str] = None
    rollout_importance_sampling_threshold: float = 2.0
    off_policy_sequence_mask_delta: Optional[float] = None

    @property
    def eps_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


# ------------------------------------------------------------------------------------------ advantages

def advantages(rewards_per_func: torch.Tensor, reward_weights: torch.Tensor, num_generations: int,
               estimator: str = "grpo", scale_rewards: str = "group", kl_penalty: Optional[torch.Tensor] = None):
    """``rewards_per_func [N, F]`` (the whole generation batch, prompt-major groups of ``num_generations``;
    NaN: that function gave no reward for that completion) -> ``(advantages [N], rewards [N])``.

    ``R = Σ_f w_f r_f`` (NaNs skipped). ``grpo``: ``R - mean_group``; ``rloo``: ``K/(K-1)·(R - mean_group)``
    (the mean of the other K-1); ``reinforce_plus_plus``: ``R - mean_group``. Then divided by
    ``std + 1e-4`` (unbiased std): the group's rewards (``group``), the batch's (``batch``) or nothing
    (``none``); reinforce++ divides by the std of the advantages themselves. ``gdpo``: each function
    normalised within its groups (``(r - mean)/(std + 1e-8)``), weighted, summed, then normalised over
    the batch. ``kl_penalty [N]`` (``--kl_in_reward``: ``beta x Σ_t (logπ_old - logπ_ref)``) is subtracted
    from ``R`` before the baseline (not with gdpo, as ms-swift)."""
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown advantage_estimator {estimator!r}; expected one of {ADVANTAGE_ESTIMATORS}")
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"unknown scale_rewards {scale_rewards!r}; expected one of {SCALE_REWARDS}")
    k = num_generations
    rewards = (rewards_per_func * reward_weights.to(rewards_per_func).unsqueeze(0)).nansum(dim=1)
    if kl_penalty is not None and scale_rewards != "gdpo":
        rewards = rewards - kl_penalty.to(rewards)
    if rewards.numel() % k:
        raise ValueError(f"{rewards.numel()} completions are not groups of num_generations={k}")
    grouped = rewards.view(-1, k)
    mean = grouped.mean(dim=1).repeat_interleave(k)
    if scale_rewards == "gdpo":
        total = torch.zeros_like(rewards)
        for f in range(rewards_per_func.shape[1]):
            r = rewards_per_func[:, f].view(-1, k)
            valid = ~torch.isnan(r)
            n = valid.sum(dim=1, keepdim=True)
            g_mean = torch.nansum(r, dim=1, keepdim=True) / n.clamp(min=1)
            g_var = torch.nansum((r - g_mean) ** 2, dim=1, keepdim=True) / (n - 1).clamp(min=1)
            normed = torch.nan_to_num((r - g_mean) / (g_var.sqrt() + 1e-8), nan=0.0)
            total = total + reward_weights[f].to(total) * normed.view(-1)
        return (total - total.mean()) / (total.std() + 1e-8), rewards
    if estimator == "rloo" and k > 1:
        adv = (rewards - mean) * k / (k - 1)
    else:
        adv = rewards - mean
    if scale_rewards == "none":
        return adv, rewards
    source = adv if estimator == "reinforce_plus_plus" else rewards
    if scale_rewards == "batch":
        std = source.std() if source.numel() > 1 else torch.zeros((), dtype=source.dtype, device=source.device)
    else:
        std = source.view(-1, k).std(dim=1).repeat_interleave(k) if k > 1 else torch.zeros_like(source)
    return adv / (std + STD_EPS), rewards


def reward_statistics(rewards: torch.Tensor, rewards_per_func: torch.Tensor, names: list,
                      num_generations: int) -> dict:
    """Logged per generation batch: ``reward`` (mean), ``reward_std`` (mean within-group std),
    ``frac_reward_zero_std`` (groups that teach nothing), ``rewards/<name>/mean|std`` per function."""
    grouped = rewards.view(-1, num_generations)
    group_std = grouped.std(dim=1) if num_generations > 1 else torch.zeros(grouped.shape[0])
    out = {"reward": float(rewards.mean()), "reward_std": float(group_std.mean()),
           "frac_reward_zero_std": float(torch.isclose(group_std, torch.zeros_like(group_std)).float().mean())}
    for i, name in enumerate(names):
        col = rewards_per_func[:, i]
        col = col[~torch.isnan(col)]
        out[f"rewards/{name}/mean"] = float(col.mean()) if col.numel() else float("nan")
        out[f"rewards/{name}/std"] = float(col.std()) if col.numel() > 1 else 0.0
    return out


# ------------------------------------------------------------------------------------------ the surrogate

def _masked_seq_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


def k3_kl(ref_logps: torch.Tensor, logps: torch.Tensor) -> torch.Tensor:
    """``e^{ref-logπ} - (ref-logπ) - 1`` per token (ratio clamped to ±20, result to ±10: ms-swift)."""
    d = torch.clamp(ref_logps - logps, min=-LOG_RATIO_BOUND, max=LOG_RATIO_BOUND)
    return torch.clamp(torch.exp(d) - d - 1, min=-10, max=10)


def rollout_is_weights(old_logps: torch.Tensor, rollout_logps: torch.Tensor, mask: torch.Tensor, mode: str,
                       threshold: float):
    """Importance weights correcting for sampling with the rollout engine's policy: from
    ``exp(logπ_old - logπ_rollout)`` per token (``token_*``) or its per-sequence geometric mean
    (``sequence_*``); ``*_truncate`` caps at ``threshold``, ``*_mask`` zeroes what exceeds it
    (``sequence_mask`` keeps the token ratios of the sequences it keeps, as ms-swift). Returns the
    detached weights ``[B, T]`` and where the ratio exceeded the threshold ``[B, T]`` (bool)."""
    log_ratio = torch.clamp((old_logps - rollout_logps).detach(), -LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    ratio = torch.exp(log_ratio)
    if mode in ("token_truncate", "token_mask"):
        exceeded = ratio > threshold
        weights = ratio.clamp(max=threshold) if mode == "token_truncate" else ratio.masked_fill(exceeded, 0.0)
        return weights, exceeded
    if mode not in ROLLOUT_IS_MODES:
        raise ValueError(f"unknown rollout_importance_sampling_mode {mode!r}; expected one of {ROLLOUT_IS_MODES}")
    seq = torch.exp(_masked_seq_mean(log_ratio, mask)).unsqueeze(-1)
    exceeded = (seq > threshold).expand_as(ratio)
    if mode == "sequence_truncate":
        return seq.clamp(max=threshold).expand_as(ratio), exceeded
    return ratio.masked_fill(exceeded, 0.0), exceeded


def per_token_loss(logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, settings: GRPOLossSettings,
                   old_logps: Optional[torch.Tensor] = None, ref_logps: Optional[torch.Tensor] = None,
                   rollout_logps: Optional[torch.Tensor] = None, entropy_mask: Optional[torch.Tensor] = None):
    """``logps, old_logps, ref_logps, rollout_logps [B, T]``, ``advantages [B]``, ``mask [B, T]`` (1 on
    completion tokens the loss counts) -> ``(ℓ [B, T], mask [B, T], sums)``: the per-token loss, the
    mask after off-policy sequence masking, and metric sums ``{name: (sum, count)}`` (detached).
    ``old_logps`` None: on-policy (``sg(logps)``). ``entropy_mask`` (``--top_entropy_quantile``): the
    policy term only on these tokens (the KL term everywhere, as ms-swift)."""
    mask = mask.to(logps.dtype)
    old = logps.detach() if old_logps is None else old_logps
    adv = advantages.to(logps.dtype).unsqueeze(-1)
    log_ratio = logps - old
    level = settings.importance_sampling_level
    if level == "token":
        log_w = log_ratio
    elif level == "sequence":
        log_w = _masked_seq_mean(log_ratio, mask).unsqueeze(-1)
    elif level == "sequence_token":
        log_w = logps - logps.detach() + _masked_seq_mean(log_ratio, mask).detach().unsqueeze(-1)
    else:
        raise ValueError(f"unknown importance_sampling_level {level!r}; expected one of "
                         f"{IMPORTANCE_SAMPLING_LEVELS}")
    ratio = torch.exp(log_w)
    eps_low, eps_high = settings.epsilon, settings.eps_high
    kind = settings.loss_type
    sums = {}
    tokens = mask.sum().detach()
    if kind == "cispo":
        loss = -torch.clamp(ratio, max=eps_high).detach() * adv * logps
        clipped = ((ratio > eps_high) & (adv > 0)).to(mask.dtype).expand_as(mask)
        sums["cispo_clip_ratio"] = ((clipped * mask).sum().detach(), tokens)
    elif kind == "sapo":
        tau = torch.where(adv > 0, torch.full_like(adv, settings.tau_pos), torch.full_like(adv, settings.tau_neg))
        loss = -torch.sigmoid(tau * (ratio - 1)) * (4.0 / tau) * adv
    elif kind in ("grpo", "bnpo", "dr_grpo", "dapo"):
        clipped_ratio = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
        first = torch.clamp(ratio, max=settings.delta) if settings.delta is not None else ratio
        loss = -torch.min(first * adv, clipped_ratio * adv)
        low = ((ratio < 1 - eps_low) & (adv < 0)).to(mask.dtype)
        high = ((ratio > 1 + eps_high) & (adv > 0)).to(mask.dtype)
        # fractions of completion tokens (sequence level: of completions, as TRL)
        weight, count = (mask, tokens) if ratio.shape == mask.shape else (1.0, float(mask.shape[0]))
        count = torch.as_tensor(count, dtype=mask.dtype)
        sums["clip_ratio/low_mean"] = ((low * weight).sum().detach(), count)
        sums["clip_ratio/high_mean"] = ((high * weight).sum().detach(), count)
        sums["clip_ratio/region_mean"] = (((low + high).clamp(max=1) * weight).sum().detach(), count)
    else:
        raise ValueError(f"unknown GRPO loss_type {kind!r}; expected one of {GRPO_LOSS_TYPES}")
    loss = loss.expand_as(mask) if loss.shape != mask.shape else loss
    if entropy_mask is not None:
        loss = loss * entropy_mask.to(loss.dtype)
    if settings.beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta != 0 needs the reference log-probs")
        kl = k3_kl(ref_logps, logps)
        loss = loss + settings.beta * kl
        sums["kl"] = ((kl.detach() * mask).sum(), tokens)
    if settings.rollout_importance_sampling_mode is not None:
        if rollout_logps is None:
            raise ValueError("rollout_importance_sampling_mode needs the rollout engine's log-probs")
        weights, exceeded = rollout_is_weights(old, rollout_logps, mask, settings.rollout_importance_sampling_mode,
                                               settings.rollout_importance_sampling_threshold)
        loss = loss * weights
        sums["rollout_correction/is_weight_mean"] = ((weights * mask).sum(), tokens)
        sums["rollout_correction/clipped_frac"] = ((exceeded.to(mask.dtype) * mask).sum(), tokens)
    if settings.off_policy_sequence_mask_delta is not None:
        behaviour = rollout_logps if rollout_logps is not None else old
        drift = _masked_seq_mean((behaviour - logps).detach(), mask)
        keep = ~((drift > settings.off_policy_sequence_mask_delta) & (advantages.to(drift.device) < 0))
        sums["off_policy_masked_frac"] = ((~keep).to(mask.dtype).sum(), torch.tensor(float(mask.shape[0])))
        mask = mask * keep.to(mask.dtype).unsqueeze(-1)
    return loss, mask, sums


def reduce_loss(loss: torch.Tensor, mask: torch.Tensor, settings: GRPOLossSettings,
                tokens_per_share: Optional[float] = None):
    """``(numerator, denominator)`` of one micro batch (module docstring). ``tokens_per_share``
    (dapo/cispo): the global batch's completion tokens / (micro batches x data-parallel ranks)."""
    mask = mask.to(loss.dtype)
    kind = settings.loss_type
    n = loss.shape[0]
    if kind in ("grpo", "sapo"):
        return _masked_seq_mean(loss, mask).sum(), n
    total = (loss * mask).sum()
    if kind == "bnpo":
        return total, int(mask.sum().item())
    if kind == "dr_grpo":
        return total, n * settings.max_completion_length
    if kind in ("dapo", "cispo"):
        if tokens_per_share is None:
            raise ValueError(f"loss_type {kind} needs the global batch's completion token count")
        return total / max(tokens_per_share, 1e-8), 1
    raise ValueError(f"unknown GRPO loss_type {kind!r}; expected one of {GRPO_LOSS_TYPES}")


# ------------------------------------------------------------------------------------------ mismatch metrics

def mismatch_sums(train_logps: torch.Tensor, rollout_logps: torch.Tensor, mask: torch.Tensor) -> dict:
    """How far the rollout engine's log-probs are from the trainer's on the sampled tokens, as metric
    sums ``{name: (sum, count)}`` (detached): ``rollout/kl`` (k1: mean of ``logπ_rollout - logπ``, an
    estimate of KL(rollout || trainer)), ``rollout/k3_kl``, ``rollout/abs_diff`` (mean |Δ logp|),
    ``rollout/log_ppl_abs_diff`` (per completion) and ``rollout/chi2_token`` (mean ρ² - 1)."""
    mask = mask.to(train_logps.dtype)
    d = (train_logps - rollout_logps).detach() * mask
    tokens = mask.sum()
    d_safe = torch.clamp(d, -LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    seq = _masked_seq_mean(d, mask)
    return {
        "rollout/kl": ((-d).sum(), tokens),
        "rollout/k3_kl": ((torch.clamp(torch.exp(d_safe) - d_safe - 1, -10, 10) * mask).sum(), tokens),
        "rollout/abs_diff": (d.abs().sum(), tokens),
        "rollout/log_ppl_abs_diff": (seq.abs().sum(), torch.tensor(float(d.shape[0]))),
        "rollout/chi2_token": (((torch.exp(d_safe) ** 2 - 1) * mask).sum(), tokens),
    }


def high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, quantile: float) -> torch.Tensor:
    """``--top_entropy_quantile q`` (Wang et al. 2025, "Beyond the 80/20 rule"): 1 on the completion tokens
    whose entropy is at least the ``1 - q`` quantile of the micro batch's completion tokens."""
    values = entropy[mask.bool()].float()
    if values.numel() == 0:
        return torch.zeros_like(mask)
    threshold = torch.quantile(values, 1 - quantile)
    return (entropy >= threshold).to(mask.dtype) * mask
