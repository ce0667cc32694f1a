"""Relaunch under ``torch.distributed.run`` when ``NPROC_PER_NODE`` or ``NNODES`` is set.

The launcher process validates the arguments first (world size = NPROC_PER_NODE x NNODES), then
runs ``python -m torch.distributed.run ... -m megatron_swift.cli.main <cmd> <argv>`` and returns
its exit code. torchrun itself exits 1 whenever a worker fails; so that ``megatron`` keeps the
worker's own exit code (e.g. 2 for an argument error), each worker records its code in the
directory named by ``MEGATRON_SWIFT_EXIT_CODE_DIR`` and the launcher returns the first non-zero
one. Stdlib only: torch is imported by the workers, never here.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from typing import List, Mapping, Optional

from megatron_swift.args.dist_env import (DEFAULT_MASTER_ADDR, DEFAULT_MASTER_PORT, env_int, is_torchrun_worker,
                                          nproc_per_node, relaunch_requested, world_size_from_env)
from megatron_swift.args.errors import ArgumentError

EXIT_CODE_DIR_ENV = "MEGATRON_SWIFT_EXIT_CODE_DIR"
LAUNCHER_PID_ENV = "MEGATRON_SWIFT_LAUNCHER_PID"

__all__ = ["build_torchrun_command", "relaunch", "record_exit_code", "read_worker_exit_code",
           "relaunch_requested", "is_torchrun_worker", "world_size_from_env", "EXIT_CODE_DIR_ENV"]


def build_torchrun_command(command: str, argv: List[str], env: Optional[Mapping[str, str]] = None,
                           python: Optional[str] = None) -> List[str]:
    """The torchrun command line that re-runs ``megatron <command> <argv>`` (pure; reads only ``env``).

    ``NPROC_PER_NODE`` (default: GPUs on this node, else 1), ``NNODES`` (1), ``NODE_RANK`` (0),
    ``MASTER_ADDR`` (127.0.0.1), ``MASTER_PORT`` (29500).
    """
    env = os.environ if env is None else env
    nnodes = env_int(env, "NNODES", 1)
    node_rank = env_int(env, "NODE_RANK", 0, minimum=0)
    if node_rank >= nnodes:
        raise ArgumentError(f"environment variable NODE_RANK: {node_rank} must be smaller than NNODES ({nnodes})")
    port = env_int(env, "MASTER_PORT", DEFAULT_MASTER_PORT)
    if port > 65535:
        raise ArgumentError(f"environment variable MASTER_PORT: {port} is not a port number")
    addr = (env.get("MASTER_ADDR") or "").strip() or DEFAULT_MASTER_ADDR
    return [python or sys.executable, "-m", "torch.distributed.run",
            "--nproc_per_node", str(nproc_per_node(env)),
            "--nnodes", str(nnodes),
            "--node_rank", str(node_rank),
            "--master_addr", addr,
            "--master_port", str(port),
            "-m", "megatron_swift.cli.main", command, *argv]


def read_worker_exit_code(directory: str) -> Optional[int]:
    """First non-zero exit code recorded by a worker (lowest local rank), or None."""
    codes = []
    for name in os.listdir(directory):
        if not name.startswith("local_rank_"):
            continue
        try:
            rank = int(name[len("local_rank_"):])
            with open(os.path.join(directory, name), encoding="utf-8") as fh:
                codes.append((rank, int(fh.read().strip())))
        except (ValueError, OSError):
            continue
    for _, code in sorted(codes):
        if code != 0:
            return code
    return None


def record_exit_code(code: int, env: Optional[Mapping[str, str]] = None, wait_s: float = 5.0) -> None:
    """Inside a relaunched worker: leave ``code`` for the launcher (no-op elsewhere).

    On a non-zero code, wait up to ``wait_s`` seconds for the other local workers to record theirs:
    torchrun terminates the remaining workers as soon as one fails, so without the wait an error
    that every rank hits (a bad argument, a command that is not built) would be reported by
    whichever rank happened to be first.
    """
    env = os.environ if env is None else env
    directory = env.get(EXIT_CODE_DIR_ENV)
    if not directory or not is_torchrun_worker(env) or not os.path.isdir(directory):
        return
    try:
        with open(os.path.join(directory, f"local_rank_{env.get('LOCAL_RANK', '0')}"), "w", encoding="utf-8") as fh:
            fh.write(str(int(code)))
    except OSError:
        return
    try:
        local_world = int(env.get("LOCAL_WORLD_SIZE", "1"))
    except ValueError:
        local_world = 1
    deadline = time.monotonic() + wait_s
    while code != 0 and local_world > 1 and time.monotonic() < deadline:
        try:
            done = sum(name.startswith("local_rank_") for name in os.listdir(directory))
        except OSError:
            return
        if done >= local_world:
            return
        time.sleep(0.05)


def runtime_environment(args, gpu: bool) -> dict:
    """Environment variables the workers need, set before CUDA or Transformer Engine start (values the
    user already set win): megatron-core orders its communication kernels by launching them on one
    CUDA connection (``CUDA_DEVICE_MAX_CONNECTIONS=1``; it warns, or TP overlap fails, without it);
    ``--deterministic_mode`` also needs Transformer Engine to refuse non-deterministic attention."""
    out = {}
    if gpu:
        out["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
    if getattr(args, "deterministic_mode", False):
        out["NVTE_ALLOW_NONDETERMINISTIC_ALGO"] = "0"
    return out


def apply_runtime_environment(args, env=None) -> dict:
    """Sets ``runtime_environment`` in ``env`` (default os.environ) where unset; returns what it set."""
    from megatron_swift.args.capabilities import Capabilities

    env = os.environ if env is None else env
    added = {k: v for k, v in runtime_environment(args, Capabilities.detect(env).gpu).items() if k not in env}
    env.update(added)
    return added


FORWARDED_SIGNALS = ("SIGTERM", "SIGUSR1")


def _forward_to_workers(proc: subprocess.Popen):
    """A scheduler's SIGTERM / SIGUSR1 (preemption, ``srun --signal``) reaches the launcher; the
    workers get it (``--exit_signal_handler``: they finish the step, save and exit 0), torchrun itself
    does not (it would tear the workers down)."""
    def handler(signum, frame):
        try:
            import psutil

            # torchrun's own children are the workers (their helpers, e.g. checkpoint writers, are not)
            workers = psutil.Process(proc.pid).children(recursive=False)
        except Exception:  # psutil missing or torchrun gone: fall back to signalling torchrun
            workers = []
        for worker in workers:
            try:
                worker.send_signal(signum)
            except Exception:
                pass
        if not workers:
            proc.send_signal(signum)

    return handler


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when the thread that started it ends (PR_SET_PDEATHSIG)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def workers_die_with_launcher(env: Mapping[str, str]) -> None:
    """In a worker torchrun started for this launcher: die with torchrun's agent.

    torchrun starts each worker in a session of its own, so killing the launcher's process group
    (or the launcher and torchrun, e.g. by the OOM killer) would leave the workers training and
    saving into a run nobody owns, or hanging in rendezvous. torchrun gets the same request from
    the launcher (``relaunch``). Only for our own relaunch: a user's ``megatron sft ... &`` from a
    script that exits must not take the job with it."""
    if "TORCHELASTIC_RUN_ID" not in env or LAUNCHER_PID_ENV not in env or not sys.platform.startswith("linux"):
        return
    die_with_parent()
    try:  # the launcher already gone before prctl ran
        os.kill(int(env[LAUNCHER_PID_ENV]), 0)
    except (OSError, ValueError):
        os._exit(1)


def relaunch(command: str, argv: List[str], env: Optional[Mapping[str, str]] = None) -> int:
    """Run ``megatron <command> <argv>`` under torchrun and return its (worker's) exit code."""
    import signal

    env = dict(os.environ if env is None else env)
    cmd = build_torchrun_command(command, argv, env)
    with tempfile.TemporaryDirectory(prefix="megatron-swift-rc-") as directory:
        env[EXIT_CODE_DIR_ENV] = directory
        env[LAUNCHER_PID_ENV] = str(os.getpid())
        linux = sys.platform.startswith("linux")
        # torchrun (and, through workers_die_with_launcher, its workers) die with this launcher
        proc = subprocess.Popen(cmd, env=env, preexec_fn=die_with_parent if linux else None)
        previous = {}
        for name in FORWARDED_SIGNALS:
            sig = getattr(signal, name)
            previous[sig] = signal.signal(sig, _forward_to_workers(proc))
        try:
            rc = proc.wait()
        except KeyboardInterrupt:
            proc.wait()
            return 130
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if rc != 0:
            worker_rc = read_worker_exit_code(directory)
            if worker_rc is not None:
                return worker_rc
            if _all_workers_succeeded(directory, nproc_per_node(env)):
                return 0  # torchrun itself was signalled (a scheduler's SIGTERM) after the workers saved
    return rc


def _all_workers_succeeded(directory: str, nproc: int) -> bool:
    codes = [n for n in os.listdir(directory) if n.startswith("local_rank_")]
    return len(codes) == nproc and read_worker_exit_code(directory) is None
