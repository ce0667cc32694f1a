"""Every argument is used or refused: nothing is parsed and then ignored.

Oracle: which fields the settings builders actually read. Each command's arguments are parsed, then
wrapped in a recorder that notes every attribute read, and handed to every builder the command's
workers use (trainer/options.training_settings, the data and template layers, the plugin loader;
export.export_settings). A field none of them reads must be covered by a refusal rule of
args/support.py (which refuses its unsupported values before workers start) or be applied by the
argument validation itself (listed in APPLIED_BY_VALIDATION, and read by validate()).
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from megatron_swift.args import COMMANDS, parse_args
from megatron_swift.args.support import covered_fields
from megatron_swift.args.validate import validate

# Arguments whose whole effect happens in validation, before workers start.
APPLIED_BY_VALIDATION = {
    "exit_on_missing_checkpoint",  # --load without a checkpoint: an error, or start fresh
    "auto_detect_ckpt_format",  # legacy per-rank checkpoints are recognised and named
    "distributed_timeout_minutes",  # folded into ddp_timeout
    "normalization",  # RMSNorm is what the families use; LayerNorm is refused
    "group_query_attention",  # checked against the KV heads
    "no_initialization",  # also read by the trainer; validation refuses it for a model without weights
}


class Recorder:
    """Wraps parsed arguments and records every attribute read."""

    def __init__(self, args):
        object.__setattr__(self, "_args", args)
        object.__setattr__(self, "read", set())

    def __getattr__(self, name):
        self.read.add(name)
        return getattr(self._args, name)

    def __setattr__(self, name, value):
        setattr(self._args, name, value)


def user_fields(command: str) -> set:
    return {f.name for f in dataclasses.fields(COMMANDS[command]) if not f.metadata.get("derived")}


@pytest.fixture
def model_and_data(tmp_path):
    from megatron_swift.template.tiny_tokenizer import make_tiny_tokenizer

    model = tmp_path / "model"
    make_tiny_tokenizer(str(model), "qwen3")
    (model / "config.json").write_text(json.dumps({
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "num_attention_heads": 4,
        "num_key_value_heads": 2, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "head_dim": 16, "vocab_size": 1000, "torch_dtype": "float32", "max_position_embeddings": 256}))
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                     {"role": "assistant", "content": f"a{i}"}]}) + "\n"
                            for i in range(8)))
    return str(model), str(data)


def _validation_reads(args) -> set:
    recorder = Recorder(args)
    validate(recorder, world_size=1)
    return recorder.read


@pytest.mark.parametrize("command", ["sft", "pt", "rlhf"])
def test_every_training_argument_is_read_or_refused(command, model_and_data, megatron_world1, tmp_path):
    from transformers import AutoTokenizer

    from megatron_swift.data.dataset import DataOptions
    from megatron_swift.data.pipeline import collator_from_args, prepare_data
    from megatron_swift.plugin import prepare_run_environment
    from megatron_swift.template import template_from_args
    from megatron_swift.trainer.data_feed import build_training_data
    from megatron_swift.trainer.options import training_settings

    model, data = model_and_data
    load = tmp_path / "ckpt"  # an (empty) checkpoint, so the resume checks run too
    (load / "iter_0000002").mkdir(parents=True)
    (load / "iter_0000002" / "metadata.json").write_text("{}")
    (load / "latest_checkpointed_iteration.txt").write_text("2")
    if command == "rlhf":  # DPO pairs
        rows = [json.loads(line) for line in open(data)]
        data = str(tmp_path / "pairs.jsonl")
        with open(data, "w") as f:
            f.writelines(json.dumps(dict(r, rejected_response=f"no {i}")) + "\n" for i, r in enumerate(rows))
    args = parse_args(command, ["--model", model, "--dataset", data, "--train_iters", "2", "--max_length", "64",
                                "--save", str(tmp_path / "out"), "--split_dataset_ratio", "0",
                                "--global_batch_size", "2", "--load", str(load)], world_size=1)
    recorder = Recorder(args)
    training_settings(recorder)
    if command == "rlhf":
        from megatron_swift.rlhf.settings import rlhf_settings

        rlhf_settings(recorder)
    prepare_run_environment(recorder)
    DataOptions.from_args(recorder)
    tokenizer = AutoTokenizer.from_pretrained(model)
    template_from_args(recorder, tokenizer)
    collator_from_args(recorder, 0, 64)
    prepare_data(recorder, tokenizer, cache_dir=str(tmp_path / "cache"))
    build_training_data(recorder)
    read_by_validation = _validation_reads(args)
    assert APPLIED_BY_VALIDATION <= read_by_validation, APPLIED_BY_VALIDATION - read_by_validation
    orphans = user_fields(command) - recorder.read - covered_fields(command) - APPLIED_BY_VALIDATION
    assert not orphans, f"parsed but neither used nor refused: {sorted(orphans)}"


def test_every_export_argument_is_read_or_refused(model_and_data, tmp_path):
    from megatron_swift.export import export_settings
    from megatron_swift.plugin import prepare_run_environment

    model, _ = model_and_data
    args = parse_args("export", ["--model", model, "--to_mcore", "true", "--output_dir", str(tmp_path / "o")],
                      world_size=1)
    recorder = Recorder(args)
    export_settings(recorder)
    prepare_run_environment(recorder)
    orphans = user_fields("export") - recorder.read - covered_fields("export") - APPLIED_BY_VALIDATION
    assert not orphans, f"parsed but neither used nor refused: {sorted(orphans)}"
