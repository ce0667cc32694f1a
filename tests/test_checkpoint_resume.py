"""Checkpoints: atomic saves, exact resume after SIGKILL, reload at another parallel layout.

Oracle: the same run without interruption (same data per step, same seeds). Losses of a resumed
run must equal the uninterrupted run's exactly in one process, and within fp32 reduction noise
(1e-5) when the checkpoint is reloaded at a different layout.
"""

from __future__ import annotations

import json
import sys

import pytest

from helpers import TESTS, python_script, run_killable, torchrun, torchrun_cmd

WORKER = TESTS / "parallel" / "train_worker.py"
pytestmark = pytest.mark.slow


def losses(out) -> dict:
    return json.loads((out / "losses.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    python_script(WORKER, ["--out", out, "--iters", "6"])
    return losses(out)["losses"]


def test_resume_after_sigkill_continues_the_loss_trajectory_exactly(tmp_path, uninterrupted):
    ck = tmp_path / "ck"
    code = run_killable([sys.executable, str(WORKER), "--out", tmp_path / "killed", "--iters", "6",
                         "--save", ck, "--save_interval", "3", "--kill_after_iteration", "3"])
    assert code == -9, run_killable.last_output
    assert (ck / "latest_checkpointed_iteration.txt").read_text() == "3"
    python_script(WORKER, ["--out", tmp_path / "resumed", "--iters", "6", "--load", ck])
    resumed = losses(tmp_path / "resumed")
    assert resumed["start"] == 3
    assert resumed["losses"] == uninterrupted[3:]


def test_kill_during_save_leaves_previous_checkpoint_loadable(tmp_path, uninterrupted):
    ck = tmp_path / "ck"
    code = run_killable([sys.executable, str(WORKER), "--out", tmp_path / "killed", "--iters", "6",
                         "--save", ck, "--save_interval", "3", "--kill_during_save_iteration", "6"])
    assert code == -9, run_killable.last_output
    assert (ck / "latest_checkpointed_iteration.txt").read_text() == "3"
    assert (ck / "iter_0000006.tmp").is_dir() and not (ck / "iter_0000006").exists()
    python_script(WORKER, ["--out", tmp_path / "resumed", "--iters", "6", "--load", ck, "--save", ck,
                           "--save_interval", "3"])
    assert losses(tmp_path / "resumed")["losses"] == uninterrupted[3:]
    assert (ck / "latest_checkpointed_iteration.txt").read_text() == "6"
    assert (ck / "iter_0000006").is_dir() and not (ck / "iter_0000006.tmp").exists()


def test_distributed_optimizer_checkpoint_reloads_at_another_layout(tmp_path, uninterrupted):
    """Saved at TP=2 (distributed optimizer), resumed at TP=1 x DP=2 and at TP=2."""
    ck = tmp_path / "ck"
    code = run_killable(torchrun_cmd(WORKER, 2, ["--out", tmp_path / "killed", "--iters", "6", "--tp", "2",
                                                 "--distributed_optimizer", "--save", ck, "--save_interval", "3",
                                                 "--kill_after_iteration", "3"]))
    assert code != 0 and (ck / "latest_checkpointed_iteration.txt").read_text() == "3", run_killable.last_output
    for name, layout in (("dp2", []), ("tp2", ["--tp", "2"])):
        torchrun(WORKER, 2, ["--out", tmp_path / name, "--iters", "6", "--distributed_optimizer", "--load", ck,
                             *layout])
        resumed = losses(tmp_path / name)
        assert resumed["start"] == 3
        assert resumed["losses"] == pytest.approx(uninterrupted[3:], abs=1e-5), name
