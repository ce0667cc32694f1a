"""Training checkpoints in Megatron's layout, written with megatron-core's dist-checkpointing.

Layout (what ``--load``/``--mcore_model`` point at)::

    <save>/iter_0000100/            torch_dist: model, optimizer, scheduler, RNG, data position
    <save>/latest_checkpointed_iteration.txt

Atomicity: every rank writes into ``iter_XXXXXXX.tmp``; only after all ranks finished does rank 0
rename it to ``iter_XXXXXXX`` and then replace the ``latest`` file (write-to-temp + ``os.replace``).
A process killed at any point therefore leaves the previous checkpoint and a ``latest`` pointer
that names a complete directory; a stale ``.tmp`` is removed by the next save.

The optimizer state is saved "fully reshardable" so a run can resume at another TP/PP/DP layout.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from megatron_swift.checkpoint import layout
from megatron_swift.checkpoint.state import (adapt_request, load_model_state, model_sharded_state_dict, restore_rng,
                                             rng_layout, rng_sharded_object)
from megatron_swift.platform import mcore_compat

logger = logging.getLogger("megatron_swift")

OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def iteration_dir(root: str, iteration: int | str) -> str:
    return os.path.join(root, layout.iteration_dirname(iteration))


def _rank() -> int:
    return torch.distributed.get_rank()


def _materialize_optimizer_state(optimizer) -> None:
    """A fresh distributed optimizer has no Adam state yet, and its state_dict() (used to build
    the sharded dict to load into) asserts one; megatron's own dummy initialisation (zero-grad
    step, replaced in place by the load) creates it."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        init = getattr(opt, "_init_optimizer_states_with_dummy_values", None)
        if init is not None and not opt.optimizer.state:
            init()


def _optimizer_kind(optimizer) -> Optional[str]:
    """"distributed" or "plain": their checkpoint formats differ (the state cannot cross)."""
    if optimizer is None:
        return None
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    return "distributed" if any(isinstance(o, DistributedOptimizer) for o in parts) else "plain"


class OptimizerStateMismatch(ValueError):
    """The checkpoint's optimizer state cannot be loaded into this run's optimizer."""


def _state_dict(chunks, optimizer, scheduler, iteration, data_state, save_optim, save_rng, loading, part="all"):
    state = model_sharded_state_dict(chunks, part)
    if optimizer is not None and save_optim:
        # the chunks' dicts as they are ({"model0": ..., "model1": ...}): megatron walks nested values;
        # merging them into one dict lost all but the last virtual-pipeline chunk (same local keys)
        state["optimizer"] = optimizer.sharded_state_dict(
            dict(state), is_loading=loading, metadata=OPTIM_METADATA)
    if scheduler is not None and save_optim:
        state["opt_param_scheduler"] = scheduler.state_dict()
    if save_rng:
        state["rng_state"] = rng_sharded_object(for_loading=loading)
    state["iteration"] = iteration
    state["data_state"] = data_state
    state["saved_parts"] = {"optimizer": optimizer is not None and save_optim, "rng": save_rng,
                            "rng_layout": rng_layout(), "optimizer_kind": _optimizer_kind(optimizer),
                            "model": part}
    state["checkpoint_version"] = 3.0
    return state


