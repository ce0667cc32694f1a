"""DPO losses vs TRL's own code (``DPOTrainer._compute_loss`` run on random log-probs).

Oracle: TRL 1.x's ``DPOTrainer._compute_loss`` called on a stand-in trainer whose model returns the
given per-token log-probs (TRL computes sequence sums, log-ratios, the loss of each ``loss_type``,
and its ``sft`` term = our ``rpo_alpha`` NLL). Where TRL 1.x differs on purpose
(``alpha_divergence`` at alpha = 1 is its reverse-KL limit), the formula is written here from
the paper / ms-swift. The parametrisation covers every loss type, so an implementation that ignores
``loss_type`` fails (checked explicitly in ``test_loss_type_is_honoured``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from megatron_swift.rlhf.losses import DPO_LOSS_TYPES, DPOSettings, dpo_loss, dpo_micro_batch_loss

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")


def _random_batch(pairs=6, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(2 * pairs, length, dtype=torch.long)
    for i in range(2 * pairs):
        start = int(torch.randint(2, 5, (1,), generator=g))
        end = int(torch.randint(start + 1, length + 1, (1,), generator=g))
        mask[i, start:end] = 1
    token_logps = -torch.rand(2 * pairs, length - 1, generator=g, dtype=torch.float64) * 3
    ref_token_logps = -torch.rand(2 * pairs, length - 1, generator=g, dtype=torch.float64) * 3
    shift = mask[:, 1:].to(torch.float64)
    return mask, token_logps * shift, ref_token_logps * shift


def trl_loss(mask, token_logps, ref_logps, beta, loss_types, loss_weights, label_smoothing=0.0,
             f_divergence_type="reverse_kl"):
    """TRL's DPOTrainer._compute_loss on a stand-in trainer (precomputed reference log-probs)."""
    n = mask.shape[0]
    outputs = SimpleNamespace(log_probs=token_logps, entropy=torch.zeros_like(token_logps),
                              mean_logits=torch.zeros_like(token_logps),
                              is_top1=torch.zeros_like(token_logps, dtype=torch.bool))
    accel = SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t, gather_for_metrics=lambda t: t)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=accel, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type=f_divergence_type, f_alpha_divergence_coef=1.0,
        loss_types=loss_types, loss_weights=loss_weights, beta=beta, label_smoothing=label_smoothing,
        use_weighting=False, _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
        args=SimpleNamespace(discopop_tau=0.05))
    ref_seq = ref_logps.sum(1)
    inputs = {"input_ids": torch.zeros_like(mask), "attention_mask": torch.ones_like(mask), "completion_mask": mask,
              "ref_chosen_logps": ref_seq[:n // 2], "ref_rejected_logps": ref_seq[n // 2:]}
    loss = trl_dpo.DPOTrainer._compute_loss(trainer, lambda **kw: outputs, inputs, False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def ours(mask, token_logps, ref_logps, settings):
    n = mask.shape[0] // 2
    seq, ref = token_logps.sum(1), ref_logps.sum(1)
    tokens = mask[:, 1:].sum(1).to(seq.dtype)
    loss, sums = dpo_micro_batch_loss(seq[:n], seq[n:], ref[:n], ref[n:], tokens[:n], tokens[n:], settings)
    return loss, {k: float(v) / n for k, v in sums.items()}


# TRL 1.x applies label smoothing to robust, exo_pair and aot only (sigmoid: see below), and
# exo_pair needs label_smoothing > 0 (log 0 in TRL): those pairs are the ones compared
SMOOTHED = ("robust", "exo_pair", "aot", "aot_unpaired")
DPO_CASES = [(t, 0.0) for t in DPO_LOSS_TYPES if t != "exo_pair"] + [(t, 0.2) for t in DPO_LOSS_TYPES if t in SMOOTHED]


@pytest.mark.parametrize("loss_type, label_smoothing", DPO_CASES)
def test_dpo_loss_types_match_trl(loss_type, label_smoothing):
    mask, logps, ref = _random_batch(seed=hash(loss_type) % 1000)
    beta = 0.3
    want, want_metrics = trl_loss(mask, logps, ref, beta, [loss_type], [1.0], label_smoothing)
    got, metrics = ours(mask, logps, ref, DPOSettings(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing))
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-12), (loss_type, float(got), float(want))  # TRL: fp32 epsilon
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected"):
        assert math.isclose(metrics[key], want_metrics[key], rel_tol=1e-6, abs_tol=1e-12), key  # TRL logs in fp32


def test_loss_type_is_honoured():
    """An implementation that trains sigmoid whatever --loss_type says fails here."""
    mask, logps, ref = _random_batch(seed=3)
    sigmoid, _ = ours(mask, logps, ref, DPOSettings(loss_type="sigmoid"))
    for kind in ("hinge", "ipo", "apo_zero"):
        got, _ = ours(mask, logps, ref, DPOSettings(loss_type=kind))
        want, _ = trl_loss(mask, logps, ref, 0.1, [kind], [1.0])
        assert torch.allclose(got, want, rtol=1e-12) and not torch.allclose(got, sigmoid, rtol=1e-3), kind


def test_rpo_alpha_is_trl_sft_term():
    mask, logps, ref = _random_batch(seed=5)
    got, metrics = ours(mask, logps, ref, DPOSettings(beta=0.1, rpo_alpha=0.7))
    want, _ = trl_loss(mask, logps, ref, 0.1, ["sigmoid", "sft"], [1.0, 0.7])
    assert torch.allclose(got, want, rtol=1e-12)


def test_js_divergence_matches_trl():
    mask, logps, ref = _random_batch(seed=7)
    got, _ = ours(mask, logps, ref, DPOSettings(f_divergence_type="js_divergence"))
    want, _ = trl_loss(mask, logps, ref, 0.1, ["sigmoid"], [1.0], f_divergence_type="js_divergence")
    assert torch.allclose(got, want, rtol=1e-12)


def test_alpha_divergence_and_reference_free_formulas():
    """alpha-divergence (alpha = 1; ms-swift / TRL < 1.0): h = e^{-Δ_r} - e^{-Δ_c}; reference_free: ref = 0."""
    g = torch.Generator().manual_seed(1)
    c, r, rc, rr = (torch.randn(5, generator=g, dtype=torch.float64) for _ in range(4))
    s = DPOSettings(beta=0.5, f_divergence_type="alpha_divergence")
    losses, _, _ = dpo_loss(c, r, rc, rr, s)
    h = torch.exp(-(r - rr)) - torch.exp(-(c - rc))
    assert torch.allclose(losses, -F.logsigmoid(0.5 * h))
    losses, cr, _ = dpo_loss(c, r, rc, rr, DPOSettings(beta=0.5, reference_free=True))
    assert torch.allclose(losses, -F.logsigmoid(0.5 * (c - r))) and torch.allclose(cr, 0.5 * c)


def test_sigmoid_label_smoothing_is_cdpo():
    """conservative DPO (ms-swift, TRL < 1.0; TRL 1.x dropped it from sigmoid): -(1-e)logσ(βh) - e logσ(-βh)."""
    g = torch.Generator().manual_seed(2)
    c, r, rc, rr = (torch.randn(5, generator=g, dtype=torch.float64) for _ in range(4))
    losses, _, _ = dpo_loss(c, r, rc, rr, DPOSettings(beta=0.3, label_smoothing=0.2))
    h = (c - rc) - (r - rr)
    assert torch.allclose(losses, -0.8 * F.logsigmoid(0.3 * h) - 0.2 * F.logsigmoid(-0.3 * h))


def test_step_zero_is_ln2():
    c = torch.randn(4, dtype=torch.float64)
    r = torch.randn(4, dtype=torch.float64)
    loss, sums = dpo_micro_batch_loss(c, r, c.clone(), r.clone(), torch.ones(4), torch.ones(4), DPOSettings())
    assert math.isclose(float(loss), math.log(2), rel_tol=1e-12) and float(sums["rewards/margins"]) == 0.0


# ------------------------------------------------------------------------------------------ KTO
trl_kto = pytest.importorskip("trl.trainer.kto_trainer")


def trl_kto_loss(mask, token_logps, ref_logps, kl_token_logps, ref_kl_logps, desirable, beta, loss_type,
                 dw=1.0, uw=1.0):
    """TRL's KTOTrainer._compute_loss on a stand-in trainer (precomputed reference log-probs)."""
    main = SimpleNamespace(log_probs=token_logps, entropy=torch.zeros_like(token_logps),
                           mean_logits=torch.zeros_like(token_logps))
    kl = SimpleNamespace(log_probs=kl_token_logps)
    kl_ids = torch.ones_like(mask)
    accel = SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t, gather_for_metrics=lambda t: t)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=accel, aux_loss_enabled=False, precompute_ref_logps=True,
        calculate_KL=loss_type == "kto", loss_type=loss_type, beta=beta, desirable_weight=dw,
        undesirable_weight=uw, _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    trainer._compute_kl_logps = lambda model, batch: trl_kto.KTOTrainer._compute_kl_logps(trainer, model, batch)
    inputs = {"input_ids": torch.zeros_like(mask), "attention_mask": torch.ones_like(mask), "completion_mask": mask,
              "KL_input_ids": kl_ids, "KL_attention_mask": torch.ones_like(mask), "KL_completion_mask": mask,
              "label": desirable, "ref_logps": ref_logps, "ref_KL_logps": ref_kl_logps}

    def model(**kw):
        return kl if kw["input_ids"] is kl_ids else main

    return trl_kto.KTOTrainer._compute_loss(trainer, model, inputs, False)


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_kto_losses_match_trl(loss_type, megatron_world1):
    from megatron_swift.rlhf.losses import KTOSettings, kto_loss
    from megatron_swift.rlhf.objective import kto_kl_estimate

    mask, logps, _ = _random_batch(pairs=4, seed=11)  # 8 samples
    _, kl_logps, _ = _random_batch(pairs=4, seed=12)
    g = torch.Generator().manual_seed(13)
    ref = logps.sum(1) + torch.randn(8, generator=g, dtype=torch.float64)
    ref_kl = kl_logps.sum(1) - torch.rand(8, generator=g, dtype=torch.float64)  # z > 0: the clamp is not hit
    desirable = torch.tensor([True, False, True, True, False, False, True, False])
    settings = KTOSettings(beta=0.3, loss_type=loss_type, desirable_weight=1.5, undesirable_weight=0.7)
    want = trl_kto_loss(mask, logps, ref, kl_logps, ref_kl, desirable, 0.3, loss_type, 1.5, 0.7)
    z = kto_kl_estimate(kl_logps.sum(1), ref_kl) if settings.uses_kl else torch.zeros((), dtype=torch.float64)
    assert settings.uses_kl == (float(z) > 0)
    losses, _ = kto_loss(logps.sum(1), ref, desirable, z, settings)
    assert torch.allclose(losses.mean(), want.to(losses.dtype), rtol=1e-6), (float(losses.mean()), float(want))


def test_kto_kl_sequences_rotate_completions():
    from megatron_swift.data.batching import kl_sequences

    seqs = [([1, 2, 3, 10, 11], [-100, -100, -100, 10, 11]), ([4, 5, 20, 21, 22, 23], [-100, -100, 20, 21, 22, 23]),
            ([6, 30], [-100, 30])]
    kl = kl_sequences(seqs)
    assert kl[0] == ([1, 2, 3, 30], [-100, -100, -100, 30])  # prompt 0 + completion 2
    assert kl[1] == ([4, 5, 10, 11], [-100, -100, 10, 11])  # prompt 1 + completion 0
    assert kl[2] == ([6, 20, 21, 22, 23], [-100, 20, 21, 22, 23])  # prompt 2 + completion 1
    with pytest.raises(ValueError, match="micro_batch_size"):
        kl_sequences(seqs[:1])
