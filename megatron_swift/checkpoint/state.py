"""The model and RNG parts of a checkpoint's (sharded) state dict, for training and conversion alike.

The model part is Megatron-LM's structure, ``model`` (or ``model0``, ``model1``... with virtual
pipeline stages) of each chunk's ``sharded_state_dict``, so a checkpoint written by ``megatron export
--to_mcore`` and one written by training load into each other, at any parallel layout (megatron's
resharding).
"""

from __future__ import annotations

import random

import numpy as np
import torch


def _unwrap(chunk):
    from megatron_swift.model import unwrap

    return unwrap(chunk)


def model_keys(num_chunks: int) -> list:
    return ["model"] if num_chunks == 1 else [f"model{i}" for i in range(num_chunks)]


# Which parameters a checkpoint's model part holds: "all"; "trainable" (a LoRA adapter checkpoint:
# adapters + modules_to_save, what requires grad); "base" (the base model under LoRA: no adapters)
PARTS = ("all", "trainable", "base")


def _keep(value, part: str, name: str) -> bool:
    if part == "all":
        return True
    from megatron_swift.tuners.lora import is_adapter_param

    if part == "base":
        return not is_adapter_param(name)
    data = getattr(value, "data", None)  # ShardedTensor / factory of a parameter (keep_vars)
    return isinstance(data, torch.nn.Parameter) and data.requires_grad


def model_sharded_state_dict(chunks: list, part: str = "all") -> dict:
    out = {}
    for key, chunk in zip(model_keys(len(chunks)), chunks):
        state = _unwrap(chunk).sharded_state_dict()
        out[key] = {name: value for name, value in state.items() if _keep(value, part, name)}
    return out


def _expected_missing(chunk, part: str) -> set:
    """Parameters a ``part`` checkpoint does not hold."""
    if part == "all":
        return set()
    from megatron_swift.tuners.lora import is_adapter_param

    names = set(_unwrap(chunk).state_dict().keys())
    if part == "base":
        return {n for n in names if is_adapter_param(n)}
    trainable = {n for n, p in _unwrap(chunk).named_parameters() if p.requires_grad}
    return names - trainable


def load_model_state(chunks: list, loaded: dict, part: str = "all") -> None:
    """Puts the model part of a loaded state dict into the chunks: every tensor must be there;
    Transformer Engine's ``_extra_state`` (FP8 scaling metadata) may be missing, as in a checkpoint
    written by the local layer spec (CPU)."""
    for key, chunk in zip(model_keys(len(chunks)), chunks):
        result = _unwrap(chunk).load_state_dict(loaded[key], strict=False)
        skip = _expected_missing(chunk, part)
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state") and k not in skip]
        if missing or result.unexpected_keys:
            raise RuntimeError(f"checkpoint does not fit the model: missing {missing[:5]}, unexpected "
                               f"{list(result.unexpected_keys)[:5]}")


# checkpoint key of an older / other-spec checkpoint -> the key this model asks for
KEY_ALIASES = {
    # MoE layers' pre-MLP norm: the local spec (before megatron-swift 0.2) used the dense fc1's fused-norm name
    "decoder.layers.pre_mlp_layernorm.weight": "decoder.layers.mlp.linear_fc1.layer_norm_weight",
}


def adapt_request(state: dict, directory: str) -> list:
    """Makes a sharded state dict to load fit what the checkpoint holds, across layer specs and
    versions: requested ``_extra_state`` objects are dropped when the checkpoint has none (written by
    the local spec), and keys the checkpoint stores under an alias (``KEY_ALIASES``) are asked for by
    that name. Returns what it changed (for the log)."""
    import dataclasses

    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    saved = set(dist_checkpointing.load_tensors_metadata(directory))
    saved_objects = _saved_object_keys(directory)
    changes = []

    def visit(node):
        if not isinstance(node, dict):
            return
        for name in list(node):
            value = node[name]
            if (isinstance(value, ShardedObject) and value.key.endswith("_extra_state")
                    and value.key not in saved_objects):
                del node[name]
                changes.append(f"no {value.key} in the checkpoint")
            elif isinstance(value, ShardedTensor) and value.key not in saved and KEY_ALIASES.get(value.key) in saved:
                node[name] = dataclasses.replace(value, key=KEY_ALIASES[value.key])
                changes.append(f"{value.key} read as {KEY_ALIASES[value.key]}")
            else:
                visit(value)

    visit(state)
    return sorted(set(changes))


def _saved_object_keys(directory: str) -> set:
    """Keys of the ShardedObjects in a torch_dist checkpoint (stored as ``<key>/shard_<offsets>``)."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(directory).read_metadata()
    return {key.split("/shard_")[0] for key in metadata.state_dict_metadata if "/shard_" in key}


def rng_sharded_object(for_loading: bool):
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


def restore_rng(state: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(state["random"])
    np.random.set_state(state["np"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def rng_layout() -> list:
    """RNG streams are per TP x PP position: they only restore at the same TP x PP."""
    from megatron.core import parallel_state as ps

    return [ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()]
