"""The DPO objective the trainer's step runs under ``megatron rlhf --rlhf_type dpo``.

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
