"""Typed arguments and the ``megatron`` CLI skeleton.

Oracles: SPEC.md / the ms-swift parameter reference for names and defaults; hand-computed
divisibility for the parallel-size checks; the real console script (subprocess) and a real
torchrun relaunch for the end-to-end cases.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import pytest

from helpers import MEGATRON, free_port, worker_env
from megatron_swift.args import (ALIASES, ArgumentError, ExportCommandArguments, PtArguments, RLHFCommandArguments,
                                 SftArguments, field_infos, parse_args, world_size_from_env)
from megatron_swift.args.dist_env import relaunch_requested
from megatron_swift.cli import main as cli_main
from megatron_swift.cli.launch import build_torchrun_command, read_worker_exit_code, record_exit_code

REPO = Path(__file__).resolve().parents[1]
DENSE_CFG = {"architectures": ["Qwen2ForCausalLM"], "num_attention_heads": 8, "num_key_value_heads": 2,
             "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "torch_dtype": "bfloat16"}


def make_model(root: Path, name: str = "tiny-model", **overrides) -> str:
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    cfg = {k: v for k, v in {**DENSE_CFG, **overrides}.items() if v is not None}
    (path / "config.json").write_text(json.dumps(cfg))
    return str(path)


def make_ckpt(root: Path, name: str = "ckpt") -> str:
    """A checkpoint directory as far as discovery sees it (a complete iteration: metadata.json)."""
    path = root / name
    (path / "iter_0000010").mkdir(parents=True, exist_ok=True)
    (path / "iter_0000010" / "metadata.json").write_text("{}")
    (path / "latest_checkpointed_iteration.txt").write_text("10")
    return str(path)


@pytest.fixture
def model(tmp_path):
    return make_model(tmp_path)


_DATA_DIR = Path(tempfile.mkdtemp(prefix="megatron-swift-cli-args-"))


def data_file(name: str = "data.jsonl") -> str:
    """A one-row chat file (dataset paths are checked before workers start)."""
    path = _DATA_DIR / name
    if not path.exists():
        path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                 {"role": "assistant", "content": "hello"}]}) + "\n")
    return str(path)


def sft(model_dir, *extra, command="sft", world_size=1):
    argv = ["--model", model_dir, "--dataset", data_file(), "--train_iters", "10", *extra]
    return parse_args(command, argv, world_size=world_size)


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(ArgumentError) as info:
        fn(*args, **kwargs)
    return str(info.value)


# ------------------------------------------------------------------------------------ defaults

def test_sft_defaults_match_spec(model):
    args = sft(model)
    assert isinstance(args, SftArguments)
    expected = {
        # selective in the spec, resolved to none here: padding-free THD attention keeps no attention
        # matrix to drop (test_gpu_path covers the other cases)
        "micro_batch_size": 1, "global_batch_size": 16, "recompute_granularity": "none",
        "recompute_modules": ["core_attn"], "lr_decay_style": "cosine", "lr_warmup_iters": 0, "min_lr": 0.0,
        "weight_decay": 0.1, "clip_grad": 1.0, "adam_beta1": 0.9, "adam_beta2": 0.95, "adam_eps": 1e-8,
        "optimizer": "adam", "save_interval": 500, "ckpt_format": "torch_dist", "exit_on_missing_checkpoint": True,
        "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1, "sequence_parallel": False,
        "use_distributed_optimizer": True, "moe_router_dtype": "fp32", "moe_token_dispatcher_type": "alltoall",
        "moe_router_load_balancing_type": "aux_loss", "attention_backend": "auto", "calculate_per_token_loss": True,
        "attention_softmax_in_fp32": True, "log_interval": 5, "eval_iters": -1, "train_type": "full",
        "lora_rank": 8, "lora_alpha": 32, "lora_dropout": 0.05, "lora_bias": "none", "target_modules": ["all-linear"],
        "seed": 42, "split_dataset_ratio": 0.01, "truncation_strategy": "delete", "loss_scale": "default",
        "use_chat_template": True, "trust_remote_code": False, "packing": False, "padding_free": True,
    }
    got = {name: getattr(args, name) for name in expected}
    assert got == expected
    # defaults derived from other arguments
    assert args.lr == 1e-5 and args.eval_interval == 500 and args.lr_decay_iters == 10
    assert args.save == os.path.join("megatron_output", "tiny-model")
    # model-shape overrides stay None (derived from config.json later)
    assert all(getattr(args, n) is None for n in ("num_layers", "hidden_size", "num_query_groups", "rotary_base"))


@pytest.mark.parametrize("start, stop", [("## Megatron parameters", "## RLHF"), ("## RLHF", "## LoRA on mcore"),
                                         ("## LoRA on mcore", "## What a conversion")])
def test_every_spec_name_is_an_argument(start, stop):
    """Oracle: every `name` / `name=default` in SPEC.md's parameter sections is accepted by `megatron rlhf`."""
    spec = Path("/work/shared/SPEC.md")
    if not spec.exists():
        pytest.skip("SPEC.md not available")
    import re
    text = spec.read_text()
    section = text[text.index(start):text.index(stop)]
    names = set(re.findall(r"`([a-z][a-z0-9_]+)(?:=[^`]*)?`", section))
    assert len(names) > 15
    known = set(field_infos("rlhf")) | set(ALIASES["rlhf"])
    assert sorted(names - known) == []


