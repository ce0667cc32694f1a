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

import logging
import os
import random
import shutil
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

logger = logging.getLogger("megatron_swift")

LATEST_FILE = "latest_checkpointed_iteration.txt"
OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def iteration_dir(root: str, iteration: int | str) -> str:
    if iteration == "release":
        return os.path.join(root, "release")
    return os.path.join(root, f"iter_{int(iteration):07d}")


def read_latest(root: str) -> Optional[str]:
    """The iteration named by ``latest_checkpointed_iteration.txt`` ("release" or digits), or None."""
    path = os.path.join(root, LATEST_FILE)
    if not os.path.isfile(path):
        return None
    value = open(path).read().strip()
    if value != "release" and not value.isdigit():
        raise ValueError(f"{path}: expected an iteration number or 'release', got {value!r}")
    return value


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _rank() -> int:
    return torch.distributed.get_rank()


def _tp_pp_layout() -> list:
    from megatron.core import parallel_state as ps

    return [ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()]


def _rng_sharded_object(for_loading: bool):
    """This rank's RNG state as a ShardedObject (one per TP x PP position, replicated over DP)."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state = None if for_loading else {
        "random": random.getstate(),
        "np": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    pp, tp = ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()
    pp_size, tp_size = ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()
    return ShardedObject("rng_state", state, (pp_size, tp_size), (pp, tp),
                         replica_id=ps.get_data_parallel_rank(with_context_parallel=True))


def _restore_rng(state: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(state["random"])
    np.random.set_state(state["np"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _model_state(chunks: list) -> dict:
    # the same structure `megatron export --to_mcore` writes, so either loads the other
    from megatron_swift.converters.mcore_io import model_sharded_state_dict

    return model_sharded_state_dict(chunks)


def _model_sharded_for_optimizer(model_state: dict) -> dict:
    merged = {}
    for value in model_state.values():
        merged.update(value)
    return merged


def _tolerate_step_in_reshardable_load() -> None:
    """megatron-core 0.16 bug, torch-Adam path (no apex/TE): loading a ``fully_reshardable``
    distributed-optimizer state copies every key of the live Adam state, including the scalar
    ``step`` that the checkpoint stores separately (and has already restored), so it raises
    KeyError('step'). The wrapper hides ``step`` from that copy. Idempotent."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states
    if getattr(original, "_tolerates_step", False):
        return

    def set_states(self, model_param, tensors):
        if "step" in tensors or self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        state = self.optimizer.state[main_param]
        step = state.pop("step", None)
        try:
            return original(self, model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step

    set_states._tolerates_step = True
    DistributedOptimizer._set_main_param_and_optimizer_states = set_states


def _unshare_adam_steps(optimizer) -> None:
    """megatron-core 0.16 (torch-Adam path) restores one shared ``step`` tensor into every
    parameter's state; torch's Adam increments each param's step in place, so a shared tensor
    advances once per parameter per iteration and bias correction goes wrong after a resume."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        for state in getattr(inner, "state", {}).values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()


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


def _state_dict(chunks, optimizer, scheduler, iteration, data_state, save_optim, save_rng, loading):
    state = _model_state(chunks)
    if optimizer is not None and save_optim:
        state["optimizer"] = optimizer.sharded_state_dict(
            _model_sharded_for_optimizer(state), is_loading=loading, metadata=OPTIM_METADATA)
    if scheduler is not None and save_optim:
        state["opt_param_scheduler"] = scheduler.state_dict()
    if save_rng:
        state["rng_state"] = _rng_sharded_object(for_loading=loading)
    state["iteration"] = iteration
    state["data_state"] = data_state
    state["saved_parts"] = {"optimizer": optimizer is not None and save_optim, "rng": save_rng,
                            "rng_layout": _tp_pp_layout(), "optimizer_kind": _optimizer_kind(optimizer)}
    state["checkpoint_version"] = 3.0
    return state


def save_checkpoint(save_dir: str, iteration: int, chunks: list, optimizer=None, scheduler=None,
                    data_state: Optional[dict] = None, save_optim: bool = True, save_rng: bool = True) -> str:
    """Saves atomically (see module docstring); returns the final directory."""
    from megatron.core import dist_checkpointing

    final = iteration_dir(save_dir, iteration)
    tmp = final + ".tmp"
    if _rank() == 0:
        os.makedirs(save_dir, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    torch.distributed.barrier()
    state = _state_dict(chunks, optimizer, scheduler, iteration, data_state or {}, save_optim, save_rng,
                        loading=False)
    dist_checkpointing.save(state, tmp, content_metadata=dict(OPTIM_METADATA))
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
        _write_atomic(os.path.join(save_dir, LATEST_FILE), str(iteration))
    torch.distributed.barrier()
    return final


@dataclass
class LoadedCheckpoint:
    iteration: int
    data_state: dict
    directory: str


def load_checkpoint(load_dir: str, chunks: list, optimizer=None, scheduler=None, finetune: bool = False,
                    load_optim: bool = True, load_rng: bool = True) -> LoadedCheckpoint:
    """Loads ``<load_dir>/<latest>`` into the model (and optimizer/scheduler/RNG unless finetune)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException

    latest = read_latest(load_dir)
    if latest is None:
        raise FileNotFoundError(f"--load {load_dir!r}: no {LATEST_FILE} (not a Megatron checkpoint directory)")
    directory = iteration_dir(load_dir, latest)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"--load {load_dir!r}: {LATEST_FILE} names {latest!r} but {directory} is missing")
    saved = dist_checkpointing.load_common_state_dict(directory).get("saved_parts", {})
    load_optim = load_optim and not finetune and saved.get("optimizer", False) and optimizer is not None
    load_rng = load_rng and not finetune and saved.get("rng", False)
    if load_rng and saved.get("rng_layout") != _tp_pp_layout():
        # RNG streams are per TP x PP position; they cannot be mapped onto another layout
        logger.warning("checkpoint saved at TP x PP = %s, running at %s: RNG state not restored",
                       saved.get("rng_layout"), _tp_pp_layout())
        load_rng = False
    if load_optim:
        saved_kind, kind = saved.get("optimizer_kind"), _optimizer_kind(optimizer)
        if saved_kind is not None and saved_kind != kind:
            raise OptimizerStateMismatch(
                f"--load {load_dir}: {directory} holds the state of a {saved_kind} optimizer and this run uses a "
                f"{kind} one (--use_distributed_optimizer {str(kind == 'distributed').lower()}); resume with "
                f"--use_distributed_optimizer {str(saved_kind == 'distributed').lower()}, or load the model weights "
                f"only with --no_load_optim true")
        _tolerate_step_in_reshardable_load()
        _materialize_optimizer_state(optimizer)
    state = _state_dict(chunks, optimizer if load_optim else None, scheduler if load_optim else None, 0, {},
                        save_optim=load_optim, save_rng=load_rng, loading=True)
    try:
        loaded = dist_checkpointing.load(state, directory)
    except (KeyError, CheckpointingException) as exc:
        if not load_optim or "optimizer" not in str(exc):
            raise
        raise OptimizerStateMismatch(
            f"--load {load_dir}: the optimizer state in {directory} does not match this run's optimizer (it was "
            f"saved by another version or optimizer setup; {str(exc)[:300]}...); load the model weights only with "
            f"--no_load_optim true") from None
    from .model_setup import unwrap

    model_keys = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    for chunk, key in zip(chunks, model_keys):
        unwrap(chunk).load_state_dict(loaded[key], strict=True)
    if load_optim:
        optimizer.load_state_dict(loaded["optimizer"])
        _unshare_adam_steps(optimizer)
        if scheduler is not None and "opt_param_scheduler" in loaded:
            scheduler.load_state_dict(loaded["opt_param_scheduler"])
    elif optimizer is not None:
        optimizer.reload_model_params()
    if load_rng and loaded.get("rng_state") is not None:
        _restore_rng(loaded["rng_state"])
    iteration = 0 if finetune else int(loaded.get("iteration", 0) if latest != "release" else 0)
    data_state = {} if finetune else dict(loaded.get("data_state") or {})
    return LoadedCheckpoint(iteration=iteration, data_state=data_state, directory=directory)
