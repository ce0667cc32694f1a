"""GRPO rewards (megatron_swift/rlhf/rewards.py, megatron_swift.plugin.orms) and GRPO's bad input through
the `megatron` CLI: each refused before any worker starts, naming the argument or file."""

from __future__ import annotations

import json
import math
import types

import pytest

from helpers import megatron


def args_ns(**kw):
    base = dict(cosine_min_len_value_wrong=-0.5, cosine_max_len_value_wrong=0.0, cosine_min_len_value_correct=1.0,
                cosine_max_len_value_correct=0.5, cosine_max_len=10, repetition_n_grams=2,
                repetition_max_penalty=-1.0, soft_max_length=10, soft_cache_length=4)
    base.update(kw)
    return types.SimpleNamespace(**base)


def test_accuracy_and_format():
    from megatron_swift.rlhf.rewards import Accuracy, Format

    acc = Accuracy(args_ns())
    completions = ["<think>x</think><answer>42</answer>", "so \\boxed{\\frac{1}{2}}", "the answer is 7", "0.5"]
    assert acc(completions, solution=["42", "<answer>0.5</answer>", "8", "\\frac{1}{2}"]) == [1.0, 1.0, 0.0, 1.0]
    fmt = Format(args_ns())
    assert fmt(["<think>a</think> <answer>b</answer>", "<think>a</think><answer>b</answer> tail", "b"]) == \
        [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="'solution' column"):
        acc(["1"])


def test_cosine_repetition_soft_overlong_formulas():
    from megatron_swift.rlhf.rewards import Cosine, Repetition, SoftOverlong

    a = args_ns()
    cos = Cosine(a)
    out = cos(["<answer>1</answer>", "<answer>2</answer>"], solution=["1", "1"], response_token_ids=[[0] * 5, [0] * 10])
    # correct at half length: 0.5 + (1 - 0.5)(1 + cos(pi/2))/2 = 0.75; wrong at max length: cosine_max_len_value_wrong
    assert out == [pytest.approx(0.75), pytest.approx(0.0)]
    rep = Repetition(a)
    # bigrams of "a b a b a": (a b), (b a), (a b), (b a) -> 2 distinct of 4 -> -(1 - 2/4)
    assert rep(["a b a b a", "one", "x y z w"]) == [pytest.approx(-0.5), 0.0, pytest.approx(0.0)]
    soft = SoftOverlong(a)
    # expected length 10 - 4 = 6: 5 -> 0, 8 -> -(8 - 6)/4, 12 -> -1.5
    assert soft([""] * 3, response_token_ids=[[0] * 5, [0] * 8, [0] * 12]) == [0.0, -0.5, -1.5]
    assert math.isclose(Cosine.cosfn(0, 10, 0.5, 1.0), 1.0)


def test_plugin_reward_registered_the_ms_swift_way(tmp_path):
    from megatron_swift.plugin import import_user_files
    from megatron_swift.rlhf.rewards import call_reward, resolve_reward_funcs

    plugin = tmp_path / "my_plugin.py"
    plugin.write_text(
        "from megatron_swift.plugin import ORM, orms  # ms-swift: from swift.rewards import ORM, orms\n"
        "class Short(ORM):\n"
        "    def __call__(self, completions, solution=None, **kwargs):\n"
        "        return [float(len(c) < self.args.limit) if s else None for c, s in zip(completions, solution)]\n"
        "orms['short'] = Short\n")
    import_user_files([str(plugin)])
    funcs = resolve_reward_funcs(["short", "format"], types.SimpleNamespace(limit=3))
    assert call_reward(funcs[0], ["ab", "abcd", "a"], {"solution": ["x", "y", None]})[:2] == [1.0, 0.0]
    assert math.isnan(call_reward(funcs[0], ["ab", "abcd", "a"], {"solution": ["x", "y", None]})[2])
    with pytest.raises(ValueError, match="unknown reward function 'nope'.*accuracy, cosine, format"):
        resolve_reward_funcs(["nope"], None)