def test_lora_lr_and_command_defaults(model, tmp_path):
    lora = sft(model, "--tuner_type", "lora")  # the 4.x alias of --train_type
    assert lora.train_type == "lora" and lora.lr == 1e-4 and sft(model).lr == 1e-5
    # LoRA for reward models is not built yet: refused instead of silently training in full
    assert "--train_type" in error_of(sft, model, "--load", make_ckpt(tmp_path / "lora"), "--train_type", "lora",
                                      "--rlhf_type", "rm", command="rlhf")
    assert sft(model, "--load", make_ckpt(tmp_path / "dpo_lora"), "--train_type", "lora",
               command="rlhf").train_type == "lora"  # DPO (and KTO) with LoRA: the reference is the base
    assert "--lora_rank" in error_of(sft, model, "--lora_rank", "16")  # a LoRA option with full training
    pt = sft(model, command="pt")
    assert isinstance(pt, PtArguments)
    assert pt.use_chat_template is False and pt.loss_scale == "all"
    load = make_ckpt(tmp_path)
    rlhf = sft(model, "--load", load, command="rlhf")
    assert isinstance(rlhf, RLHFCommandArguments)
    assert rlhf.rlhf_type == "dpo" and rlhf.loss_scale == "last_round" and rlhf.calculate_per_token_loss is False
    assert rlhf.beta == 0.1 and rlhf.loss_type == "sigmoid" and rlhf.ref_load == load
    assert rlhf.desirable_weight == 1.0 and rlhf.label_smoothing == 0.0 and rlhf.f_divergence_type == "reverse_kl"
    # GRPO's defaults (beta 0.04, loss_type grpo, ms-swift's) and its required --vllm_mode
    assert "--vllm_mode" in error_of(sft, model, "--rlhf_type", "grpo", "--reward_funcs", "accuracy", "format",
                                     command="rlhf")
    grpo = sft(model, "--rlhf_type", "grpo", "--reward_funcs", "accuracy", "--vllm_mode", "colocate",
               "--global_batch_size", "8", command="rlhf")
    assert (grpo.beta, grpo.loss_type, grpo.num_generations, grpo.epsilon, grpo.temperature, grpo.top_k) == \
        (0.04, "grpo", 8, 0.2, 0.9, -1)
    assert grpo.generation_batch_size == 8 and grpo.steps_per_generation == 1 and grpo.ref_load is None
    export = parse_args("export", ["--model", model, "--to_mcore", "true"], world_size=1)
    assert isinstance(export, ExportCommandArguments)
    assert export.max_shard_size == "5GB" and export.safe_serialization is True and export.exist_ok is False
    assert export.output_dir == model + "-mcore"


# ------------------------------------------------------------------------------------- syntax

