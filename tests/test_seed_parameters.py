"""The seed's Megatron parameters: each one parses and reaches the object it names.

Oracle: the seed reference / SPEC.md (names, defaults) and megatron-core's own config classes: a
value given on the command line must show up in the ``TransformerConfig`` megatron builds the
model from (or the optimizer / logging / loop settings for the others), not just in the parsed
arguments. GPU-only parameters are refused on this CPU machine with the reason, and reach their
config on a (simulated) GPU host with Transformer Engine.
"""

from __future__ import annotations

import json

import pytest
import torch

from megatron_swift.args import ArgumentError, parse_args
from megatron_swift.args.capabilities import Capabilities

# the 28 seed parameters an earlier version did not accept (issue: "The seed's Megatron parameters")
SEED_NAMES = (
    "apply_query_key_layer_scaling attention_dropout auto_detect_ckpt_format cross_entropy_fusion_impl "
    "disable_bias_linear distributed_timeout_minutes group_query_attention hidden_dropout log_memory_to_tensorboard "
    "log_params_norm log_timers_to_tensorboard log_validation_ppl_to_tensorboard logging_level manual_gc "
    "manual_gc_interval max_position_embeddings moe_enable_deepep moe_shared_expert_overlap "
    "no_create_attention_mask_in_dataloader no_initialization no_log_learning_rate_to_tensorboard "
    "position_embedding_type rotary_percent tensorboard_log_interval tensorboard_queue_size use_cpu_initialization "
    "use_precision_aware_optimizer wandb_save_dir").split()

# name -> the seed's default
SEED_DEFAULTS = {
    "apply_query_key_layer_scaling": None, "attention_dropout": 0.0, "auto_detect_ckpt_format": True,
    "cross_entropy_fusion_impl": "native", "disable_bias_linear": True, "distributed_timeout_minutes": None,
    "group_query_attention": None, "hidden_dropout": 0.0, "log_memory_to_tensorboard": True,
    "log_params_norm": False, "log_timers_to_tensorboard": True, "log_validation_ppl_to_tensorboard": True,
    "logging_level": None, "manual_gc": False, "manual_gc_interval": 0, "max_position_embeddings": None,
    "moe_enable_deepep": False, "moe_shared_expert_overlap": False, "no_create_attention_mask_in_dataloader": True,
    "no_initialization": True, "no_log_learning_rate_to_tensorboard": False, "position_embedding_type": "rope",
    "rotary_percent": 1.0, "tensorboard_log_interval": 1, "tensorboard_queue_size": 50, "use_cpu_initialization": False,
    "use_precision_aware_optimizer": False, "wandb_save_dir": None,
}

GPU_TE = Capabilities(gpu=True, transformer_engine=True, apex_gradient_accumulation=False, deep_ep=True, wandb=False,
                      swanlab=False)


@pytest.fixture
def dirs(tmp_path):
    from megatron_swift.model.tiny import tiny_hf_config

    model = tmp_path / "model"
    model.mkdir()
    cfg = tiny_hf_config("qwen3_moe", num_hidden_layers=2).to_dict()
    cfg["architectures"] = ["Qwen3MoeForCausalLM"]
    (model / "config.json").write_text(json.dumps(cfg))
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant",
                                                                                  "content": "a"}]}) + "\n")
    return str(model), str(data)


def parse(dirs, *extra, caps=None):
    from megatron_swift.args.parser import collect_values
    from megatron_swift.args.commands import COMMANDS
    from megatron_swift.args.validate import validate

    model, data = dirs
    argv = ["--model", model, "--dataset", data, "--train_iters", "5", *extra]
    if caps is None:
        return parse_args("sft", argv, world_size=1)
    values, explicit = collect_values("sft", argv)
    args = COMMANDS["sft"](**values)
    args.command, args.explicit_args = "sft", explicit
    validate(args, 1, {}, caps=caps)
    return args


def transformer_config(args):
    from megatron_swift.model.config import transformer_config_from_hf
    from megatron_swift.model.tiny import tiny_hf_config
    from megatron_swift.trainer.options import model_overrides

    return transformer_config_from_hf(tiny_hf_config("qwen3_moe", num_hidden_layers=2), model_overrides(args))[0]


def test_every_seed_name_parses_with_the_seed_default(dirs):
    args = parse(dirs)
    assert {name: getattr(args, name) for name in SEED_NAMES} == SEED_DEFAULTS


@pytest.mark.parametrize("argv, field, expected", [
    (["--attention_dropout", "0.1"], "attention_dropout", 0.1),
    (["--hidden_dropout", "0.2"], "hidden_dropout", 0.2),
    (["--apply_query_key_layer_scaling", "true"], "apply_query_key_layer_scaling", True),
    (["--torch_dtype", "float16"], "apply_query_key_layer_scaling", True),  # default: on with fp16
    (["--disable_bias_linear", "true"], "add_bias_linear", False),
    (["--use_cpu_initialization", "true"], "use_cpu_initialization", True),
    (["--no_initialization", "false"], "perform_initialization", True),
    ([], "perform_initialization", False),  # weights come from the checkpoint anyway
    (["--cross_entropy_loss_fusion", "true", "--cross_entropy_fusion_impl", "native"], "cross_entropy_fusion_impl",
     "native"),
])
def test_model_parameters_reach_transformer_config(dirs, argv, field, expected):
    assert getattr(transformer_config(parse(dirs, *argv)), field) == expected


