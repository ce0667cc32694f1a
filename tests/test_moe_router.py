"""The MoE load-balancing loss `megatron sft` logs, against transformers' own definition.

Oracle: transformers' ``load_balancing_loss_func`` (the loss Qwen3-MoE adds to its LM loss) on the
router logits of transformers' forward of the same weights and the same micro batch. The two
definitions differ in two documented ways (docs/layouts.md): megatron computes the loss per MoE layer
and averages the layers (transformers pools all layers' counts and probabilities first), and divides
the routed-token fraction by top-k (transformers does not). So the oracle is transformers' function
applied to each layer alone, divided by top-k, averaged over layers.
"""

from __future__ import annotations

import json

import pytest
import torch

from helpers import megatron

pytestmark = pytest.mark.slow


def test_logged_load_balancing_loss_equals_transformers_at_step_1(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    from megatron_swift.args import parse_args
    from megatron_swift.data.pipeline import prepare_data
    from megatron_swift.demo import long_tailed_rows, prepare_model, write_jsonl

    model = prepare_model(str(tmp_path / "moe"), "qwen3_moe")
    data = write_jsonl(str(tmp_path / "chat.jsonl"), long_tailed_rows(16, seed=3))
    argv = ["--model", model, "--dataset", data, "--micro_batch_size", "4", "--global_batch_size", "4",
            "--train_iters", "1", "--split_dataset_ratio", "0", "--save", str(tmp_path / "run"),
            "--add_version", "false", "--log_interval", "1"]
    proc = megatron("sft", *argv, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = json.loads((tmp_path / "run" / "logging.jsonl").read_text().splitlines()[0])["load_balancing_loss"]

    # the micro batch of step 1, from the same data pipeline; its sequences split at cu_seqlens
    args = parse_args("sft", [*argv, "--save", str(tmp_path / "parse")])  # (the run's --save holds its checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(model)
    batch = next(prepare_data(args, tokenizer).train_iterator(micro_batch_size=4))
    cu = batch["packed_seq_params"].cu_seqlens_q.tolist()
    ids = batch["input_ids"][0]
    sequences = [ids[a:b] for a, b in zip(cu[:-1], cu[1:])]
    assert len(sequences) == 4 and len({len(s) for s in sequences}) > 1  # varied lengths

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    with torch.no_grad():
        per_sequence = [hf(s.unsqueeze(0), output_router_logits=True).router_logits for s in sequences]
    layers = [torch.cat([logits[layer] for logits in per_sequence]) for layer in range(len(per_sequence[0]))]
    top_k, experts = hf.config.num_experts_per_tok, hf.config.num_experts
    expected = sum(float(load_balancing_loss_func((logits,), experts, top_k)) for logits in layers) / len(layers)
    assert logged == pytest.approx(expected / top_k, abs=2e-6), (logged, expected / top_k)