def test_list_dict_bool_none_parsing(model):
    args = sft(model, "--val_dataset", "v1", "v2:sub#10", "--columns", '{"text1": "query"}',
               "--extra_megatron_kwargs", '{"moe_layer_freq": 1}', "--no_save_optim", "--use_hf", "TRUE",
               "--streaming", "0", "--packing", "1", "--add_version", "False", "--interleave_prob", "0.5", "0.5",
               "--dataset", "d1", "d2", "--moe_router_dtype", "none", "--rope_scaling", '{"type": "linear"}',
               "--recompute-granularity", "full", "--recompute_method=uniform", "--recompute_num_layers", "1",
               "--min_lr", "1e-7", "--lr", "2e-5")
    assert args.dataset == ["d1", "d2"] and args.val_dataset == ["v1", "v2:sub#10"]
    assert args.columns == {"text1": "query"} and args.extra_megatron_kwargs == {"moe_layer_freq": 1}
    assert args.no_save_optim is True and args.use_hf is True and args.streaming is False
    assert args.packing is True and args.add_version is False
    assert args.interleave_prob == [0.5, 0.5] and args.moe_router_dtype is None
    assert args.rope_scaling == {"type": "linear"} and args.recompute_granularity == "full"
    assert args.recompute_method == "uniform" and args.min_lr == 1e-7 and args.lr == 2e-5
    assert set(args.explicit_args) >= {"dataset", "columns", "recompute_granularity", "recompute_method"}
    assert sft(model, "--rope_scaling", "yarn").rope_scaling == "yarn"
    assert sft(model, "--system", "-- be brief --").system == "-- be brief --"
    # "-1" is --top_k's value (refused only because sampling options do not apply to DPO)
    assert error_of(sft, model, "--top_k", "-1", command="rlhf").startswith("argument --top_k: does not apply")
    assert sft(model, "--response_prefix=--x").response_prefix == "--x"
    assert sft(model, "--torch_dtype", "fp16").torch_dtype == "float16"


@pytest.mark.parametrize("argv, names", [
    (["--micro_batch_size", "abc"], ["--micro_batch_size", "int"]),
    (["--lr", "fast"], ["--lr", "float"]),
    (["--use_hf", "maybe"], ["--use_hf", "bool"]),
    (["--columns", "[1, 2]"], ["--columns", "JSON object"]),
    (["--columns", "{bad"], ["--columns", "JSON"]),
    (["--model_name", "--seed", "1"], ["--model_name", "at least one value"]),
    (["--seed", "1", "2"], ["--seed", "one value"]),
    (["--seed=1", "2"], ["--seed", "extra value"]),
    (["--micro_batch_size", "0"], ["--micro_batch_size", ">= 1"]),
    (["--lora_dropout", "1.5"], ["--lora_dropout", "< 1"]),
    (["--modle", "x"], ["--modle", "did you mean --model"]),
    (["--learning_rate", "1e-5"], ["--learning_rate", "--lr"]),
    (["--to_hf", "true"], ["--to_hf", "megatron export"]),
])
def test_type_and_unknown_errors_name_the_argument(model, argv, names):
    message = error_of(sft, model, *argv)
    for name in names:
        assert name in message


@pytest.mark.parametrize("name, value", [
    ("lr_decay_style", "cos"), ("recompute_granularity", "some"), ("optimizer", "adamw"),
    ("moe_token_dispatcher_type", "deepep"), ("truncation_strategy", "middle"), ("loss_scale", "last"),
    ("template_backend", "hf"), ("torch_dtype", "float64"), ("attention_backend", "sdpa"), ("train_type", "qlora"),
    ("recompute_modules", "attn"),
])
def test_choice_errors_list_the_choices(model, name, value):
    from megatron_swift.args.commands import field_infos as infos
    message = error_of(sft, model, f"--{name}", value)
    assert f"--{name}" in message and repr(value) in message
    for choice in infos("sft")[name][0].metadata["choices"]:
        assert choice in message


def test_rlhf_type_choices(model):
    message = error_of(sft, model, "--rlhf_type", "ppo2", command="rlhf")
    assert "--rlhf_type" in message and "dpo" in message and "grpo" in message
    message = error_of(sft, model, "--loss_type", "grpo", command="rlhf")
    assert "--loss_type" in message and "sigmoid" in message


# --------------------------------------------------------------------------------- config file

def test_yaml_config_with_command_line_override(model, tmp_path):
    cfg = tmp_path / "train.yaml"
    a, b = data_file("a.jsonl"), data_file("b.jsonl")
    cfg.write_text(f"model: {model}\ndataset: [{a}, {b}]\ntrain_iters: 20\nlr: 3.0e-5\n"
                   f"micro_batch_size: 2\nno_save_optim: true\ncolumns: {{x: y}}\nsave_steps: 50\n")
    args = parse_args("sft", ["--config", str(cfg), "--micro_batch_size", "4", "--save_interval", "7"], world_size=1)
    assert args.dataset == [a, b] and args.train_iters == 20 and args.lr == 3e-5
    assert args.micro_batch_size == 4 and args.no_save_optim is True and args.columns == {"x": "y"}
    assert args.save_interval == 7  # the command line wins over the file's alias
    assert args.num_micro_batches == 4


