"""`megatron rlhf` arguments: DPO's are read (defaults as ms-swift), the rest refused by name before
any worker starts (no RLHF argument is parsed and ignored)."""

from __future__ import annotations

import json

import pytest

from megatron_swift.args import ArgumentError, parse_args


@pytest.fixture
def model_and_data(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "num_attention_heads": 4,
        "num_key_value_heads": 2, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "head_dim": 16, "vocab_size": 1000, "torch_dtype": "float32"}))
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                                "rejected_response": "b"}) + "\n")
    return str(model), str(data)


def rlhf(model_and_data, *extra, world_size=1):
    model, data = model_and_data
    return parse_args("rlhf", ["--model", model, "--dataset", data, "--train_iters", "2", *extra],
                      world_size=world_size)


def error(model_and_data, *extra, world_size=1) -> str:
    with pytest.raises(ArgumentError) as info:
        rlhf(model_and_data, *extra, world_size=world_size)
    return str(info.value)


def test_dpo_settings_defaults_and_aliases(model_and_data):
    from megatron_swift.rlhf.settings import rlhf_settings

    s = rlhf_settings(rlhf(model_and_data))
    assert (s.rlhf_type, s.dpo.beta, s.dpo.loss_type, s.dpo.rpo_alpha, s.dpo.label_smoothing) == \
        ("dpo", 0.1, "sigmoid", 1.0, 0.0)
    assert s.dpo.f_divergence_type == "reverse_kl" and not s.dpo.reference_free and s.ref_load is None
    s = rlhf_settings(rlhf(model_and_data, "--loss_type", "aot_pair", "--rpo_alpha", "none", "--beta", "0.3"))
    assert s.dpo.loss_type == "aot_unpaired" and s.dpo.rpo_alpha is None and s.dpo.beta == 0.3


@pytest.mark.parametrize("extra, names", [
    (["--rlhf_type", "ppo"], ["--rlhf_type ppo", "not built"]),
    (["--rlhf_type", "rm", "--num_labels", "2"], ["--num_labels 2", "num_labels 1"]),
    (["--rlhf_type", "rm", "--task_type", "embedding"], ["--task_type embedding", "seq_cls"]),
    (["--rlhf_type", "rm", "--beta", "0.2"], ["--beta", "does not apply to --rlhf_type rm"]),
    (["--rlhf_type", "rm", "--ref_model", "m"], ["--ref_model", "rm"]),
    (["--rlhf_type", "rm", "--rpo_alpha", "0.5"], ["--rpo_alpha", "rm"]),
    (["--center_rewards_coefficient", "0.1"], ["--center_rewards_coefficient", "does not apply to --rlhf_type dpo"]),
    (["--task_type", "seq_cls"], ["--task_type seq_cls", "rlhf_type rm"]),
    (["--rlhf_type", "grpo", "--reward_funcs", "accuracy"], ["--vllm_mode", "colocate", "server"]),
    (["--desirable_weight", "2"], ["--desirable_weight", "does not apply to --rlhf_type dpo"]),
    (["--rlhf_type", "kto", "--micro_batch_size", "2", "--rpo_alpha", "0.5"], ["--rpo_alpha", "kto"]),
    (["--rlhf_type", "kto", "--micro_batch_size", "2", "--reference_free", "true"], ["--reference_free"]),
    (["--rlhf_type", "kto"], ["--micro_batch_size", ">= 2", "apo_zero_unpaired"]),
    (["--simpo_gamma", "0.5"], ["--simpo_gamma"]),
    (["--num_generations", "4"], ["--num_generations"]),
    (["--ref_adapter_load", "x"], ["--ref_adapter_load"]),
    (["--reference_free", "true", "--ref_model", "m"], ["--ref_model", "--reference_free"]),
    (["--packing", "true"], ["--packing", "--padding_free"]),
    (["--loss_type", "kto"], ["--loss_type", "kto"]),
])
def test_not_built_is_refused_by_name(model_and_data, extra, names):
    message = error(model_and_data, *extra)
    for name in names:
        assert name in message, message


def test_rm_settings(model_and_data):
    from megatron_swift.rlhf.settings import rlhf_settings

    s = rlhf_settings(rlhf(model_and_data, "--rlhf_type", "rm", "--task_type", "seq_cls", "--num_labels", "1",
                           "--center_rewards_coefficient", "0.01"))
    assert (s.rlhf_type, s.center_rewards_coefficient) == ("rm", 0.01)
    assert rlhf_settings(rlhf(model_and_data, "--rlhf_type", "rm")).center_rewards_coefficient is None


def test_grpo_batch_rules_name_the_numbers(model_and_data):
    """Batch sizes count completions: the generation batch splits into whole groups, then over DP ranks."""
    from megatron_swift.rlhf.settings import rlhf_settings

    base = ("--rlhf_type", "grpo", "--reward_funcs", "accuracy", "--vllm_mode", "colocate")
    s = rlhf_settings(rlhf(model_and_data, *base, "--global_batch_size", "16", "--num_generations", "4",
                           "--loss_type", "dapo", "--epsilon_high", "0.28", "--scale_rewards", "batch",
                           "--advantage_estimator", "rloo", "--importance_sampling_level", "sequence"))
    g = s.grpo
    assert (g.generation_batch_size, g.num_generations, g.loss.loss_type, g.loss.eps_high) == (16, 4, "dapo", 0.28)
    assert (g.scale_rewards, g.advantage_estimator, g.loss.importance_sampling_level) == ("batch", "rloo", "sequence")
    assert g.loss.beta == 0.04 and g.needs_reference and g.vllm.mode == "colocate"
    message = error(model_and_data, *base, "--global_batch_size", "8", world_size=2)  # 1 prompt, 2 DP ranks
    assert "8 completions are 1 prompts x 8 generations" in message and "multiple of 2" in message
    assert "--ref_model" in error(model_and_data, *base, "--global_batch_size", "8", "--beta", "0",
                                  "--ref_model", "m")
    assert "--kl_in_reward: --beta 0" in error(model_and_data, *base, "--global_batch_size", "8", "--kl_in_reward",
                                               "true", "--beta", "0")
    assert rlhf_settings(rlhf(model_and_data, *base, "--global_batch_size", "8", "--kl_in_reward", "true")).grpo.kl_in_reward
    assert "--split_dataset_ratio" in error(model_and_data, *base, "--global_batch_size", "8",
                                            "--split_dataset_ratio", "0.1")
    assert rlhf(model_and_data, *base, "--global_batch_size", "8").split_dataset_ratio == 0.0
