"""The streaming mcore -> HF export that feeds rollout engines (``converters.api.iter_hf_weights``).

Oracle: the HF checkpoint the mcore model was loaded from (transformers' save_pretrained files): every
rank must receive every tensor, bit-exact, at TP / PP / EP layouts (2-process gloo jobs); the shard
writer (``save_mcore_as_hf``) is the same generator and is covered by tests/test_convert.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import TESTS, torchrun
from test_convert import hf_tensors, save_tiny


def _loaded(hf_dir):
    from megatron_swift.converters.api import load_hf_into_mcore
    from megatron_swift.converters.mcore_io import build_chunks
    from megatron_swift.model import load_hf_config

    hf_config = load_hf_config(hf_dir)
    chunks, config, settings = build_chunks(hf_config, {"perform_initialization": False})
    load_hf_into_mcore(chunks, hf_dir, config, settings)
    return chunks, config, settings


@pytest.mark.parametrize("family, overrides", [("qwen3", {}), ("qwen3", {"tie_word_embeddings": True}),
                                               ("qwen3_moe", {})])
def test_every_tensor_streams_bit_exact(family, overrides, tmp_path, megatron_world1):
    from megatron_swift.converters.api import iter_hf_weights

    hf_dir = save_tiny(family, tmp_path / "hf", **overrides)
    chunks, config, settings = _loaded(hf_dir)
    want = hf_tensors(hf_dir)
    for everywhere in (False, True):
        got = list(iter_hf_weights(chunks, config, settings, everywhere=everywhere, group_bytes=20_000))
        assert len({k for k, _ in got}) == len(got), "a tensor came twice"
        assert sorted(k for k, _ in got) == sorted(want)  # a tied lm_head is neither saved nor streamed
        for key, tensor in got:
            assert tensor.dtype == want[key].dtype and torch.equal(tensor, want[key]), key
    halves = dict(iter_hf_weights(chunks, config, settings, dtype=torch.bfloat16))
    assert all(t.dtype == torch.bfloat16 and torch.equal(t, want[k].bfloat16()) for k, t in halves.items())


@pytest.mark.slow  # one 2-process gloo job, three layouts
def test_every_rank_gets_every_tensor(tmp_path):
    dense, moe = save_tiny("qwen3", tmp_path / "dense", seed=4), save_tiny("qwen3_moe", tmp_path / "moe", seed=4)
    plan = [{"hf": dense, "layout": {"tp": 2}}, {"hf": dense, "layout": {"pp": 2}}, {"hf": moe, "layout": {"ep": 2}}]
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    out = tmp_path / "out"
    out.mkdir()
    torchrun(TESTS / "parallel" / "export_iter_worker.py", 2, [tmp_path / "plan.json", out], timeout=300)
    for i, step in enumerate(plan):
        want = sorted(hf_tensors(step["hf"]))
        ranks = [json.loads((out / f"step{i}_rank{r}.json").read_text()) for r in range(2)]
        for r, result in enumerate(ranks):
            assert result["keys"] == want and result["mismatched"] == [], (step, r, result["mismatched"])
        # the default iteration (the file writer's) hands each tensor to exactly one rank
        assert sorted(ranks[0]["first_rank_only"] + ranks[1]["first_rank_only"]) == want, step
        if "pp" in step["layout"]:
            assert ranks[0]["first_rank_only"] and ranks[1]["first_rank_only"]  # each stage writes its own
        else:
            assert ranks[1]["first_rank_only"] == [], step


def test_sync_weights_hands_the_whole_model_to_the_engine(tmp_path, megatron_world1):
    from megatron_swift.rollout.weight_sync import sync_weights

    class Recorder:  # an engine that keeps what it is given
        def update_weights(self, weights):
            self.got = {k: t.clone() for k, t in weights}
            return 1.5

    hf_dir = save_tiny("qwen3", tmp_path / "hf")
    chunks, config, settings = _loaded(hf_dir)
    engine = Recorder()
    assert sync_weights(engine, chunks, config, settings, dtype=torch.bfloat16) == 1.5
    want = hf_tensors(hf_dir)
    assert sorted(engine.got) == sorted(want)
    assert all(torch.equal(t, want[k].bfloat16()) for k, t in engine.got.items())
    assert sync_weights(None, chunks, config, settings) == 0.0