def test_json_config_and_config_errors_name_the_file(model, tmp_path):
    cfg = tmp_path / "train.json"
    one = data_file("one.jsonl")
    cfg.write_text(json.dumps({"model": model, "dataset": one, "max_epochs": 2, "bf16": False}))
    args = parse_args("sft", ["--config", str(cfg)], world_size=1)
    assert args.dataset == [one] and args.max_epochs == 2 and args.torch_dtype == "float32"
    bad = tmp_path / "bad.yaml"
    bad.write_text("micro_batch_sise: 2\n")
    message = error_of(parse_args, "sft", ["--config", str(bad)], world_size=1)
    assert str(bad) in message and "micro_batch_sise" in message and "micro_batch_size" in message
    bad.write_text("micro_batch_size: two\n")
    message = error_of(parse_args, "sft", ["--config", str(bad)], world_size=1)
    assert str(bad) in message and "micro_batch_size" in message and "int" in message
    bad.write_text("output_dir: a\nsave: b\n")
    message = error_of(parse_args, "sft", ["--config", str(bad)], world_size=1)
    assert str(bad) in message and "--output_dir" in message and "--save" in message
    message = error_of(parse_args, "sft", ["--config", str(tmp_path / "missing.yaml")], world_size=1)
    assert "--config" in message and "missing.yaml" in message


# ------------------------------------------------------------------------------------- aliases

def test_aliases(model, tmp_path):
    ckpt = make_ckpt(tmp_path)
    args = sft(model, "--output_dir", "out", "--save_steps", "20", "--mcore_model", ckpt)
    assert args.save == "out" and args.save_interval == 20 and args.load == ckpt and args.eval_interval == 20
    args = parse_args("sft", ["--model", model, "--dataset", "d", "--num_train_epochs", "3"], world_size=1)
    assert args.max_epochs == 3 and args.train_iters is None and args.lr_decay_iters is None
    for alias, target, value in (("output_dir", "save", "x"), ("save_steps", "save_interval", "5"),
                                 ("num_train_epochs", "max_epochs", "1"), ("mcore_model", "load", ckpt)):
        message = error_of(sft, model, f"--{alias}", value, f"--{target}", value)
        assert f"--{alias}" in message and f"--{target}" in message
    # export: output_dir and mcore_model are its own arguments
    export = parse_args("export", ["--model", model, "--to_hf", "true", "--mcore_model", ckpt,
                                   "--output_dir", str(tmp_path / "hf")], world_size=1)
    assert export.output_dir == str(tmp_path / "hf") and export.mcore_model == ckpt


# ------------------------------------------------------------------------------ contradictions

@pytest.mark.parametrize("argv, names", [
    (["--bf16", "--fp16"], ["--bf16", "--fp16"]),
    (["--lr_warmup_iters", "5", "--lr_warmup_fraction", "0.1"], ["--lr_warmup_iters", "--lr_warmup_fraction"]),
    (["--sequence_parallel", "true"], ["--sequence_parallel", "--tensor_model_parallel_size"]),
    (["--recompute_granularity", "full"], ["--recompute_method", "--recompute_num_layers"]),
    (["--recompute_granularity", "none", "--recompute_modules", "mlp"], ["--recompute_modules", "selective"]),
    (["--overlap_param_gather", "--overlap_grad_reduce", "false"], ["--overlap_param_gather"]),
    (["--overlap_param_gather", "--use_distributed_optimizer", "false"], ["--overlap_param_gather"]),
    (["--template_backend", "jinja"], ["--template_backend"]),
    (["--torch_dtype", "float16", "--bf16", "true"], ["--torch_dtype", "--bf16"]),
    (["--streaming", "--train_iters", "none", "--max_epochs", "1"], ["--train_iters", "--streaming"]),
    (["--adapter_load", "x"], ["--adapter_load", "--train_type lora"]),
    (["--profile", "true"], ["--profile", "--use_pytorch_profiler true"]),
    (["--profile", "true", "--use_pytorch_profiler", "true", "--profile_step_start", "5", "--profile_step_end", "5"],
     ["--profile_step_end", "--profile_step_start"]),
])
def test_contradictions(model, argv, names):
    message = error_of(sft, model, *argv)
    for name in names:
        assert name in message


def test_required_training_arguments(model):
    message = error_of(parse_args, "sft", ["--model", model, "--dataset", "d"], world_size=1)
    assert "--train_iters" in message and "--max_epochs" in message
    message = error_of(parse_args, "sft", ["--model", model, "--train_iters", "1"], world_size=1)
    assert "--dataset" in message
    message = error_of(parse_args, "sft", ["--dataset", "d", "--train_iters", "1"], world_size=1)
    assert "--model" in message


