"""The DPO and KTO objectives the trainer's step runs under ``megatron rlhf --rlhf_type dpo|kto``.

A micro batch holds ``num_pairs`` pairs: all chosen sequences, then all rejected ones (padded rows or
one THD row; data/batching.py). ``prepare`` fills the reference log-probs (reference.py) before the
policy step; ``forward_step`` is megatron's forward step function: the policy's logits, per-token
log-probs (logprobs.py), per-sequence sums, the loss (losses.py). The loss goes back to megatron as
``(mean over pairs x pairs, pairs)``: megatron divides by the pairs (or by all pairs of the global
batch with ``--calculate_per_token_loss``), so the step optimises the mean over pairs.
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import torch

from .logprobs import IGNORE_INDEX, sequence_sums, token_logps
from .losses import DPOSettings, dpo_micro_batch_loss
from .reference import Reference, _model_inputs

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


def dpo_loss_func(batch: dict, settings: DPOSettings, vocab_size: int, logits: torch.Tensor):
    n = batch["num_pairs"]
    labels = batch["labels"]
    logps = sequence_sums(token_logps(logits, labels, vocab_size), batch, 2 * n)
    tokens = sequence_sums(labels.ne(IGNORE_INDEX).to(logps.dtype), batch, 2 * n)
    ref = batch.get("ref_logps")
    if ref is None:
        if not settings.reference_free:
            raise RuntimeError("DPO micro batch without reference log-probs (Reference.fill_logps not run)")
        ref = torch.zeros_like(logps)
    loss, sums = dpo_micro_batch_loss(logps[:n], logps[n:], ref[:n], ref[n:], tokens[:n], tokens[n:], settings)
    count = torch.tensor(float(n), dtype=torch.float64, device=loss.device)
    report = {"lm loss": torch.stack([loss.detach().double() * n, count])}
    report.update({k: torch.stack([v.double(), count]) for k, v in sums.items()})
    return loss * n, torch.tensor(n, dtype=torch.int, device=loss.device), report


def dpo_forward_step(settings: DPOSettings, vocab_size: int, data_iterator, model):
    batch = next(data_iterator)
    logits = model(batch["input_ids"], batch["position_ids"], **_model_inputs(model, batch))
    return logits, partial(dpo_loss_func, batch, settings, vocab_size)


class DPOObjective:
    def __init__(self, settings: DPOSettings, vocab_size: int, reference: Optional[Reference]):
        self.settings = settings
        self.reference = reference
        self.forward_step = partial(dpo_forward_step, settings, vocab_size)
        self.metric_names = METRICS + (("nll_loss",) if settings.rpo_alpha is not None else ())

    def prepare(self, microbatches: list, seq_length: int, micro_batch_size: int) -> None:
        if self.reference is not None:
            self.reference.fill_logps(microbatches, seq_length, micro_batch_size)


# ------------------------------------------------------------------------------------------ KTO
KTO_METRICS = ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "kl")


def kto_kl_estimate(kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """z = mean over the micro batch's KL sequences of logπ - logπ_ref, averaged over data-parallel
    ranks (TRL: over processes), clamped at 0, detached."""
    from megatron.core import parallel_state as ps

    z = (kl_logps - ref_kl_logps).detach().mean().reshape(1)
    if ps.get_data_parallel_world_size() > 1:
        z = z.clone()
        torch.distributed.all_reduce(z, group=ps.get_data_parallel_group())
        z = z / ps.get_data_parallel_world_size()
    return z.clamp(min=0)[0]


def kto_loss_func(batch: dict, settings, vocab_size: int, logits: torch.Tensor):
    from .losses import kto_loss

    n = batch["num_samples"]
    labels = batch["labels"]
    logps = sequence_sums(token_logps(logits, labels, vocab_size), batch, batch["num_sequences"])
    ref = batch.get("ref_logps")
    if ref is None:
        raise RuntimeError("KTO micro batch without reference log-probs (Reference.fill_logps not run)")
    if settings.uses_kl:
        kl = kto_kl_estimate(logps[n:2 * n], ref[n:2 * n])
    else:
        kl = torch.zeros((), dtype=logps.dtype, device=logps.device)
    desirable = batch["kto_label"].to(logps.device)
    losses, rewards = kto_loss(logps[:n], ref[:n], desirable, kl, settings)
    loss = losses.mean()
    d, u = desirable.double(), (~desirable).double()
    one = torch.ones((), dtype=torch.float64, device=loss.device)
    count = torch.tensor(float(n), dtype=torch.float64, device=loss.device)
    report = {
        "lm loss": torch.stack([loss.detach().double() * n, count]),
        "rewards/chosen": torch.stack([(rewards.double() * d).sum(), d.sum()]),
        "rewards/rejected": torch.stack([(rewards.double() * u).sum(), u.sum()]),
        "logps/chosen": torch.stack([(logps[:n].detach().double() * d).sum(), d.sum()]),
        "logps/rejected": torch.stack([(logps[:n].detach().double() * u).sum(), u.sum()]),
        "kl": torch.stack([kl.double(), one]),
    }
    return loss * n, torch.tensor(n, dtype=torch.int, device=loss.device), report


def kto_forward_step(settings, vocab_size: int, data_iterator, model):
    batch = next(data_iterator)
    logits = model(batch["input_ids"], batch["position_ids"], **_model_inputs(model, batch))
    return logits, partial(kto_loss_func, batch, settings, vocab_size)


class KTOObjective(DPOObjective):
    def __init__(self, settings, vocab_size: int, reference: Reference):
        self.settings = settings
        self.reference = reference
        self.forward_step = partial(kto_forward_step, settings, vocab_size)
        self.metric_names = KTO_METRICS


# ------------------------------------------------------------------------------------------- RM
RM_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")


def rm_loss_func(batch: dict, center_rewards_coefficient, scores: torch.Tensor):
    """Bradley-Terry loss of the micro batch's pairs (TRL's RewardTrainer) from the value head's
    ``[b, s, 1]`` scores; as DPO: ``(mean over pairs x pairs, pairs)`` back to megatron."""
    from .reward import reward_loss, sequence_scores

    n = batch["num_pairs"]
    rewards = sequence_scores(scores.float(), batch, 2 * n)
    chosen, rejected = rewards[:n], rewards[n:2 * n]
    losses = reward_loss(chosen, rejected, batch.get("margin"), center_rewards_coefficient)
    loss = losses.mean()
    c, r = chosen.detach().double(), rejected.detach().double()
    count = torch.tensor(float(n), dtype=torch.float64, device=loss.device)
    report = {"lm loss": torch.stack([loss.detach().double() * n, count])}
    sums = {"rewards/chosen": c.sum(), "rewards/rejected": r.sum(), "rewards/accuracies": (c > r).double().sum(),
            "rewards/margins": (c - r).sum()}
    report.update({k: torch.stack([v, count]) for k, v in sums.items()})
    return loss * n, torch.tensor(n, dtype=torch.int, device=loss.device), report


def rm_forward_step(center_rewards_coefficient, data_iterator, model):
    batch = next(data_iterator)
    scores = model(batch["input_ids"], batch["position_ids"], **_model_inputs(model, batch))
    return scores, partial(rm_loss_func, batch, center_rewards_coefficient)


class RMObjective:
    """``--rlhf_type rm``: the model is a ``*ForSequenceClassification`` (value head, reward.py); no
    reference model."""

    def __init__(self, center_rewards_coefficient=None):
        self.center_rewards_coefficient = center_rewards_coefficient
        self.reference = None
        self.forward_step = partial(rm_forward_step, center_rewards_coefficient)
        self.metric_names = RM_METRICS

    def prepare(self, microbatches: list, seq_length: int, micro_batch_size: int) -> None:
        pass
