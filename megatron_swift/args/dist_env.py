"""Launch environment variables -> relaunch decision and world size (stdlib only).

``NPROC_PER_NODE`` / ``NNODES`` ask for a torchrun relaunch unless this process already is a
torchrun worker (``TORCHELASTIC_RUN_ID`` or ``LOCAL_RANK`` set). The world size used for
validation is ``WORLD_SIZE`` inside a worker, ``NPROC_PER_NODE * NNODES`` before a relaunch,
and 1 otherwise.
"""
from __future__ import annotations

import glob
import os
import re
from typing import Mapping

from megatron_swift.args.errors import ArgumentError

DEFAULT_MASTER_ADDR = "127.0.0.1"
DEFAULT_MASTER_PORT = 29500


def _get(env: Mapping[str, str], key: str):
    value = env.get(key)
    if value is None or value.strip() == "":
        return None
    return value.strip()


def env_int(env: Mapping[str, str], key: str, default: int, minimum: int = 1) -> int:
    value = _get(env, key)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        raise ArgumentError(f"environment variable {key}: expected an integer, got {value!r}") from None
    if number < minimum:
        raise ArgumentError(f"environment variable {key}: must be >= {minimum}, got {number}")
    return number


def is_torchrun_worker(env: Mapping[str, str]) -> bool:
    return "TORCHELASTIC_RUN_ID" in env or "LOCAL_RANK" in env


def relaunch_requested(env: Mapping[str, str]) -> bool:
    """True when NPROC_PER_NODE or NNODES is set and we are not a torchrun worker yet."""
    if is_torchrun_worker(env):
        return False
    return _get(env, "NPROC_PER_NODE") is not None or _get(env, "NNODES") is not None


def local_device_count(env: Mapping[str, str]) -> int:
    """GPUs on this node without importing torch: CUDA_VISIBLE_DEVICES, else /dev/nvidiaN, else 1."""
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [v for v in visible.split(",") if v.strip() and v.strip() != "-1"]
        return max(len(ids), 1)
    devices = [p for p in glob.glob("/dev/nvidia*") if re.fullmatch(r"/dev/nvidia\d+", p)]
    return max(len(devices), 1)


def nproc_per_node(env: Mapping[str, str]) -> int:
    return env_int(env, "NPROC_PER_NODE", local_device_count(env))


def world_size_from_env(env: Mapping[str, str] = None) -> int:
    env = os.environ if env is None else env
    if is_torchrun_worker(env):
        return env_int(env, "WORLD_SIZE", 1)
    if relaunch_requested(env):
        return nproc_per_node(env) * env_int(env, "NNODES", 1)
    return 1