def test_export_needs_exactly_one_direction(model, tmp_path):
    ckpt = make_ckpt(tmp_path)
    for argv in ([], ["--to_mcore", "true", "--to_hf", "true", "--mcore_model", ckpt]):
        message = error_of(parse_args, "export", ["--model", model, *argv], world_size=1)
        assert "--to_mcore" in message and "--to_hf" in message
    message = error_of(parse_args, "export", ["--model", model, "--to_hf"], world_size=1)
    assert "--mcore_model" in message
    out = tmp_path / "exists"
    out.mkdir()
    message = error_of(parse_args, "export", ["--model", model, "--to_mcore", "--output_dir", str(out)], world_size=1)
    assert "--output_dir" in message and "--exist_ok" in message
    assert parse_args("export", ["--model", model, "--to_mcore", "--output_dir", str(out), "--exist_ok"],
                      world_size=1).exist_ok is True
    # inside torchrun only rank 0 checks (rank 0 may already have created it when rank 1 validates)
    worker = {"LOCAL_RANK": "1", "RANK": "1", "WORLD_SIZE": "2"}
    assert parse_args("export", ["--model", model, "--to_mcore", "--output_dir", str(out)], env=worker).world_size == 2
    message = error_of(parse_args, "export", ["--model", model, "--to_mcore", "--max_shard_size", "big"], world_size=1)
    assert "--max_shard_size" in message


# ------------------------------------------------------------------------ world size / batches

def test_world_size_and_data_parallel(model):
    args = sft(model, "--tensor_model_parallel_size", "2", "--micro_batch_size", "2", world_size=8)
    assert (args.world_size, args.data_parallel_size, args.num_micro_batches) == (8, 4, 2)
    message = error_of(sft, model, "--tensor_model_parallel_size", "2", world_size=3)
    assert "--tensor_model_parallel_size" in message and "world size 3 " in message
    message = error_of(sft, model, "--pipeline_model_parallel_size", "2", "--context_parallel_size", "2",
                       world_size=6)
    assert "--pipeline_model_parallel_size" in message and "--context_parallel_size" in message


def test_global_batch_size_divisibility_gives_alternatives(model):
    message = error_of(sft, model, "--global_batch_size", "10", world_size=4)
    assert "--global_batch_size" in message and "10" in message
    assert "micro_batch_size (1) x data_parallel_size (4) = 4" in message
    assert "8, 12" in message
    message = error_of(sft, model, "--global_batch_size", "12", "--micro_batch_size", "2", world_size=4)
    assert "8 x" not in message and "8, 16" in message and "{1, 3}" in message


def test_expert_parallel_checks(tmp_path):
    moe = make_model(tmp_path, "moe", num_experts=6, intermediate_size=None)
    args = sft(moe, "--expert_model_parallel_size", "2", world_size=2)
    assert args.expert_model_parallel_size == 2
    message = error_of(sft, moe, "--expert_model_parallel_size", "4", world_size=4)
    assert "--expert_model_parallel_size" in message and "(6)" in message and "1, 2, 3, 6" in message
    message = error_of(sft, moe, "--expert_model_parallel_size", "3", world_size=4)
    assert "--expert_model_parallel_size" in message and "data_parallel_size x context_parallel_size" in message
    mixtral = make_model(tmp_path, "mixtral", num_local_experts=8, intermediate_size=None)
    assert "(8)" in error_of(sft, mixtral, "--expert_model_parallel_size", "3", "--global_batch_size", "3",
                             world_size=3)
    dense = make_model(tmp_path, "dense")
    assert "MoE" in error_of(sft, dense, "--expert_model_parallel_size", "2", world_size=2)


# --------------------------------------------------------------------------------- HF config

def test_hf_config_dtype_flags(tmp_path):
    for dtype, bf16, fp16 in (("bfloat16", True, False), ("float16", False, True), ("float32", False, False)):
        path = make_model(tmp_path, f"m-{dtype}", torch_dtype=dtype)
        args = sft(path)
        assert (args.torch_dtype, args.bf16, args.fp16) == (dtype, bf16, fp16)
        assert args.hf_config["num_attention_heads"] == 8 and args.model_dir == os.path.abspath(path)
    new_style = make_model(tmp_path, "m-dtype-key", torch_dtype=None, dtype="float16")  # transformers 5 key
    assert sft(new_style).fp16 is True
    bf16_model = make_model(tmp_path, "m-bf16")
    args = sft(bf16_model, "--torch_dtype", "float32")
    assert (args.bf16, args.fp16) == (False, False)
    args = sft(bf16_model, "--fp16", "true")
    assert (args.torch_dtype, args.bf16, args.fp16) == ("float16", False, True)
    args = sft(bf16_model, "--bf16", "false")
    assert (args.torch_dtype, args.bf16) == ("float32", False)


