"""`megatron rlhf --rlhf_type dpo --train_type lora` end to end through the CLI.

Under LoRA the reference is the base model: the policy's own chunks with the adapters off
(rlhf/reference.DisabledAdapterReference), no second copy of the weights. The run starts from a
PEFT adapter with non-zero factors, so policy and reference differ at step 1.

Oracles (transformers + PEFT on the same weights, fp32):
* ``logps/chosen`` / ``logps/rejected`` at step 1 = the PEFT model's mean completion log-probs;
* the reference log-probs (``logps - rewards / beta``) = the base model's (PEFT's adapter disabled),
  at every step (the base is frozen);
* TP2 + sequence parallelism gives the same logged values as one process over 3 steps.
"""

from __future__ import annotations

import json
import os

import pytest

from helpers import megatron
from test_rlhf_dpo import BETA, KEYS, close, pair_rows

pytestmark = pytest.mark.slow
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from megatron_swift.demo import prepare_model, write_jsonl

    root = tmp_path_factory.mktemp("dpo_lora")
    model_dir = prepare_model(str(root / "model"), "qwen3", 0, num_hidden_layers=2)
    data = write_jsonl(str(root / "pairs.jsonl"), pair_rows())
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                          LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        modules = dict(peft.named_modules())
        for module in modules.values():
            if hasattr(module, "lora_B") and "default" in module.lora_B:
                module.lora_B["default"].weight.copy_(torch.randn(module.lora_B["default"].weight.shape,
                                                                  generator=g) * 0.2)
        for name, module in modules.items():  # the fused mcore layers share A within q/k/v and gate/up
            for src, dsts in (("q_proj", ("k_proj", "v_proj")), ("gate_proj", ("up_proj",))):
                if name.endswith("." + src):
                    for d in dsts:
                        modules[name[: -len(src)] + d].lora_A["default"].weight.copy_(module.lora_A["default"].weight)
    adapter = str(root / "adapter")
    peft.save_pretrained(adapter)
    return root, model_dir, data, adapter, peft


def run(setup, name, *extra, nproc=1):
    root, model, data, adapter, _ = setup
    save = root / name
    proc = megatron("rlhf", "--rlhf_type", "dpo", "--train_type", "lora", "--adapters", adapter,
                    "--lora_dropout", "0", "--model", model, "--dataset", data, "--micro_batch_size", "2",
                    "--global_batch_size", "4", "--train_iters", "3", "--lr", "1e-2", "--log_interval", "1",
                    "--save", save, "--add_version", "false", "--split_dataset_ratio", "0", "--max_length", "64",
                    "--save_interval", "1000", "--padding_free", "true", *extra, nproc=nproc, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    with open(os.path.join(save, "logging.jsonl")) as f:
        return [json.loads(line) for line in f if '"loss"' in line], proc.stdout + proc.stderr


def peft_logps(setup, adapter_on: bool):
    """Mean chosen / rejected completion log-probs of the 4 pairs by transformers + PEFT."""
    import torch
    from transformers import AutoTokenizer

    from megatron_swift.args import parse_args
    from megatron_swift.template import template_from_args

    _, model_dir, data, _, peft = setup
    args = parse_args("rlhf", ["--model", model_dir, "--dataset", data, "--max_length", "64", "--train_iters", "1"],
                      world_size=1)
    template = template_from_args(args, AutoTokenizer.from_pretrained(model_dir))
    sums = {"chosen": [], "rejected": []}
    peft.eval()
    with torch.no_grad():
        for row in pair_rows():
            enc = template.encode(row, "pair")
            for side in sums:
                ids = torch.tensor([enc[f"{side}_input_ids"]])
                labels = torch.tensor(enc[f"{side}_labels"])[1:]
                if adapter_on:
                    logits = peft(input_ids=ids).logits
                else:
                    with peft.disable_adapter():
                        logits = peft(input_ids=ids).logits
                logp = torch.log_softmax(logits[0, :-1].double(), -1)
                token = logp.gather(-1, ids[0, 1:].unsqueeze(-1)).squeeze(-1)
                sums[side].append(float(token[labels.ne(-100)].sum()))
    return {side: sum(v) / len(v) for side, v in sums.items()}


def test_dpo_with_lora_reference_is_the_base_model(setup):
    base, log = run(setup, "tp1")
    assert "reference model from" not in log  # no second copy of the weights under LoRA
    policy, reference = peft_logps(setup, True), peft_logps(setup, False)
    assert abs(policy["chosen"] - reference["chosen"]) > 1e-2  # the adapter matters: a test that can fail
    first = base[0]
    for side in ("chosen", "rejected"):
        assert close(first[f"logps/{side}"], policy[side]), (side, first, policy)
        for step in base:  # the reference stays the base model while the adapter trains
            ref = step[f"logps/{side}"] - step[f"rewards/{side}"] / BETA
            assert close(ref, reference[side], rtol=2e-4), (side, step["iteration"], ref, reference[side])
    assert first["rewards/margins"] != 0.0
    assert base[-1]["rewards/margins"] > first["rewards/margins"]

    tp2 = run(setup, "tp2_sp", "--tensor_model_parallel_size", "2", "--sequence_parallel", "true", nproc=2)[0]
    assert [r["iteration"] for r in tp2] == [1, 2, 3]
    for step, (got, ref) in enumerate(zip(tp2, base), 1):
        for key in KEYS:
            assert close(got[key], ref[key]), ("tp2_sp", step, key, got[key], ref[key])
