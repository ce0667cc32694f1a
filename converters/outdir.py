"""Atomic output directories for multi-rank writers.

Rank 0 creates a temporary directory next to the target (same filesystem), every rank writes
into it, and only when all of them are done is it renamed into place. A conversion that fails
half-way leaves no half-written model behind, and an existing output is only replaced
(``exist_ok``) once the new one is complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

import torch.distributed as dist


def _world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _broadcast(obj):
    rank, world = _world()
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_output_dir(out_dir: str, exist_ok: bool) -> str:
    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise ValueError(f"output directory {out_dir} exists and is not a directory")
        if not exist_ok:
            raise ValueError(f"output directory {out_dir} already exists (pass --exist_ok true to overwrite it)")
    return out_dir


@contextlib.contextmanager
def atomic_output_dir(out_dir: str, exist_ok: bool = False):
    """Yields a temporary directory (the same path on every rank) that becomes ``out_dir``."""
    rank, world = _world()
    result = None
    if rank == 0:
        try:
            target = check_output_dir(out_dir, exist_ok)
            parent = os.path.dirname(target)
            os.makedirs(parent, exist_ok=True)
            tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=parent)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)
            result = ("ok", target, tmp)
        except (OSError, ValueError) as e:
            result = ("error", type(e).__name__, str(e))
    result = _broadcast(result)
    if result[0] == "error":
        raise {"ValueError": ValueError, "FileNotFoundError": FileNotFoundError}.get(result[1], OSError)(result[2])
    _, target, tmp = result
    try:
        yield tmp
        if world > 1:
            dist.barrier()
        if rank == 0:
            old = None
            if os.path.exists(target):
                old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-", dir=os.path.dirname(target))
                os.rename(target, os.path.join(old, "previous"))
            os.rename(tmp, target)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        if world > 1:
            dist.barrier()
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