def test_tp_must_divide_heads_and_kv_heads(model):
    message = error_of(sft, model, "--tensor_model_parallel_size", "4", world_size=4)
    assert "--tensor_model_parallel_size" in message and "num_key_value_heads (2)" in message
    assert "valid tensor_model_parallel_size values: 1, 2" in message
    args = sft(model, "--tensor_model_parallel_size", "2", world_size=2)
    assert args.data_parallel_size == 1
    # overriding the KV heads changes the valid sizes
    assert sft(model, "--tensor_model_parallel_size", "4", "--num_query_groups", "4", world_size=4)


def test_pipeline_layers_check(model):
    message = error_of(sft, model, "--pipeline_model_parallel_size", "3", world_size=3)
    assert "--pipeline_model_parallel_size" in message and "1, 2, 4" in message
    args = sft(model, "--pipeline_model_parallel_size", "3", "--decoder_first_pipeline_num_layers", "2",
               world_size=3)
    assert args.pipeline_model_parallel_size == 3


def test_model_and_load_paths(model, tmp_path):
    assert sft("Qwen/Qwen2.5-0.5B-Instruct").hf_config is None
    message = error_of(sft, str(tmp_path / "absent"))
    assert "--model" in message and "absent" in message
    message = error_of(sft, "not a model")
    assert "--model" in message and "not a model" in message
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "config.json" in error_of(sft, str(empty))
    message = error_of(sft, model, "--load", str(tmp_path / "no_ckpt"))
    assert "--load" in message and "no_ckpt" in message
    iter_dir = Path(make_ckpt(tmp_path)) / "iter_0000010"
    assert sft(model, "--load", str(iter_dir)).load == str(iter_dir)  # an iteration directory itself
    (iter_dir / "metadata.json").unlink()
    message = error_of(sft, model, "--load", str(iter_dir))
    assert "--load" in message and "parent" in message
    ckpt = make_ckpt(tmp_path, "with-args")
    (Path(ckpt) / "args.json").write_text(json.dumps({"model": model}))
    args = parse_args("sft", ["--load", ckpt, "--dataset", data_file(), "--train_iters", "1"], world_size=1)
    assert args.model == model and args.hf_config is not None


def test_to_dict_is_json_serializable(model):
    data = sft(model).to_dict()
    assert json.loads(json.dumps(data))["global_batch_size"] == 16 and data["command"] == "sft"


# -------------------------------------------------------------------------------------- launch

