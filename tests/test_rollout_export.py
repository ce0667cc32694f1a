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


@pytest.mark.slow  # three 2-process gloo jobs
@pytest.mark.parametrize("family, layout", [("qwen3", {"tp": 2}), ("qwen3", {"pp": 2}), ("qwen3_moe", {"ep": 2})])
def test_every_rank_gets_every_tensor(family, layout, tmp_path):
    hf_dir = save_tiny(family, tmp_path / "hf", seed=4)
    out = tmp_path / "out"
    out.mkdir()
    torchrun(TESTS / "parallel" / "export_iter_worker.py", 2, [hf_dir, json.dumps(layout), out], timeout=300)
    want = sorted(hf_tensors(hf_dir))
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for r, result in enumerate(ranks):
        assert result["keys"] == want and result["mismatched"] == [], (r, result["mismatched"])
    # the default iteration (the file writer's) hands each tensor to exactly one rank
    firsts = ranks[0]["first_rank_only"] + ranks[1]["first_rank_only"]
    assert sorted(firsts) == want
    if "pp" in layout:
        assert ranks[0]["first_rank_only"] and ranks[1]["first_rank_only"]  # each stage writes its own
    else:
        assert ranks[1]["first_rank_only"] == []
