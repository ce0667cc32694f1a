"""DPO losses on per-sequence log-probs: TRL's formulas (``DPOTrainer._compute_loss``), every
``--loss_type`` honoured (ms-swift's Megatron DPO silently trains sigmoid whatever it says).

Notation: ``chosen_logratios = logπ(y_c|x) − logπ_ref(y_c|x)`` (0 for the reference terms under
``--reference_free``), ``h = score(chosen) − score(rejected)`` with the score given by
``--f_divergence_type``. Returns per-pair losses and the (detached) implicit rewards ``β·logratio``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop")
DISCOPOP_TAU = 0.05  # TRL's DPOConfig.discopop_tau default


@dataclass(frozen=True)
class DPOSettings:
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    f_divergence_type: str = "reverse_kl"
    reference_free: bool = False
    rpo_alpha: Optional[float] = None


def _scores(logratios: torch.Tensor, f_divergence_type: str) -> torch.Tensor:
    if f_divergence_type == "reverse_kl":
        return logratios
    if f_divergence_type == "js_divergence":  # f'(t) = log 2 + logsigmoid(log t)  (TRL)
        return math.log(2) + F.logsigmoid(logratios)
    raise ValueError(f"unknown f_divergence_type {f_divergence_type!r}")


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, settings: DPOSettings, chosen_tokens: Optional[torch.Tensor] = None,
             rejected_tokens: Optional[torch.Tensor] = None):
    """Per-pair losses ``[P]``, chosen and rejected rewards ``[P]`` (detached).

    ``*_tokens``: completion tokens per sequence (``ipo`` averages the log-ratios per token, as TRL does).
    ``aot``/``aot_unpaired`` sort over the pairs given (TRL sorts over its batch; here: the micro batch).
    """
    beta, eps = settings.beta, settings.label_smoothing
    if settings.reference_free:
        ref_chosen_logps = torch.zeros_like(chosen_logps)
        ref_rejected_logps = torch.zeros_like(rejected_logps)
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    if settings.f_divergence_type == "alpha_divergence":
        # alpha = 1 as in ms-swift / TRL < 1.0: h = (e^{-Δ_r} - e^{-Δ_c}) / alpha. (TRL 1.x reads alpha = 1 as
        # its reverse-KL limit, which would make the option a no-op.)
        alpha = 1.0
        chosen_scores = -torch.exp(-alpha * chosen_logratios) / alpha
        rejected_scores = -torch.exp(-alpha * rejected_logratios) / alpha
    else:
        chosen_scores = _scores(chosen_logratios, settings.f_divergence_type)
        rejected_scores = _scores(rejected_logratios, settings.f_divergence_type)
    delta = chosen_scores - rejected_scores
    kind = settings.loss_type
    if kind == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
    elif kind == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif kind == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("ipo needs the completion token counts")
        ipo_delta = (chosen_scores / chosen_tokens.clamp(min=1) - rejected_scores / rejected_tokens.clamp(min=1))
        losses = (ipo_delta - 1 / (2 * beta)) ** 2
    elif kind == "exo_pair":
        epsilon = torch.tensor(eps if eps > 0 else 1e-3, dtype=delta.dtype, device=delta.device)  # TRL: eps > 0
        losses = (torch.sigmoid(beta * delta) * (F.logsigmoid(beta * delta) - torch.log1p(-epsilon))
                  + torch.sigmoid(-beta * delta) * (F.logsigmoid(-beta * delta) - torch.log(epsilon)))
    elif kind == "nca_pair":
        cr, rr = beta * chosen_logratios, beta * rejected_logratios
        losses = -F.logsigmoid(cr) - 0.5 * F.logsigmoid(-cr) - 0.5 * F.logsigmoid(-rr)
    elif kind == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
    elif kind == "bco_pair":
        losses = -F.logsigmoid(beta * chosen_logratios) - F.logsigmoid(-beta * rejected_logratios)
    elif kind == "sppo_hard":
        losses = (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
    elif kind in ("aot", "aot_unpaired"):
        if kind == "aot":
            a = torch.sort(chosen_logps - rejected_logps, dim=0)[0]
            b = torch.sort(ref_chosen_logps - ref_rejected_logps, dim=0)[0]
        else:
            a = torch.sort(chosen_logratios, dim=0)[0]
            b = torch.sort(rejected_logratios, dim=0)[0]
        d = a - b
        losses = -F.logsigmoid(beta * d) * (1 - eps) - F.logsigmoid(-beta * d) * eps
    elif kind == "apo_zero":
        losses = (1 - torch.sigmoid(beta * chosen_logratios)) + torch.sigmoid(beta * rejected_logratios)
    elif kind == "apo_down":
        losses = torch.sigmoid(beta * chosen_logratios) + (1 - torch.sigmoid(beta * (chosen_logratios
                                                                                     - rejected_logratios)))
    elif kind == "discopop":
        logits = beta * delta
        mod = torch.sigmoid(logits / DISCOPOP_TAU)
        losses = -F.logsigmoid(logits) * (1 - mod) + torch.exp(-logits) * mod
    else:
        raise ValueError(f"unknown DPO loss_type {kind!r}; expected one of {DPO_LOSS_TYPES}")
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def dpo_micro_batch_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
                         ref_rejected_logps: torch.Tensor, chosen_tokens: torch.Tensor,
                         rejected_tokens: torch.Tensor, settings: DPOSettings):
    """The mean loss over the micro batch's pairs (``+ rpo_alpha`` x the token-mean NLL of the chosen
    completions, TRL's ``loss_type=[..., "sft"]``) and the metrics as per-pair sums (detached)."""
    losses, chosen_rewards, rejected_rewards = dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps,
                                                        ref_rejected_logps, settings, chosen_tokens, rejected_tokens)
    loss = losses.mean()
    sums = {
        "rewards/chosen": chosen_rewards.sum(),
        "rewards/rejected": rejected_rewards.sum(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
        "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
        "logps/chosen": chosen_logps.detach().sum(),
        "logps/rejected": rejected_logps.detach().sum(),
    }
    if settings.rpo_alpha is not None:
        nll = -chosen_logps.sum() / chosen_tokens.sum().clamp(min=1)
        loss = loss + settings.rpo_alpha * nll
        sums["nll_loss"] = nll.detach() * losses.numel()  # reported per pair like the rest
    return loss, sums


# ------------------------------------------------------------------------------------------ KTO
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


@dataclass(frozen=True)
class KTOSettings:
    beta: float = 0.1
    loss_type: str = "kto"
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    @property
    def uses_kl(self) -> bool:
        return self.loss_type != "apo_zero_unpaired"


def kto_loss(logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor,
             settings: KTOSettings):
    """TRL's KTO (``KTOTrainer._compute_loss``): per-sample losses ``[N]`` (weighted), rewards ``[N]``.
    ``kl``: the detached, clamped KL estimate z (0 for apo_zero_unpaired)."""
    beta = settings.beta
    logratios = logps - ref_logps
    if settings.loss_type == "kto":
        chosen = 1 - torch.sigmoid(beta * (logratios - kl))
        rejected = 1 - torch.sigmoid(beta * (kl - logratios))
    elif settings.loss_type == "apo_zero_unpaired":
        chosen = 1 - torch.sigmoid(beta * logratios)
        rejected = torch.sigmoid(beta * logratios)
    else:
        raise ValueError(f"unknown KTO loss_type {settings.loss_type!r}; expected one of {KTO_LOSS_TYPES}")
    losses = torch.where(desirable, settings.desirable_weight * chosen, settings.undesirable_weight * rejected)
    return losses, beta * logratios.detach()
