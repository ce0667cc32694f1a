"""``megatron rollout`` (megatron_swift/rollout/server.py) and its client (server_client.py).

Oracle: the colocated engine in this process (same model, same seed, same weights) and transformers'
log-probs. The server runs as users start it (the CLI, its own process, loopback HTTP).
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import time

import pytest
import torch
from helpers import MEGATRON, REPO, free_port, megatron, worker_env

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM is not installed (pip install -e .[rollout-cpu])")


def test_an_absent_server_is_an_error_naming_it_not_a_hang():
    from megatron_swift.rollout.server_client import RolloutServerError, VLLMServerEngine

    port = free_port()
    started = time.monotonic()
    with pytest.raises(RolloutServerError, match=rf"127.0.0.1:{port}/health/.*--vllm_server_timeout 2s"):
        VLLMServerEngine(host="127.0.0.1", port=port, timeout=2)
    assert time.monotonic() - started < 10
    with pytest.raises(ValueError, match="--vllm_server_host or --vllm_server_base_url"):
        VLLMServerEngine()


def test_rollout_arguments_are_checked_before_anything_loads(tmp_path):
    proc = megatron("rollout", "--port", "8000")
    assert proc.returncode == 2 and "--model is required" in proc.stderr, proc.stderr
    proc = megatron("rollout", "--model", str(tmp_path))
    assert proc.returncode == 2 and "no config.json" in proc.stderr, proc.stderr
    (tmp_path / "config.json").write_text("{}")
    proc = megatron("rollout", "--model", str(tmp_path), "--vllm_tensor_parallel_size", "2")
    assert proc.returncode == 2 and "--vllm_tensor_parallel_size 2" in proc.stderr, proc.stderr
    proc = megatron("rollout", "--model", str(tmp_path), "--port", "70000")
    assert proc.returncode == 2 and "--port" in proc.stderr, proc.stderr
    assert "--vllm_max_model_len" in megatron("rollout", "--help").stdout


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``megatron rollout`` on a tiny Qwen3 (fp32), and a client connected to it."""
    from megatron_swift.demo import prepare_model
    from megatron_swift.rollout.server_client import VLLMServerEngine

    model_dir = prepare_model(str(tmp_path_factory.mktemp("server") / "qwen3"), "qwen3", seed=3)
    port = free_port()
    log = open(tmp_path_factory.mktemp("server_log") / "server.log", "w+")
    proc = subprocess.Popen([*MEGATRON, "rollout", "--model", model_dir, "--port", str(port), "--seed", "0",
                             "--torch_dtype", "float32", "--vllm_max_model_len", "128", "--vllm_max_num_seqs", "8"],
                            env=worker_env(), cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        client = VLLMServerEngine(port=port, host="127.0.0.1", timeout=400)
        yield model_dir, client
    except Exception:
        log.seek(0)
        raise AssertionError("the rollout server did not come up:\n" + log.read()[-6000:])
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@needs_vllm
@pytest.mark.slow  # the server is a second process
def test_server_generates_and_syncs_like_the_colocated_engine(server, megatron_world1):
    from megatron_swift.converters.api import iter_hf_weights, load_hf_into_mcore
    from megatron_swift.converters.mcore_io import build_chunks
    from megatron_swift.model import load_hf_config
    from megatron_swift.rollout.engine import SamplingSettings
    from megatron_swift.rollout.vllm_colocate import VLLMColocateEngine
    from test_rollout_vllm import hf_logprobs, hf_model, perturb

    model_dir, client = server
    local = VLLMColocateEngine(model_dir, max_model_len=128, dtype="float32", seed=0, max_num_seqs=8)
    try:
        prompts = [[11, 12, 13], [400, 2, 9, 87, 150, 6, 33]]
        sampling = SamplingSettings(max_tokens=10, temperature=0.8, seed=3, stop_token_ids=(7,))

        def same(a, b):
            assert [c.token_ids for c in a] == [c.token_ids for c in b]
            assert [c.finish_reason for c in a] == [c.finish_reason for c in b]
            for x, y in zip(a, b):
                torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-5, rtol=0)

        before = client.generate(prompts, sampling, n=2)
        same(before, local.generate(prompts, sampling, n=2))
        hf_config = load_hf_config(model_dir)
        chunks, config, settings = build_chunks(hf_config, {"perform_initialization": False})
        load_hf_into_mcore(chunks, model_dir, config, settings)
        perturb(chunks, seed=7)
        weights = list(iter_hf_weights(chunks, config, settings, everywhere=True))
        client.bucket_bytes = 100_000  # several buckets
        assert client.update_weights(iter(weights)) > 0
        local.update_weights(iter(weights))
        after = client.generate(prompts, sampling, n=2)
        same(after, local.generate(prompts, sampling, n=2))
        assert [c.token_ids for c in after] != [c.token_ids for c in before]
        tiny = (model_dir, hf_config)
        model = hf_model(tiny, weights)
        for c in after:
            want = hf_logprobs(tiny, None, c.prompt_ids + c.token_ids, 0.8, model)[len(c.prompt_ids) - 1:]
            torch.testing.assert_close(torch.tensor(c.logprobs), want, atol=1e-4, rtol=0)
    finally:
        local.close()
    # vLLM's own shutdown destroys the default process group: the trainer's must survive close()
    assert torch.distributed.is_initialized() and torch.distributed.get_world_size() == 1


def test_colocate_settings_not_built_are_refused_before_vllm_starts(tmp_path):
    from megatron_swift.rollout.vllm_colocate import RolloutConfigError, VLLMColocateEngine

    with pytest.raises(RolloutConfigError, match="--vllm_tensor_parallel_size 2"):
        VLLMColocateEngine(str(tmp_path), tensor_parallel_size=2)
    with pytest.raises(RolloutConfigError, match="--sleep_level 1: vLLM's sleep mode is CUDA-only"):
        VLLMColocateEngine(str(tmp_path), sleep_level=1)  # this suite runs on the CPU (conftest.py)
    with pytest.raises(RolloutConfigError, match="--vllm_gpu_memory_utilization 0"):
        VLLMColocateEngine(str(tmp_path), gpu_memory_utilization=0)