def test_demo_grpo_plugin_and_reward_curve(tmp_path):
    """scripts/demo_grpo.sh's pieces: the plugin it writes registers `letters`; reward-curve reads a log."""
    from megatron_swift.plugin import import_user_files
    from megatron_swift.rlhf.demo import LETTERS_PLUGIN, reward_curve
    from megatron_swift.rlhf.rewards import call_reward, resolve_reward_funcs

    plugin = tmp_path / "letters_reward.py"
    plugin.write_text(LETTERS_PLUGIN)
    import_user_files([str(plugin)])
    (letters,) = resolve_reward_funcs(["letters"], None)
    assert call_reward(letters, ["ab12", "????"], {}) == [0.5, 0.0]
    log = tmp_path / "logging.jsonl"
    log.write_text("".join(json.dumps({"iteration": i, "loss": 0.0, "reward": i / 10}) + "\n" for i in range(10)))
    assert reward_curve(str(log)) == {"steps": 10, "first_5_mean": 0.2, "last_5_mean": 0.7}


@pytest.fixture
def grpo_cli(tmp_path):
    from megatron_swift.model.tiny import tiny_hf_config
    from megatron_swift.template.tiny_tokenizer import make_tiny_tokenizer

    model = tmp_path / "model"
    make_tiny_tokenizer(str(model), "qwen3")
    tiny_hf_config("qwen3").save_pretrained(str(model))
    data = tmp_path / "math.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{i}+{i}?"}], "solution": str(2 * i)})
                            + "\n" for i in range(8)))
    base = ["rlhf", "--rlhf_type", "grpo", "--model", model, "--dataset", data, "--train_iters", "1",
            "--vllm_mode", "colocate", "--save", tmp_path / "out", "--max_length", "32",
            "--max_completion_length", "8"]

    def run(*extra):
        return megatron(*base, *extra, timeout=120)

    return run


@pytest.mark.parametrize("extra, names", [
    (["--reward_funcs", "accuracy", "--num_generations", "3", "--global_batch_size", "8"],
     ["--num_generations", "8 completions", "groups of 3", "--global_batch_size"]),
    (["--reward_funcs", "accuracy", "bogus", "--global_batch_size", "8"],
     ["--reward_funcs", "'bogus'", "accuracy, cosine, format, repetition, soft_overlong"]),
    (["--reward_funcs", "accuracy", "--global_batch_size", "8", "--external_plugins", "/no/such/plugin.py"],
     ["--external_plugins /no/such/plugin.py", "no such file"]),
    (["--global_batch_size", "8"], ["--reward_funcs is required"]),
    (["--reward_funcs", "accuracy", "--global_batch_size", "8", "--vllm_mode", "server"],
     ["--vllm_mode server", "--vllm_server_host", "megatron rollout"]),
    (["--reward_funcs", "accuracy", "--global_batch_size", "8", "--vllm_mode", "server", "--vllm_server_host",
      "a", "b"], ["one rollout server"]),
    (["--reward_funcs", "accuracy", "--global_batch_size", "8", "--vllm_mode", "server", "--vllm_server_host",
      "127.0.0.1", "--vllm_server_group_port", "51216"], ["--vllm_server_group_port", "HTTP"]),
    (["--reward_funcs", "accuracy", "--reward_weights", "1", "2", "--global_batch_size", "8"],
     ["--reward_weights", "2 weights for 1"]),
    (["--reward_funcs", "accuracy", "--global_batch_size", "8", "--generation_batch_size", "12"],
     ["--generation_batch_size (12)", "multiple of --global_batch_size (8)"]),
    (["--reward_funcs", "accuracy", "--global_batch_size", "8", "--kl_in_reward", "true", "--scale_rewards", "gdpo"],
     ["--kl_in_reward", "gdpo"]),
    (["--reward_funcs", "accuracy", "--global_batch_size", "8", "--loss_type", "cispo"], ["--epsilon_high"]),
])
def test_grpo_bad_input_refused_before_workers(grpo_cli, extra, names):
    proc = grpo_cli(*extra)
    assert proc.returncode == 2, proc.stderr[-2000:]
    for name in names:
        assert name in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