def test_max_position_embeddings_reaches_the_gpt_settings(dirs):
    from megatron_swift.model.config import transformer_config_from_hf
    from megatron_swift.model.tiny import tiny_hf_config
    from megatron_swift.trainer.options import model_overrides

    args = parse(dirs, "--max_position_embeddings", "777")
    _, settings = transformer_config_from_hf(tiny_hf_config("qwen3_moe", num_hidden_layers=2), model_overrides(args))
    assert settings.max_sequence_length == 777


def test_timeouts_logging_and_gc_reach_the_training_settings(dirs, tmp_path):
    from megatron_swift.trainer.options import training_settings

    args = parse(dirs, "--distributed_timeout_minutes", "7", "--log_params_norm", "true", "--log_timers_to_tensorboard",
                 "false", "--log_memory_to_tensorboard", "false", "--log_validation_ppl_to_tensorboard", "false",
                 "--no_log_learning_rate_to_tensorboard", "true", "--tensorboard_log_interval", "3",
                 "--tensorboard_queue_size", "9", "--logging_level", "DEBUG", "--manual_gc", "true",
                 "--manual_gc_interval", "4", "--wandb_save_dir", str(tmp_path))
    s = training_settings(args)
    assert s.timeout_seconds == 420
    log = s.logging
    assert (log.log_params_norm, log.log_timers, log.log_memory, log.log_validation_ppl, log.log_learning_rate) == (
        True, False, False, False, False)
    assert (log.tensorboard_log_interval, log.tensorboard_queue_size, log.logging_level) == (3, 9, "DEBUG")
    assert log.wandb_save_dir == str(tmp_path)
    assert (s.manual_gc, s.manual_gc_interval) == (True, 4)
    with pytest.raises(ArgumentError, match="distributed_timeout_minutes"):
        parse(dirs, "--distributed_timeout_minutes", "7", "--ddp_timeout", "60")


def test_model_overrides_are_checked_against_config_json(dirs):
    """Overrides that contradict the HF config (or the families) are refused before workers start."""
    with pytest.raises(ArgumentError, match="group_query_attention"):
        parse(dirs, "--group_query_attention", "false")  # 2 KV heads for 4 heads
    parse(dirs, "--group_query_attention", "true")
    with pytest.raises(ArgumentError, match="position_embedding_type"):
        parse(dirs, "--position_embedding_type", "learned_absolute")
    with pytest.raises(ArgumentError, match="rotary_percent"):
        parse(dirs, "--rotary_percent", "0.5")
    with pytest.raises(ArgumentError, match="disable_bias_linear"):
        parse(dirs, "--disable_bias_linear", "false")
    with pytest.raises(ArgumentError, match="no_create_attention_mask_in_dataloader"):
        parse(dirs, "--no_create_attention_mask_in_dataloader", "false")
    with pytest.raises(ArgumentError, match="no_initialization"):  # nothing to load: it would train garbage
        parse(dirs, "--no_initialization", "true")


def test_gpu_only_parameters_refused_on_cpu_and_used_with_transformer_engine(dirs):
    for argv in (["--moe_enable_deepep", "true", "--moe_token_dispatcher_type", "flex"],
                 ["--moe_shared_expert_overlap", "true"], ["--use_precision_aware_optimizer", "true"],
                 ["--cross_entropy_loss_fusion", "true", "--cross_entropy_fusion_impl", "te"]):
        with pytest.raises(ArgumentError, match="GPU|Transformer Engine|DeepEP"):
            parse(dirs, *argv, caps=Capabilities(False, False, False, False, False, False))
    from megatron_swift.trainer.options import model_overrides, optimizer_settings

    args = parse(dirs, "--moe_enable_deepep", "true", "--moe_token_dispatcher_type", "flex",
                 "--moe_shared_expert_overlap", "true", "--use_precision_aware_optimizer", "true",
                 "--exp_avg_dtype", "bf16", caps=GPU_TE)
    overrides = model_overrides(args)
    assert overrides["moe_enable_deepep"] is True and overrides["moe_shared_expert_overlap"] is True
    opt = optimizer_settings(args)
    assert opt.use_precision_aware_optimizer and opt.exp_avg_dtype == "bf16"
    from megatron_swift.trainer.model_setup import _precision_aware

    assert _precision_aware(opt)["exp_avg_dtype"] == torch.bfloat16


def test_dropout_overrides_change_the_forward_in_train_mode_only(dirs, megatron_world1):
    """Oracle: the same weights and tokens without dropout."""
    from megatron_swift.model import build_model
    from megatron_swift.model.tiny import tiny_hf_config
    from megatron_swift.trainer.options import model_overrides

    hf = tiny_hf_config("qwen3", num_hidden_layers=2)
    tokens = torch.randint(0, 500, (1, 12))
    positions = torch.arange(12).unsqueeze(0)
    outputs = {}
    for name, argv in (("none", []), ("dropout", ["--hidden_dropout", "0.3", "--attention_dropout", "0.3"])):
        overrides = model_overrides(parse(dirs, *argv))
        overrides.update(num_moe_experts=None, perform_initialization=True)
        for key in [k for k in overrides if k.startswith("moe_")]:
            overrides.pop(key)
        chunks, config, _ = build_model(hf, overrides)
        model = chunks[0]
        if name == "none":
            weights = model.state_dict()
        else:
            model.load_state_dict(weights)
        model.train()
        outputs[name, "train"] = model(tokens, positions, attention_mask=None)
        model.eval()
        with torch.no_grad():
            outputs[name, "eval"] = model(tokens, positions, attention_mask=None)
    assert torch.equal(outputs["none", "eval"], outputs["dropout", "eval"])
    assert not torch.allclose(outputs["none", "train"], outputs["dropout", "train"])
