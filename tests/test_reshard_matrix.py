"""Checkpoints resumed at another parallel layout through `megatron sft` (CI subset).

Oracle: the uninterrupted single-process run. A run at layout A saves after step 2 of 4; a run at
layout B resumes it; steps 3-4 must equal the uninterrupted run within 1e-5 relative. The full
matrix is scripts/reshard_matrix.py (table in docs/layouts.md). The MoE cases failed before with a
KeyError over every optimizer key (EP > 1 built a chained optimizer, EP = 1 a single one).
"""

from __future__ import annotations

import os
import shutil
import sys

import pytest

from helpers import REPO

pytestmark = pytest.mark.slow

sys.path.insert(0, str(REPO / "scripts"))
import reshard_matrix  # noqa: E402  (scripts/reshard_matrix.py: the matrix this test runs a subset of)


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    return reshard_matrix.Reshard(str(tmp_path_factory.mktemp("reshard")))


@pytest.mark.parametrize("model,saved_at,resumed_at,opt", reshard_matrix.CI_PAIRS,
                         ids=[f"{m}-{a}-to-{b}{'-plain' if o else ''}" for m, a, b, o in reshard_matrix.CI_PAIRS])
def test_resume_at_another_layout_continues_the_run(matrix, model, saved_at, resumed_at, opt):
    result = matrix.pair(model, saved_at, resumed_at, opt)
    assert len(result["losses"]) == 2
    assert result["ok"], result


def test_switching_the_distributed_optimizer_is_a_clear_error(matrix, tmp_path):
    """The distributed and the plain optimizer store different state: a resume that switches is refused
    with both ways out named (before workers start when <load>/args.json says how it was saved)."""
    source = matrix._train("moe", reshard_matrix.ONE, ())
    runner = reshard_matrix.layout_matrix
    with pytest.raises(RuntimeError) as info:  # args.json present: refused by the argument check
        runner.run_sft(matrix.paths, "moe", "padding_free", 1, 2, reshard_matrix.STEPS + (
            "--use_distributed_optimizer", "false", "--load", source["save"]), str(tmp_path / "a"))
    message = str(info.value)
    assert "megatron sft: error: argument --use_distributed_optimizer false" in message
    assert "--no_load_optim true" in message and "Traceback" not in message
    load = tmp_path / "load"  # only the iteration dir: found when the worker reads the checkpoint
    shutil.copytree(os.path.join(source["save"], "iter_0000004"), load / "iter_0000004")
    (load / "latest_checkpointed_iteration.txt").write_text("4")
    with pytest.raises(RuntimeError) as info:
        runner.run_sft(matrix.paths, "moe", "padding_free", 1, 2, reshard_matrix.STEPS + (
            "--use_distributed_optimizer", "false", "--load", str(load)), str(tmp_path / "b"))
    assert "distributed optimizer" in str(info.value) and "--no_load_optim true" in str(info.value)


def test_overlapped_param_gather_saves_the_updated_weights(matrix):
    """With --overlap_param_gather a rank's optimizer updates only its shard; the rest arrive in the
    next forward. A save in between must still hold the updated weights: the HF copy of the step-2
    checkpoint equals the single process's. (A resume hides stale weights, because the distributed
    optimizer's saved fp32 params overwrite them; the HF copy and --no_save_optim do not.)"""
    from safetensors.torch import load_file

    opt = ("--save_safetensors", "true", "--log_params_norm", "false")  # the norm would gather first
    single = matrix._train("dense", reshard_matrix.ONE, opt)
    overlapped = matrix._train("dense", reshard_matrix.SETUPS["dp2_overlap"], opt)
    for step in ("iter_0000002", "iter_0000004"):
        files = sorted(f for f in os.listdir(os.path.join(single["save"], step, "hf")) if f.endswith(".safetensors"))
        assert files
        for name in files:
            expected = load_file(os.path.join(single["save"], step, "hf", name))
            actual = load_file(os.path.join(overlapped["save"], step, "hf", name))
            assert expected.keys() == actual.keys()
            for key in expected:
                diff = (actual[key] - expected[key]).abs().max().item()
                scale = expected[key].abs().max().item()
                assert diff <= 1e-5 * max(scale, 1.0), (step, key, diff)
