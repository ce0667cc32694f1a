"""Never lose or silently overwrite a run: checkpoint discovery, save-dir safety, preemption,
divergence, damaged checkpoints and files, full disks, logs after a resume.

Oracles: the file system (checksums of what was on disk before and after), the uninterrupted run
(preempted and resumed runs must continue it exactly), and the messages, which must name the
argument / file / iteration and be printed before any worker starts where the problem is visible there.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers import MEGATRON, REPO, free_port, worker_env



def checksums(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from megatron_swift.demo import prepare

    return prepare(str(tmp_path_factory.mktemp("safety")))


def sft_cmd(demo, save, *extra):
    return [*MEGATRON, "sft", "--model", demo["model"], "--dataset", demo["dataset"], "--micro_batch_size", "2",
            "--global_batch_size", "4", "--lr", "1e-3", "--log_interval", "1", "--save", str(save),
            "--add_version", "false", "--split_dataset_ratio", "0", *map(str, extra)]


def run(cmd, nproc=1, timeout=600, **env):
    extra = {"NPROC_PER_NODE": nproc, "MASTER_PORT": free_port()} if nproc > 1 else {}
    return subprocess.run(cmd, env=worker_env(**extra, **env), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def losses(save) -> list:
    rows = [json.loads(line) for line in open(os.path.join(save, "logging.jsonl")) if '"loss"' in line]
    return [(r["iteration"], r["loss"]) for r in rows]


# ------------------------------------------------------------------- before workers start (fast)

def _args(demo, save, *extra):
    from megatron_swift.args import parse_args

    return parse_args("sft", sft_cmd(demo, save, "--train_iters", "4", *extra)[len(MEGATRON) + 1:], world_size=1)


def test_load_with_only_an_unfinished_save_is_refused(demo, tmp_path):
    """A kill during the first save leaves iter_0000003.tmp and no tracker: nothing to resume."""
    from megatron_swift.args import ArgumentError

    ck = tmp_path / "ck"
    (ck / "iter_0000003.tmp").mkdir(parents=True)
    with pytest.raises(ArgumentError) as info:
        _args(demo, ck, "--load", ck)
    assert "--load" in str(info.value) and "iter_0000003.tmp" in str(info.value)


def test_load_with_a_lost_tracker_uses_the_newest_complete_checkpoint(tmp_path):
    from megatron_swift.checkpoint import layout

    for i in (2, 4):
        (tmp_path / f"iter_{i:07d}").mkdir()
        (tmp_path / f"iter_{i:07d}" / "metadata.json").write_text("{}")
    (tmp_path / "iter_0000006.tmp").mkdir()
    ref = layout.resolve(str(tmp_path))
    assert ref.iteration == 4 and "newest complete" in ref.how
    (tmp_path / layout.TRACKER).write_text("6")  # a tracker that names a missing checkpoint
    with pytest.raises(layout.CheckpointError) as info:
        layout.resolve(str(tmp_path))
    assert "iter_0000006" in str(info.value) and "iter_0000004" in str(info.value)


def test_a_save_dir_holding_a_run_is_not_silently_retrained(demo, tmp_path):
    from megatron_swift.args import ArgumentError

    save = tmp_path / "run"
    (save / "iter_0000004").mkdir(parents=True)
    (save / "iter_0000004" / "metadata.json").write_text("{}")
    (save / "latest_checkpointed_iteration.txt").write_text("4")
    with pytest.raises(ArgumentError) as info:
        _args(demo, save)
    message = str(info.value)
    assert "--save" in message and "--load" in message and "--overwrite_output_dir" in message
    assert _args(demo, save, "--load", save).load == str(save)  # resuming it
    assert _args(demo, save, "--overwrite_output_dir", "true").overwrite_output_dir
    assert _args(demo, save, "--add_version", "true").add_version  # a new v<N> directory inside


def test_unwritable_save_dir_and_truncated_weights_are_named_early(demo, tmp_path):
    import shutil

    from megatron_swift.args import ArgumentError

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ArgumentError, match="--save"):
        _args(demo, blocker / "sub")
    model = tmp_path / "model"
    shutil.copytree(demo["model"], model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    from megatron_swift.args import parse_args

    with pytest.raises(ArgumentError) as info:
        parse_args("sft", ["--model", str(model), "--dataset", demo["dataset"], "--train_iters", "1"], world_size=1)
    assert "model.safetensors" in str(info.value) and "truncated" in str(info.value)


def test_a_full_disk_is_reported_before_writing(tmp_path, monkeypatch, megatron_world1):
    """The free-space check runs before a save writes anything; a disk that fills up during the write
    gives the same message (ENOSPC anywhere in the exception chain)."""
    import shutil

    from megatron_swift.trainer import checkpoint

    state = {"w": _sharded(1 << 20)}
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    with pytest.raises(checkpoint.StorageError) as info:
        checkpoint._check_free_space(str(tmp_path), state, str(tmp_path / "iter_0000001"))
    message = str(info.value)
    assert "no space left" in message and "iter_0000001" in message and "GiB" in message
    wrapped = RuntimeError("write failed")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert checkpoint._is_disk_full(wrapped) and not checkpoint._is_disk_full(RuntimeError("other"))


def _sharded(numel: int):
    import torch
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    return ShardedTensor.from_rank_offsets("w", torch.zeros(numel))


# ------------------------------------------------------------------------------ runs (slow)

@pytest.mark.slow
def test_divergence_stops_with_the_iteration_and_the_last_checkpoint(demo, tmp_path):
    save = tmp_path / "div"
    proc = run(sft_cmd(demo, save, "--train_iters", "40", "--lr", "1e3", "--save_interval", "1", "--clip_grad",
                       "0", "--no_save_optim", "true"))
    assert proc.returncode != 0
    assert "training diverged at iteration" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "iteration -1" not in proc.stderr
    line = next(line for line in proc.stderr.splitlines() if "training diverged" in line)
    iteration = int(line.split("training diverged at iteration ")[1].split(":")[0])
    latest = (save / "latest_checkpointed_iteration.txt").read_text()
    assert int(latest) == iteration - 1 and f"iter_{int(latest):07d}" in line


@pytest.mark.slow
def test_a_damaged_checkpoint_names_the_shard(demo, tmp_path):
    save = tmp_path / "ck"
    assert run(sft_cmd(demo, save, "--train_iters", "2", "--no_save_optim", "true")).returncode == 0
    shard = max((save / "iter_0000002").glob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    proc = run(sft_cmd(demo, save, "--train_iters", "4", "--load", save))
    assert proc.returncode != 0
    assert shard.name in proc.stderr and "truncated" in proc.stderr, proc.stderr[-3000:]
    assert "weights_only" not in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_preempted_run_saves_exits_zero_and_resumes_exactly(demo, tmp_path):
    """SIGTERM to `megatron sft` (2 processes): the current step finishes, the run saves and exits 0;
    a resume from the same --save continues the uninterrupted run exactly, logging each step once."""
    full = tmp_path / "full"
    assert run(sft_cmd(demo, full, "--train_iters", "12", "--save_interval", "1000",
                       "--tensor_model_parallel_size", "2"), nproc=2).returncode == 0
    save = tmp_path / "preempted"
    cmd = sft_cmd(demo, save, "--train_iters", "12", "--save_interval", "1000", "--exit_signal_handler", "true",
                  "--tensor_model_parallel_size", "2")
    proc = subprocess.Popen(cmd, env=worker_env(NPROC_PER_NODE=2, MASTER_PORT=free_port()), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (save / "logging.jsonl").is_file():
        time.sleep(0.2)
    while time.time() < deadline and len((save / "logging.jsonl").read_text().splitlines()) < 3:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # what SLURM / a scheduler sends the launcher
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    reason = json.loads((save / "exit_reason.json").read_text())
    stopped = int((save / "latest_checkpointed_iteration.txt").read_text())
    assert reason["reason"].startswith("signal") and reason["iteration"] == stopped and 3 <= stopped < 12
    resumed = run(sft_cmd(demo, save, "--train_iters", "12", "--save_interval", "1000", "--load", save,
                          "--tensor_model_parallel_size", "2"), nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = losses(save)
    assert [i for i, _ in got] == list(range(1, 13))  # each iteration once
    assert [loss for _, loss in got] == pytest.approx([loss for _, loss in losses(full)], abs=1e-5)


@pytest.mark.slow
def test_exit_interval_saves_and_leaves(demo, tmp_path):
    save = tmp_path / "slot"
    proc = run(sft_cmd(demo, save, "--train_iters", "10", "--exit_interval", "3", "--save_interval", "1000",
                       "--no_save_optim", "true"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "3"
    assert json.loads((save / "exit_reason.json").read_text())["reason"] == "exit_interval"


@pytest.mark.slow
def test_checkpoint_writer_processes_die_with_a_killed_trainer(demo, tmp_path):
    """megatron's checkpoint writer starts a helper process and forks writers on every save;
    SIGKILLing the trainer (OOM killer, preemption) must not leave any of them running
    (mcore_compat.writer_queue_dies_with_trainer, forked_children_die_with_trainer)."""
    save = tmp_path / "killed"
    proc = subprocess.Popen(sft_cmd(demo, save, "--train_iters", "200", "--save_interval", "1",
                                    "--no_save_optim", "true"),
                            env=worker_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline and not (save / "latest_checkpointed_iteration.txt").is_file():
        time.sleep(0.2)
    assert (save / "latest_checkpointed_iteration.txt").is_file()
    session = os.getsid(proc.pid)
    assert _session_members(session, exclude=proc.pid), "expected the checkpoint writer's helper process"
    proc.kill()
    proc.wait()
    deadline = time.time() + 5  # writers forked mid-save get SIGKILL at once; the tracker then sees EOF
    while time.time() < deadline and _session_members(session):
        time.sleep(0.2)
    alive = _session_members(session)
    described = [(p.pid, " ".join(p.cmdline())[:200]) for p in alive]
    for p in alive:  # do not leave them behind for the rest of the suite
        p.kill()
    assert not alive, f"helper processes outlived the trainer: {described}"


@pytest.mark.slow
def test_workers_die_with_a_killed_launcher(demo, tmp_path):
    """torchrun starts each worker in a session of its own: SIGKILLing `megatron sft` (the OOM
    killer, `kill -9`) must still end torchrun and every worker, not leave them training into the
    run directory or hanging in rendezvous (cli/launch.workers_die_with_launcher)."""
    import psutil

    save = tmp_path / "orphans"
    proc = subprocess.Popen(sft_cmd(demo, save, "--train_iters", "500", "--save_interval", "1000",
                                    "--tensor_model_parallel_size", "2"),
                            env=worker_env(NPROC_PER_NODE=2, MASTER_PORT=free_port()), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not ((save / "logging.jsonl").is_file() and (save / "logging.jsonl").stat().st_size):
        time.sleep(0.2)
    assert (save / "logging.jsonl").is_file(), "the run did not start training"
    family = psutil.Process(proc.pid).children(recursive=True)
    assert sum("megatron_swift.cli.main" in " ".join(p.cmdline()) for p in family) >= 2, "expected 2 workers"
    proc.kill()
    proc.wait()
    _, alive = psutil.wait_procs(family, timeout=10)
    described = [(p.pid, " ".join(p.cmdline())[:200]) for p in alive if p.is_running()]
    for p in alive:
        p.kill()
    assert not described, f"processes outlived the launcher: {described}"


def _session_members(session: int, exclude: int = -1) -> list:
    import psutil

    members = []
    for p in psutil.process_iter():
        try:
            if p.pid != exclude and _sid(p.pid) == session and p.status() != psutil.STATUS_ZOMBIE:
                members.append(p)
        except psutil.Error:
            continue
    return members


def _sid(pid: int):
    try:
        return os.getsid(pid)
    except OSError:
        return None
