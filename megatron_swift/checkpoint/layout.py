"""Megatron-LM's checkpoint directory layout, and which checkpoint a directory means (stdlib only).

::

    <root>/latest_checkpointed_iteration.txt   "release" or the iteration number
    <root>/iter_0000100/                       a torch_dist checkpoint: metadata.json, .metadata,
                                               __*.distcp, common.pt (and hf/ with --save_safetensors)
    <root>/release/                            what `megatron export --to_mcore` writes
    <root>/args.json                           the run (or conversion) that wrote it
    <root>/iter_0000100.tmp/                   a save in progress (or killed): never counts

Resolution rule (``resolve``): a directory that is itself a checkpoint is that checkpoint; otherwise
the tracker file names it, and it must be complete (a directory with ``metadata.json``); without a
tracker (a kill before the first save published it, or a file lost), the newest complete
``iter_*`` is used and the reason is reported. A tracker naming a missing or incomplete directory
is an error that names both it and the newest complete one.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Optional, Union

TRACKER = "latest_checkpointed_iteration.txt"
RELEASE = "release"
ARGS_FILE = "args.json"
_ITER_RE = re.compile(r"^iter_(\d{7,})$")
COMPLETE_MARKER = "metadata.json"  # written by dist-checkpointing when a save finishes


class CheckpointError(ValueError):
    """A directory that should hold a checkpoint does not (or its tracker lies)."""


@dataclass(frozen=True)
class CheckpointRef:
    root: str
    directory: str  # the iteration (or release) directory
    iteration: Union[int, str]  # an int, or "release"
    how: str  # why this one: "tracker", "the directory itself", "newest complete (no tracker)"


def iteration_dirname(iteration: Union[int, str]) -> str:
    return RELEASE if iteration == RELEASE else f"iter_{int(iteration):07d}"


def _complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETE_MARKER))


def read_tracker(root: str) -> Optional[str]:
    """What ``latest_checkpointed_iteration.txt`` says ("release" or digits); None when absent or
    empty. Raises CheckpointError for anything else."""
    path = os.path.join(root, TRACKER)
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            value = f.read().strip()
    except FileNotFoundError:
        return None
    if not value:
        return None
    if value != RELEASE and not value.isdigit():
        raise CheckpointError(f"{path}: expected an iteration number or 'release', got {value[:40]!r}")
    return value


def complete_iterations(root: str) -> list:
    """Iterations (ints) with a complete ``iter_XXXXXXX`` directory, oldest first (``.tmp`` never counts)."""
    try:
        entries = os.listdir(root)
    except OSError:
        return []
    out = []
    for entry in entries:
        match = _ITER_RE.match(entry)
        if match and _complete(os.path.join(root, entry)):
            out.append(int(match.group(1)))
    return sorted(out)


def resolve(root: str) -> Optional[CheckpointRef]:
    """The checkpoint ``root`` means (module docstring), or None when it holds none."""
    root = os.path.abspath(os.path.expanduser(root))
    if _complete(root):
        name = os.path.basename(root)
        match = _ITER_RE.match(name)
        return CheckpointRef(os.path.dirname(root), root, int(match.group(1)) if match else RELEASE,
                             "the directory itself")
    tracked = read_tracker(root)
    complete = complete_iterations(root)
    newest = f"; the newest complete checkpoint is {iteration_dirname(complete[-1])}" if complete else ""
    if tracked is not None:
        directory = os.path.join(root, iteration_dirname(tracked))
        if not os.path.isdir(directory):
            raise CheckpointError(f"{os.path.join(root, TRACKER)} names {tracked!r} but {directory} does not exist"
                                  f"{newest} (edit the file to resume from it)")
        if not _complete(directory):
            raise CheckpointError(f"{os.path.join(root, TRACKER)} names {tracked!r} but {directory} is incomplete "
                                  f"(no {COMPLETE_MARKER}){newest}")
        return CheckpointRef(root, directory, tracked if tracked == RELEASE else int(tracked), "tracker")
    if os.path.isdir(os.path.join(root, RELEASE)) and _complete(os.path.join(root, RELEASE)):
        return CheckpointRef(root, os.path.join(root, RELEASE), RELEASE, "release directory (no tracker)")
    if complete:
        return CheckpointRef(root, os.path.join(root, iteration_dirname(complete[-1])), complete[-1],
                             f"newest complete checkpoint ({TRACKER} is missing)")
    return None


def has_checkpoint(root: str) -> bool:
    try:
        return resolve(root) is not None
    except CheckpointError:
        return True  # there is something, and resolving it says what is wrong


def write_tracker(root: str, iteration: Union[int, str]) -> None:
    """Atomically (temp file + fsync + rename) points the tracker at ``iteration``."""
    path = os.path.join(root, TRACKER)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(str(iteration))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_args_json(root: str) -> dict:
    """``<root>/args.json`` ({} when absent or unreadable)."""
    try:
        with open(os.path.join(os.path.expanduser(root), ARGS_FILE), encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# The keys every args.json has, whoever wrote it (training adds all its arguments, export its layout):
# what `--load` / `--mcore_model` need to rebuild the model without --model.
ARGS_KEYS = ("model", "model_dir", "model_type", "hf_config", "template", "torch_dtype")


def write_args_json(root: str, info: dict) -> None:
    """Writes ``<root>/args.json`` atomically; ``info`` must hold ``ARGS_KEYS``."""
    missing = [k for k in ARGS_KEYS if k not in info]
    if missing:
        raise ValueError(f"args.json for {root} lacks {', '.join(missing)}")
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, ARGS_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(info, f, indent=2, default=str)
        f.write("\n")
    os.replace(path + ".tmp", path)