def test_torchrun_command_builder():
    cmd = build_torchrun_command("sft", ["--model", "m", "--dataset", "a", "b"],
                                 {"NPROC_PER_NODE": "4", "NNODES": "2", "NODE_RANK": "1",
                                  "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "12345"}, python="/py")
    assert cmd == ["/py", "-m", "torch.distributed.run", "--nproc_per_node", "4", "--nnodes", "2", "--node_rank",
                   "1", "--master_addr", "10.0.0.1", "--master_port", "12345", "-m", "megatron_swift.cli.main",
                   "sft", "--model", "m", "--dataset", "a", "b"]
    cmd = build_torchrun_command("export", [], {"NPROC_PER_NODE": "2"}, python="/py")
    assert cmd[3:13] == ["--nproc_per_node", "2", "--nnodes", "1", "--node_rank", "0", "--master_addr",
                         "127.0.0.1", "--master_port", "29500"]
    assert "NPROC_PER_NODE" in error_of(build_torchrun_command, "sft", [], {"NPROC_PER_NODE": "two"})
    assert "NODE_RANK" in error_of(build_torchrun_command, "sft", [], {"NNODES": "2", "NODE_RANK": "2"})


def test_world_size_from_env():
    assert world_size_from_env({}) == 1
    assert world_size_from_env({"NPROC_PER_NODE": "4", "NNODES": "2"}) == 8
    assert world_size_from_env({"NPROC_PER_NODE": "4", "LOCAL_RANK": "0", "WORLD_SIZE": "3"}) == 3
    assert world_size_from_env({"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "2"}) == 2
    assert relaunch_requested({"NNODES": "1"}) and not relaunch_requested({"NNODES": "1", "LOCAL_RANK": "0"})
    assert not relaunch_requested({"NPROC_PER_NODE": ""})


def test_worker_exit_codes_round_trip(tmp_path):
    env = {"MEGATRON_SWIFT_EXIT_CODE_DIR": str(tmp_path), "LOCAL_RANK": "1"}
    record_exit_code(0, {**env, "LOCAL_RANK": "0"})
    record_exit_code(2, env)
    assert read_worker_exit_code(str(tmp_path)) == 2
    record_exit_code(5, {"MEGATRON_SWIFT_EXIT_CODE_DIR": str(tmp_path)})  # not a worker: no-op
    assert sorted(os.listdir(tmp_path)) == ["local_rank_0", "local_rank_1"]

def test_failing_worker_waits_for_its_local_peers(tmp_path, monkeypatch):
    """A failing worker polls until every local rank has recorded its code (so each reports the error)
    and gives up at its deadline; a clock that advances one poll per sleep stands in for time."""
    from megatron_swift.cli import launch

    clock = {"now": 0.0, "polls": 0}

    def sleep(seconds):
        clock["now"] += seconds
        clock["polls"] += 1
        if clock["polls"] == 3:  # the last peer reports during the third wait
            (tmp_path / "local_rank_3").write_text("2")

    monkeypatch.setattr(launch.time, "monotonic", lambda: clock["now"])
    monkeypatch.setattr(launch.time, "sleep", sleep)
    env = {"MEGATRON_SWIFT_EXIT_CODE_DIR": str(tmp_path), "LOCAL_WORLD_SIZE": "4"}
    for rank in (0, 1):
        (tmp_path / f"local_rank_{rank}").write_text("0")
    record_exit_code(2, {**env, "LOCAL_RANK": "2"}, wait_s=5.0)
    assert clock["polls"] == 3  # returned as soon as all four had reported
    (tmp_path / "local_rank_3").unlink()
    clock.update(now=100.0, polls=-1000)  # rank 3 never reports: bounded by the deadline
    record_exit_code(2, {**env, "LOCAL_RANK": "2"}, wait_s=1.0)
    assert 101.0 <= clock["now"] < 101.1  # one poll interval past the 1 s deadline at most


# ----------------------------------------------------------------------------- cli in-process

@pytest.fixture
def clean_env(monkeypatch):
    for key in ("NPROC_PER_NODE", "NNODES", "LOCAL_RANK", "TORCHELASTIC_RUN_ID", "WORLD_SIZE",
                "MEGATRON_SWIFT_EXIT_CODE_DIR"):
        monkeypatch.delenv(key, raising=False)


def test_sft_dispatches_to_trainer(model, clean_env, monkeypatch):
    seen = []
    fake = types.ModuleType("megatron_swift.trainer")
    fake.run_training = lambda args: seen.append(args) or 0
    monkeypatch.setitem(sys.modules, "megatron_swift.trainer", fake)
    rc = cli_main.main(["sft", "--model", model, "--dataset", "d", "--train_iters", "3"])
    assert rc == 0 and len(seen) == 1 and isinstance(seen[0], SftArguments) and seen[0].train_iters == 3


def test_not_built_and_errors_in_process(model, clean_env, capsys):
    rc = cli_main.main(["rlhf", "--rlhf_type", "ppo", "--model", model, "--dataset", "d", "--train_iters", "3"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("megatron rlhf: error: argument --rlhf_type ppo: not built yet")
    rc = cli_main.main(["rlhf", "--model", model, "--dataset", "d", "--train_iters", "3", "--beta", "x"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("megatron rlhf: error: argument --beta")
    assert cli_main.main(["train"]) == 2 and "unknown command 'train'" in capsys.readouterr().err
    assert cli_main.main(["--version"]) == 0 and "0.1.0" in capsys.readouterr().out
    assert cli_main.main(["export", "--help"]) == 0
    out = capsys.readouterr().out
    assert "Export arguments:" in out and "--max_shard_size str (default: 5GB)" in out


# ------------------------------------------------------------------------------ subprocess e2e

def test_console_script_help_and_unknown_argument():
    out = subprocess.run(MEGATRON + ["--help"], capture_output=True, text=True, env=worker_env(), timeout=60)
    assert out.returncode == 0 and "pt" in out.stdout and "export" in out.stdout and "NPROC_PER_NODE" in out.stdout
    out = subprocess.run(MEGATRON + ["sft", "--help"], capture_output=True, text=True, env=worker_env(), timeout=60)
    assert out.returncode == 0
    assert "Megatron arguments:" in out.stdout and "--global_batch_size int (default: 16)" in out.stdout
    assert "--save str|none (default: None) [alias: --output_dir]" in out.stdout
    out = subprocess.run(MEGATRON + ["sft", "--micro_batch_sise", "2"], capture_output=True, text=True,
                         env=worker_env(NPROC_PER_NODE="2"), timeout=60)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("megatron sft: error: unrecognized argument --micro_batch_sise; "
                                 "did you mean --micro_batch_size")
    assert len(out.stderr.strip().splitlines()) == 1  # no traceback, no relaunch


def test_parsing_imports_neither_torch_nor_megatron(model):
    code = ("import sys\nimport megatron_swift.args, megatron_swift.cli.main\n"
            "from megatron_swift.cli.main import run\n"
            "rc = run(['export', '--model', sys.argv[1], '--to_mcore', '--output_dir', sys.argv[2]])\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron', 'transformers'))\n"
            "print(rc, heavy)\n")
    out = subprocess.run([sys.executable, "-c", code, model, model + "-out"], capture_output=True, text=True,
                         env=worker_env(), timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "2 []"


def test_nproc_per_node_relaunches_under_torchrun(tmp_path):
    model = make_model(tmp_path)
    argv = ["rlhf", "--model", model, "--dataset", "d", "--train_iters", "3"]
    out = subprocess.run(MEGATRON + argv, capture_output=True, text=True, timeout=120,
                         env=worker_env(NPROC_PER_NODE="2", MASTER_PORT=str(free_port())))
    # the config has no model_type: each worker fails reading it (after the relaunch)
    message = "megatron rlhf: error: Unrecognized model in"
    assert out.returncode != 0, out.stderr
    assert out.stderr.count(message) == 2, out.stderr  # one per torchrun worker
    # validation happens before the relaunch: a bad TP never reaches torchrun
    out = subprocess.run(MEGATRON + argv + ["--tensor_model_parallel_size", "4"], capture_output=True, text=True,
                         timeout=60, env=worker_env(NPROC_PER_NODE="2", MASTER_PORT=str(free_port())))
    assert out.returncode == 2
    assert out.stderr.startswith("megatron rlhf: error: arguments --tensor_model_parallel_size (4)")
    assert "torch.distributed" not in out.stderr


@pytest.mark.skipif(__import__("importlib.util").util.find_spec("transformer_engine") is not None,
                    reason="with Transformer Engine, context parallelism is available")
def test_context_parallel_without_transformer_engine_is_a_clear_early_error(model):
    message = error_of(sft, model, "--context_parallel_size", "2", world_size=2)
    assert "--context_parallel_size" in message and "Transformer Engine" in message


def test_moe_layouts_that_cannot_run_are_refused_early(tmp_path):
    moe = make_model(tmp_path, "moe", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)
    # allgather over an expert group that spans data-parallel replicas (their micro batches differ in size)
    msg = error_of(sft, moe, "--expert_model_parallel_size", "2", "--moe_token_dispatcher_type", "allgather",
                   "--global_batch_size", "8", world_size=2)
    assert "--moe_token_dispatcher_type allgather" in msg and "alltoall" in msg
    # ... fine inside one TP group (equal shares of one micro batch) and under pipeline parallelism (fixed shapes)
    sft(moe, "--tensor_model_parallel_size", "2", "--sequence_parallel", "true", "--expert_model_parallel_size", "2",
        "--expert_tensor_parallel_size", "1", "--moe_token_dispatcher_type", "allgather", world_size=2)
    assert "flex" in error_of(sft, moe, "--moe_token_dispatcher_type", "flex")
    msg = error_of(sft, moe, "--moe_router_load_balancing_type", "seq_aux_loss")
    assert "seq_aux_loss" in msg and "--padding_free false" in msg
    sft(moe, "--moe_router_load_balancing_type", "seq_aux_loss", "--padding_free", "false")
    assert "--moe_aux_loss_coeff" in error_of(sft, moe, "--moe_router_load_balancing_type", "sinkhorn",
                                              "--moe_aux_loss_coeff", "0.01")
    sft(moe, "--moe_router_load_balancing_type", "sinkhorn")
