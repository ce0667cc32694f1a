"""Reward models (`megatron rlhf --rlhf_type rm`): value head, conversion, Bradley-Terry loss.

Oracles:
* transformers' ``Qwen3ForSequenceClassification`` on the same weights (fp32): the score of each
  sequence (transformers picks the last non-pad token) equals ours at the last real token, for
  varied lengths, padded rows and one THD row; ``score.weight`` survives HF -> mcore -> HF exactly;
* TRL 1.16's own ``RewardTrainer.compute_loss`` (margin, center_rewards_coefficient) on random rewards.
The CLI run (TP1 vs TP2 + SP, export) is in the slow test at the end.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch

PAD = 0


def seq_cls_dir(path, seed=0) -> str:
    from transformers import AutoModelForSequenceClassification

    from megatron_swift.model.tiny import tiny_hf_config

    cfg = tiny_hf_config("qwen3", num_labels=1, pad_token_id=PAD, architectures=["Qwen3ForSequenceClassification"])
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(cfg).eval()
    with torch.no_grad():  # a score head well away from 0 so differences show
        model.score.weight.normal_(0, 1.0)
    model.save_pretrained(path)
    return str(path)


def hf_scores(model_dir, seqs):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), PAD)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits[:, 0], model


def our_scores(chunks, seqs, padding_free):
    from megatron_swift.data.batching import Collator
    from megatron_swift.rlhf.reward import sequence_scores

    items = [{"input_ids": s, "labels": s} for s in seqs]
    batch = Collator(pad_token_id=PAD, padding_free=padding_free)(items)
    with torch.no_grad():
        out = chunks[0](batch["input_ids"], batch["position_ids"], attention_mask=None,
                        packed_seq_params=batch.get("packed_seq_params"))
    assert out.shape[-1] == 1
    return sequence_scores(out, batch, len(seqs))


def test_value_head_scores_equal_transformers_and_export_round_trip(megatron_world1, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from megatron_swift.converters.api import load_hf_into_mcore, save_mcore_as_hf
    from megatron_swift.model import build_model, load_hf_config

    src = seq_cls_dir(tmp_path / "hf")
    hf_config = load_hf_config(src)
    chunks, config, settings = build_model(hf_config, {"params_dtype": torch.float32})
    assert settings.num_labels == 1 and not settings.share_embeddings_and_output_weights
    load_hf_into_mcore(chunks, src, config, settings)
    for c in chunks:
        c.eval()
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(1, 1000, (n,), generator=gen).tolist() for n in (5, 17, 9, 30, 1, 12)]
    want, hf_model = hf_scores(src, seqs)
    assert want.abs().max() > 0.1
    for padding_free in (False, True):
        got = our_scores(chunks, seqs, padding_free)
        diff = (got - want).abs().max().item()
        assert diff < 1e-5, (padding_free, diff, got, want)

    out = save_mcore_as_hf(chunks, config, settings, hf_config, str(tmp_path / "export"))
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["architectures"] == ["Qwen3ForSequenceClassification"] and len(cfg["id2label"]) == 1
    again = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    assert again.config.num_labels == 1
    assert torch.equal(again.score.weight, hf_model.score.weight)
    got, _ = hf_scores(out, seqs)
    assert torch.equal(got, want)


def test_causal_lm_start_gets_a_fresh_head_and_the_lm_head_is_not_used(megatron_world1, tmp_path):
    """An RM started from a causal LM (what `megatron rlhf --rlhf_type rm --model <LM>` does): the
    decoder comes from the LM, the head is initialised the same on every rank and layout."""
    from megatron_swift.converters.api import load_hf_into_mcore
    from megatron_swift.demo import prepare_model
    from megatron_swift.model import build_model, load_hf_config
    from megatron_swift.rlhf.reward import make_seq_cls_config

    lm = prepare_model(str(tmp_path / "lm"), "qwen3", 0, num_hidden_layers=2)
    heads = []
    for _ in range(2):
        hf_config = make_seq_cls_config(load_hf_config(lm), 1)
        assert hf_config.architectures == ["Qwen3ForSequenceClassification"]
        chunks, config, settings = build_model(hf_config, {"params_dtype": torch.float32,
                                                           "perform_initialization": True})
        load_hf_into_mcore(chunks, lm, config, settings)
        heads.append(chunks[0].output_layer.weight.detach().clone())
    assert torch.equal(heads[0], heads[1]) and heads[0].std() > 0.01


def trl_loss(chosen, rejected, margin, coef):
    from collections import defaultdict

    from trl import RewardTrainer

    ident = SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x)
    fake = SimpleNamespace(model=SimpleNamespace(training=False), args=SimpleNamespace(center_rewards_coefficient=coef),
                           accelerator=ident, _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0)
    logits = torch.cat([chosen, rejected])[:, None]
    inputs = {} if margin is None else {"margin": margin}
    return RewardTrainer.compute_loss(fake, lambda **kw: SimpleNamespace(logits=logits), inputs)


@pytest.mark.parametrize("margin", [False, True])
@pytest.mark.parametrize("coef", [None, 0.01])
def test_reward_loss_equals_trl(margin, coef):
    from megatron_swift.rlhf.reward import reward_loss

    gen = torch.Generator().manual_seed(3)
    chosen, rejected = torch.randn(7, generator=gen) * 2, torch.randn(7, generator=gen) * 2
    m = torch.rand(7, generator=gen) if margin else None
    want = trl_loss(chosen, rejected, m, coef)
    got = reward_loss(chosen, rejected, m, coef).mean()
    assert torch.allclose(got, want, rtol=1e-6, atol=0), (got, want)
    if margin or coef:  # the option changes the loss (it is not ignored)
        assert not torch.allclose(got, reward_loss(chosen, rejected).mean())


def test_margin_column_reaches_the_micro_batch():
    from megatron_swift.data.batching import Collator
    from megatron_swift.data.preprocess import RowError, normalize_row

    base = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            "rejected_response": "b"}
    assert normalize_row(dict(base, margin="1.5"))["margin"] == 1.5 and normalize_row(base)["margin"] is None
    with pytest.raises(RowError, match="margin"):
        normalize_row(dict(base, margin="lots"))
    pair = {"chosen_input_ids": [1, 2, 3], "chosen_labels": [-100, 2, 3], "rejected_input_ids": [1, 4],
            "rejected_labels": [-100, 4]}
    for padding_free in (True, False):
        batch = Collator(pad_token_id=PAD, padding_free=padding_free)([dict(pair, margin=0.5), dict(pair, margin=None)])
        assert batch["margin"].tolist() == [0.5, 0.0] and batch["num_pairs"] == 2
        assert "margin" not in Collator(pad_token_id=PAD, padding_free=padding_free)([pair])


# ------------------------------------------------------------------------------- CLI end to end
RM_KEYS = ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")


def rm_rows():
    rows = []
    for i, (a, b) in enumerate([(1, 2), (3, 4), (5, 6), (7, 8)]):
        rows.append({"messages": [{"role": "user", "content": f"what is {a} plus {b}?"},
                                  {"role": "assistant", "content": f"{a} plus {b} is {a + b}." + " ok" * i}],
                     "rejected_response": "I do not know" + " really" * (3 - i) * 2, "margin": 0.5 * i})
    return rows


def rm_run(root, model, data, name, *extra, nproc=1, iters=3):
    from helpers import megatron

    save = root / name
    proc = megatron("rlhf", "--rlhf_type", "rm", "--model", model, "--dataset", data, "--micro_batch_size", "2",
                    "--global_batch_size", "4", "--train_iters", str(iters), "--lr", "1e-3", "--log_interval", "1",
                    "--save", save, "--add_version", "false", "--split_dataset_ratio", "0", "--max_length", "64",
                    "--save_interval", "1000", "--center_rewards_coefficient", "0.01", *extra, nproc=nproc,
                    timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    with open(save / "logging.jsonl") as f:
        return [json.loads(line) for line in f if '"loss"' in line]


@pytest.mark.slow
def test_rm_cli_tp2_sp_equals_one_process_and_export_scores_in_transformers(tmp_path):
    """TP1 (THD) vs TP2 + SP (THD) over 3 steps (rtol 1e-5), margins and center_rewards_coefficient on;
    `megatron export --to_hf --task_type seq_cls` of the TP2 run's iteration-2 checkpoint gives a
    Qwen3ForSequenceClassification whose transformers scores (one sequence at a time) average to the
    rewards our model logged at step 3 (computed with exactly those weights)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from helpers import megatron
    from megatron_swift.args import parse_args
    from megatron_swift.demo import prepare_model, write_jsonl
    from megatron_swift.template import template_from_args

    lm = prepare_model(str(tmp_path / "lm"), "qwen3", 0, num_hidden_layers=2)
    data = write_jsonl(str(tmp_path / "pairs.jsonl"), rm_rows())
    base = rm_run(tmp_path, lm, data, "tp1", "--padding_free", "true")
    tp2 = rm_run(tmp_path, lm, data, "tp2", "--padding_free", "true", "--tensor_model_parallel_size", "2",
                 "--sequence_parallel", "true", "--save_interval", "2", nproc=2)
    assert [r["iteration"] for r in tp2] == [1, 2, 3]
    for step, (got, ref) in enumerate(zip(tp2, base), 1):
        for key in RM_KEYS:
            assert got[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), (step, key, got[key], ref[key])
    assert base[-1]["rewards/margins"] > base[0]["rewards/margins"] and base[-1]["loss"] < base[0]["loss"]

    out = tmp_path / "tp2-hf"
    proc = megatron("export", "--to_hf", "true", "--mcore_model", tmp_path / "tp2" / "iter_0000002", "--model", lm,
                    "--task_type", "seq_cls", "--num_labels", "1", "--output_dir", out)
    assert proc.returncode == 0, proc.stderr[-5000:]
    hf = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == "Qwen3ForSequenceClassification" and hf.config.num_labels == 1
    args = parse_args("rlhf", ["--model", lm, "--dataset", data, "--max_length", "64", "--train_iters", "1",
                               "--rlhf_type", "rm"], world_size=1)
    template = template_from_args(args, AutoTokenizer.from_pretrained(lm))
    scores = {"chosen": [], "rejected": []}
    with torch.no_grad():
        for row in rm_rows():
            enc = template.encode(row, "pair")
            for side in scores:
                scores[side].append(float(hf(torch.tensor([enc[f"{side}_input_ids"]])).logits[0, 0]))
    for side, values in scores.items():
        assert sum(values) / 4 == pytest.approx(tp2[2][f"rewards/{side}"], rel=1e-5, abs=1e-6), (side, scores, tp2[2])
    # and the step-3 loss is TRL's with the rows' margin column and the centring term
    want = trl_loss(torch.tensor(scores["chosen"]), torch.tensor(scores["rejected"]),
                    torch.tensor([r["margin"] for r in rm_rows()]), 0.01)
    assert tp2[2]["loss"] == pytest.approx(float(want), rel=1e-5), (tp2[2], float(want))
    assert abs(float(want) - float(trl_loss(torch.tensor(scores["chosen"]), torch.tensor(scores["rejected"]),
                                            None, 0.01))) > 1e-3  # the margins matter
