"""`megatron rlhf --rlhf_type dpo` end to end through the CLI, on pairs of varied lengths.

Oracles:
* transformers' forward of the same HF weights: the step-1 mean chosen / rejected log-probs
  (``logps/chosen``, ``logps/rejected``) equal the sums over completion tokens of
  ``log_softmax(logits)`` (tolerance 1e-4 relative: fp32, different kernels);
* closed form at step 1 (policy = reference): the DPO part of the loss is ln 2 and the rewards 0
  (the default ``--rpo_alpha 1`` adds the logged ``nll_loss``);
* one process, padding-free (THD): TP2 + sequence parallelism (THD) and PP2 (padded, fixed shapes)
  give the same loss, grad norm, rewards and log-probs over 3 steps (rtol 1e-4);
* the reference log-probs (``logps - rewards / beta``) are the same at every step (every step sees
  the same 4 pairs: global batch = dataset).
Bad rows (no rejected answer; chosen == rejected) are dropped and counted.
"""

from __future__ import annotations

import json
import math
import os

import pytest

from helpers import megatron

pytestmark = pytest.mark.slow
BETA = 0.1
KEYS = ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
        "logps/rejected", "nll_loss")


def pair_rows():
    rows = []
    for i, (a, b) in enumerate([(1, 2), (3, 4), (5, 6), (7, 8)]):
        rows.append({"messages": [{"role": "user", "content": f"what is {a} plus {b}?"},
                                  {"role": "assistant", "content": f"{a} plus {b} is {a + b}." + " ok" * i}],
                     "rejected_response": "I do not know" + " really" * (3 - i) * 2})
    return rows


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from megatron_swift.demo import prepare_model, write_jsonl

    root = tmp_path_factory.mktemp("dpo")
    model = prepare_model(str(root / "model"), "qwen3", 0, num_hidden_layers=2)
    bad = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
           {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "same"}],
            "rejected_response": "same"}]
    data = write_jsonl(str(root / "pairs.jsonl"), pair_rows() + bad)
    return root, model, data