def save_checkpoint(save_dir: str, iteration: int, chunks: list, optimizer=None, scheduler=None,
                    data_state: Optional[dict] = None, save_optim: bool = True, save_rng: bool = True,
                    before_publish: Optional[Callable[[str], None]] = None, async_queue=None,
                    after_publish: Optional[Callable[[], None]] = None, part: str = "all") -> str:
    """Saves atomically (see module docstring); returns the final directory.

    ``before_publish(tmp_dir)`` (collective) writes more into the checkpoint before it is published
    (the HF copy of ``--save_safetensors``). With ``async_queue`` (megatron's AsyncCallsQueue) the
    tensors are written in the background and the checkpoint is published (renamed, ``latest``
    updated, ``after_publish`` run) when the queue finalizes it on every rank."""
    from megatron.core import dist_checkpointing

    from .model_setup import finish_param_sync

    finish_param_sync(chunks)
    final = iteration_dir(save_dir, iteration)
    tmp = final + ".tmp"
    if _rank() == 0:
        os.makedirs(save_dir, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    torch.distributed.barrier()
    if before_publish is not None:
        before_publish(tmp)
    state = _state_dict(chunks, optimizer, scheduler, iteration, data_state or {}, save_optim, save_rng,
                        loading=False, part=part)
    needed = _check_free_space(save_dir, state, final)

    def publish():
        torch.distributed.barrier()
        if _rank() == 0:
            if os.path.exists(final):  # re-saving the same iteration: keep the old one until the new is in place
                old = final + ".old"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            layout.write_tracker(save_dir, iteration)
        torch.distributed.barrier()
        if after_publish is not None:
            after_publish()

    try:
        if async_queue is None:
            dist_checkpointing.save(state, tmp, content_metadata=dict(OPTIM_METADATA))
            publish()
        else:
            request = dist_checkpointing.save(state, tmp, content_metadata=dict(OPTIM_METADATA),
                                              async_sharded_save=True)
            request.add_finalize_fn(publish)
            async_queue.schedule_async_request(request)
    except Exception as exc:
        if _is_disk_full(exc):
            raise StorageError(_disk_full_message(save_dir, final, needed)) from None
        raise
    return final


class StorageError(OSError):
    """A checkpoint could not be written (the disk is full); earlier checkpoints are intact."""


def _is_disk_full(exc: BaseException) -> bool:
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC or "No space left on device" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _disk_full_message(save_dir: str, final: str, needed: int) -> str:
    free = shutil.disk_usage(save_dir).free
    latest = layout.read_tracker(save_dir)
    kept = f"the previous checkpoint ({iteration_dir(save_dir, latest)}) is intact" if latest else \
        "no earlier checkpoint exists"
    return (f"no space left on device writing {final}: the checkpoint needs about {needed / 2**30:.2f} GiB and "
            f"{free / 2**30:.2f} GiB are free on {save_dir}; {kept} (free space, or --save_total_limit, "
            f"--no_save_optim true)")


def _checkpoint_bytes(state: dict) -> int:
    """What this rank writes: the tensors it holds the main replica of."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, is_main_replica

    total = 0
    for value in nested_values(state):
        if isinstance(value, ShardedTensor) and is_main_replica(value.replica_id) and value.data is not None:
            total += value.data.numel() * value.data.element_size()
    return total


def _check_free_space(save_dir: str, state: dict, final: str) -> int:
    """Refuses a save that cannot fit before writing anything (collective); returns the bytes needed."""
    from megatron_swift.platform import get_platform

    needed = torch.tensor([_checkpoint_bytes(state)], dtype=torch.int64, device=get_platform().device)
    torch.distributed.all_reduce(needed)
    needed = int(needed.item())
    fits = torch.tensor([1], dtype=torch.int64, device=get_platform().device)
    if _rank() == 0 and shutil.disk_usage(save_dir).free < needed:
        fits[0] = 0
    torch.distributed.broadcast(fits, src=0)
    if not int(fits.item()):
        raise StorageError(_disk_full_message(save_dir, final, needed))
    return needed


def rotate_checkpoints(save_dir: str, keep: int) -> list[str]:
    """Deletes all but the newest ``keep`` published checkpoints; never the one ``latest`` names (nor
    one being written: those are ``.tmp``). Rank 0 only. Returns the deleted directories."""
    latest = layout.read_tracker(save_dir)
    iterations = layout.complete_iterations(save_dir)
    protected = {int(latest)} if latest and latest.isdigit() else set()
    doomed = [i for i in iterations[:-keep] if i not in protected] if keep < len(iterations) else []
    removed = []
    for i in doomed:
        path = iteration_dir(save_dir, i)
        trash = path + ".deleting"  # renamed first: a kill mid-delete leaves no half checkpoint under its name
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
        removed.append(path)
    return removed


class Checkpointer:
    """The loop's checkpoint saver: atomic saves, ``--save_total_limit`` rotation, the HF copy of
    ``--save_safetensors``, and ``--async_save`` (one save in flight; the next save, or the end of
    training, waits for it)."""

    def __init__(self, save_dir: Optional[str], settings, chunks: list, optimizer, scheduler, hf_export=None):
        self.save_dir, self.settings = save_dir, settings
        self.chunks, self.optimizer, self.scheduler, self.hf_export = chunks, optimizer, scheduler, hf_export
        self.queue = None
        self.last_saved: Optional[str] = None  # the newest published checkpoint of this run
        if save_dir:
            mcore_compat.writer_queue_dies_with_trainer()
        if settings.async_save and save_dir:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self.queue = AsyncCallsQueue()

    def _published(self, directory: str) -> None:
        self.last_saved = directory
        self._rotate()

    def _rotate(self) -> None:
        if self.settings.save_total_limit and _rank() == 0:
            for path in rotate_checkpoints(self.save_dir, self.settings.save_total_limit):
                logger.info("removed %s (--save_total_limit %d)", path, self.settings.save_total_limit)

    def save(self, iteration: int, data_state: Optional[dict] = None) -> float:
        """Saves ``iteration`` (``data_state``: where the data stream is); returns the seconds training
        waited for it."""
        start = time.time()
        self.finish()
        before = None
        if self.hf_export is not None:
            from .model_setup import unwrap

            chunks = [unwrap(c) for c in self.chunks]
            before = lambda tmp: self.hf_export.write(chunks, tmp)  # noqa: E731
        final = iteration_dir(self.save_dir, iteration)
        save_checkpoint(self.save_dir, iteration, self.chunks, self.optimizer, self.scheduler,
                        data_state=data_state or {}, save_optim=self.settings.save_optim,
                        save_rng=self.settings.save_rng, before_publish=before, async_queue=self.queue,
                        after_publish=lambda: self._published(final),
                        part="trainable" if getattr(self.settings, "adapter_only", False) else "all")
        if _rank() == 0:
            how = "started writing" if self.queue is not None else "saved"
            logger.info("%s checkpoint iteration %d in %s", how, iteration, self.save_dir)
        return time.time() - start

    def finish(self) -> None:
        """Waits for a checkpoint being written in the background and publishes it."""
        if self.queue is not None:
            self.queue.maybe_finalize_async_calls(blocking=True)

    def close(self) -> None:
        if self.queue is not None:
            self.queue.close()
            self.queue = None


@dataclass
class LoadedCheckpoint:
    iteration: int
    data_state: dict
    directory: str


def find_checkpoint(load_dir: str) -> Optional[layout.CheckpointRef]:
    """The checkpoint ``--load`` means (``megatron_swift.checkpoint.layout.resolve``'s rule)."""
    return layout.resolve(load_dir)


def check_shard_files(directory: str) -> None:
    """Every shard file the checkpoint's metadata lists exists and is long enough; a damaged one is
    named (a truncated ``.distcp`` otherwise surfaces as a long unpickling traceback)."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(directory).read_metadata()
    except Exception as exc:
        raise layout.CheckpointError(f"checkpoint {directory}: its index (.metadata) cannot be read "
                                     f"({type(exc).__name__}); the checkpoint is damaged") from None
    needed: dict = {}
    for info in (metadata.storage_data or {}).values():
        end = info.offset + info.length
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for name, size in sorted(needed.items()):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise layout.CheckpointError(f"checkpoint {directory}: shard file {name} is missing")
        actual = os.path.getsize(path)
        if actual < size:
            raise layout.CheckpointError(f"checkpoint {directory}: shard file {name} is truncated ({actual} of "
                                         f"{size} bytes); resume from an earlier checkpoint")


def load_checkpoint(load_dir: str, chunks: list, optimizer=None, scheduler=None, finetune: bool = False,
                    load_optim: bool = True, load_rng: bool = True, part: str = "all",
                    what: str = "--load") -> LoadedCheckpoint:
    """Loads the checkpoint ``load_dir`` means into the model (and optimizer/scheduler/RNG unless
    finetune). ``part``: the parameters to load ("all"; under LoRA "base" for the base model and
    "trainable" for an adapter checkpoint); ``what``: the argument named in errors."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException

    ref = find_checkpoint(load_dir)
    if ref is None:
        raise layout.CheckpointError(f"{what} {load_dir}: holds no complete checkpoint")
    if ref.how not in ("tracker", "the directory itself") and _rank() == 0:
        logger.warning("--load %s: loading %s (%s)", load_dir, ref.directory, ref.how)
    directory = ref.directory
    check_shard_files(directory)
    saved = dist_checkpointing.load_common_state_dict(directory).get("saved_parts", {})
    saved_part = saved.get("model", "all")
    if saved_part == "trainable" and part != "trainable":
        raise layout.CheckpointError(f"{what} {load_dir}: {directory} is a LoRA adapter checkpoint (no base weights); "
                                     f"give it as --adapter_load with --train_type lora and the base as --model")
    if part == "trainable" and saved_part != "trainable":
        raise layout.CheckpointError(f"{what} {load_dir}: {directory} is not a LoRA adapter checkpoint; give a "
                                     f"full checkpoint as --load")
    load_optim = load_optim and not finetune and saved.get("optimizer", False) and optimizer is not None
    load_rng = load_rng and not finetune and saved.get("rng", False)
    if load_rng and saved.get("rng_layout") != rng_layout():
        # RNG streams are per TP x PP position; they cannot be mapped onto another layout
        logger.warning("checkpoint saved at TP x PP = %s, running at %s: RNG state not restored",
                       saved.get("rng_layout"), rng_layout())
        load_rng = False
    if load_optim:
        saved_kind, kind = saved.get("optimizer_kind"), _optimizer_kind(optimizer)
        if saved_kind is not None and saved_kind != kind:
            raise OptimizerStateMismatch(
                f"--load {load_dir}: {directory} holds the state of a {saved_kind} optimizer and this run uses a "
                f"{kind} one (--use_distributed_optimizer {str(kind == 'distributed').lower()}); resume with "
                f"--use_distributed_optimizer {str(saved_kind == 'distributed').lower()}, or load the model weights "
                f"only with --no_load_optim true")
        mcore_compat.prepare_optimizer_load(optimizer)
        _materialize_optimizer_state(optimizer)
    state = _state_dict(chunks, optimizer if load_optim else None, scheduler if load_optim else None, 0, {},
                        save_optim=load_optim, save_rng=load_rng, loading=True, part=part)
    for change in adapt_request(state, directory):
        logger.debug("checkpoint %s: %s", directory, change)
    try:
        loaded = dist_checkpointing.load(state, directory)
    except (KeyError, CheckpointingException) as exc:
        if not load_optim or "optimizer" not in str(exc):
            raise layout.CheckpointError(f"{what} {load_dir}: {directory} does not fit this model: "
                                         f"{_first_line(exc)}") from None
        raise OptimizerStateMismatch(
            f"--load {load_dir}: the optimizer state in {directory} does not match this run's optimizer (it was "
            f"saved by another version or optimizer setup; {_first_line(exc)}); load the model weights only with "
            f"--no_load_optim true") from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:  # unreadable data behind an intact index
        raise layout.CheckpointError(f"{what} {load_dir}: {directory} cannot be read ({type(exc).__name__}: "
                                     f"{_first_line(exc)}); the checkpoint is damaged") from None
    load_model_state(chunks, loaded, part)
    if load_optim:
        optimizer.load_state_dict(loaded["optimizer"])
        mcore_compat.finish_optimizer_load(optimizer)
        if scheduler is not None and "opt_param_scheduler" in loaded:
            scheduler.load_state_dict(loaded["opt_param_scheduler"])
    elif optimizer is not None:
        optimizer.reload_model_params()
    if load_rng and loaded.get("rng_state") is not None:
        restore_rng(loaded["rng_state"])
    iteration = 0 if finetune or ref.iteration == layout.RELEASE else int(loaded.get("iteration", 0))
    data_state = {} if finetune else dict(loaded.get("data_state") or {})
    return LoadedCheckpoint(iteration=iteration, data_state=data_state, directory=directory)


def _first_line(exc: BaseException) -> str:
    """The gist of a library error, without advice that does not apply here (torch suggests
    ``weights_only=False``, which would run pickled code from the checkpoint)."""
    lines = [line for line in str(exc).splitlines() if line.strip() and "weights_only" not in line]
    text = lines[0] if lines else type(exc).__name__
    return text[:300] + ("..." if len(text) > 300 else "")