def run(setup, name, *extra, nproc=1, global_batch=4):
    root, model, data = setup
    save = root / name
    proc = megatron("rlhf", "--rlhf_type", "dpo", "--model", model, "--dataset", data, "--micro_batch_size", "2",
                    "--global_batch_size", str(global_batch), "--train_iters", "3", "--lr", "1e-3", "--log_interval", "1",
                    "--save", save, "--add_version", "false", "--split_dataset_ratio", "0", "--max_length", "64",
                    "--save_interval", "1000", *extra, nproc=nproc, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    with open(os.path.join(save, "logging.jsonl")) as f:
        return [json.loads(line) for line in f if '"loss"' in line], proc.stdout + proc.stderr


def hf_logps(setup):
    """Mean chosen / rejected log-probs of the 4 pairs by transformers' forward."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_swift.args import parse_args
    from megatron_swift.template import template_from_args

    _, model_dir, data = setup
    args = parse_args("rlhf", ["--model", model_dir, "--dataset", data, "--max_length", "64", "--train_iters", "1"],
                      world_size=1)
    template = template_from_args(args, AutoTokenizer.from_pretrained(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sums = {"chosen": [], "rejected": []}
    with torch.no_grad():
        for row in pair_rows():
            enc = template.encode(row, "pair")
            for side in sums:
                ids = torch.tensor([enc[f"{side}_input_ids"]])
                labels = torch.tensor(enc[f"{side}_labels"])[1:]
                logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
                token = logp.gather(-1, ids[0, 1:].unsqueeze(-1)).squeeze(-1)
                sums[side].append(float(token[labels.ne(-100)].sum()))
    return {side: sum(v) / len(v) for side, v in sums.items()}


def close(a, b, rtol=1e-4, atol=1e-5):
    return abs(a - b) <= atol + rtol * abs(b)


def test_dpo_layouts_match_one_process_and_transformers(setup):
    base, log = run(setup, "tp1_thd", "--padding_free", "true")
    assert "dropped 2" in log, log[-3000:]  # no rejected answer; chosen == rejected
    first = base[0]
    assert math.isclose(first["loss"] - first["nll_loss"], math.log(2), abs_tol=2e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert first[key] == 0.0, key
    want = hf_logps(setup)
    assert close(first["logps/chosen"], want["chosen"]) and close(first["logps/rejected"], want["rejected"]), \
        (first, want)
    # the policy learns the preference; the reference stays where it started
    assert base[-1]["rewards/margins"] > 0.5 and base[-1]["rewards/accuracies"] == 1.0
    for side in ("chosen", "rejected"):
        refs = [r[f"logps/{side}"] - r[f"rewards/{side}"] / BETA for r in base]
        assert max(refs) - min(refs) < 1e-3, refs

    layouts = {
        "tp2_sp_thd": run(setup, "tp2_sp", "--tensor_model_parallel_size", "2", "--sequence_parallel", "true",
                          "--padding_free", "true", nproc=2)[0],
        "pp2_padded": run(setup, "pp2", "--pipeline_model_parallel_size", "2", "--padding_free", "false",
                          nproc=2)[0],
    }
    for name, logs in layouts.items():
        assert [r["iteration"] for r in logs] == [1, 2, 3], name
        for step, (got, ref) in enumerate(zip(logs, base), 1):
            for key in KEYS:
                assert close(got[key], ref[key]), (name, step, key, got[key], ref[key])


# ------------------------------------------------------------------------------------------ KTO
def kto_rows():
    rows = []
    for i, pair in enumerate(pair_rows()):
        rows.append({"messages": pair["messages"], "label": True})
        rows.append({"messages": pair["messages"][:-1] + [{"role": "assistant", "content": pair["rejected_response"]}],
                     "label": False})
    return rows


def test_kto_layouts_match_one_process_and_transformers(setup):
    """KTO at step 1: z = 0 and every sample's loss 1 - σ(0) = 0.5 (weights 1); step-1 log-probs of the
    desirable / undesirable samples vs transformers (global batch = the 8 samples); PP2 (padded) equals
    one process (THD) over 3 steps."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_swift.args import parse_args
    from megatron_swift.demo import write_jsonl
    from megatron_swift.template import template_from_args

    root, model_dir, _ = setup
    data = write_jsonl(str(root / "kto.jsonl"), kto_rows())
    kto_setup = (root, model_dir, data)
    base, _ = run(kto_setup, "kto_tp1", "--rlhf_type", "kto", "--padding_free", "true", global_batch=8)
    first = base[0]
    assert math.isclose(first["loss"], 0.5, abs_tol=1e-6) and first["kl"] == 0.0
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0
    assert base[-1]["loss"] < 0.5 and base[-1]["rewards/chosen"] > base[-1]["rewards/rejected"]

    args = parse_args("rlhf", ["--model", model_dir, "--dataset", data, "--max_length", "64", "--train_iters", "1",
                               "--rlhf_type", "kto", "--micro_batch_size", "2"], world_size=1)
    template = template_from_args(args, AutoTokenizer.from_pretrained(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sums = {True: [], False: []}
    with torch.no_grad():
        for row in kto_rows():
            enc = template.encode(row, "kto")
            ids = torch.tensor([enc["input_ids"]])
            labels = torch.tensor(enc["labels"])[1:]
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1).gather(-1, ids[0, 1:, None])[:, 0]
            sums[row["label"]].append(float(logp[labels.ne(-100)].sum()))
    assert close(first["logps/chosen"], sum(sums[True]) / 4) and close(first["logps/rejected"], sum(sums[False]) / 4)

    pp2, _ = run(kto_setup, "kto_pp2", "--rlhf_type", "kto", "--pipeline_model_parallel_size", "2",
                 "--padding_free", "false", nproc=2, global_batch=8)
    for step, (got, ref) in enumerate(zip(pp2, base), 1):
        for key in ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "kl"):
            assert close(got[key], ref[key]), (step, key, got[key], ref[key])
