"""Megatron-Core distributed checkpoints (torch_dist) for the converter.

Layout (Megatron-LM's)::

    OUT/latest_checkpointed_iteration.txt   "release" (or the iteration number)
    OUT/release/ (or iter_0000100/)         the dist checkpoint: .metadata, __*.distcp,
                                            common.pt, metadata.json
    OUT/args.json                           the source model (HF config, model_type, dir)

The checkpoint is the model's ``sharded_state_dict`` saved by ``megatron.core.dist_checkpointing``
(``{"model": ...}``, or ``model0``, ``model1``... with virtual pipeline stages), so it loads at
any TP / PP / EP layout, through megatron's own resharding.

Streaming: HF -> mcore builds the model on the ``meta`` device (no memory) and saves it with
:class:`LazyTorchDistSaveStrategy`, megatron's torch_dist strategy whose tensors are computed
from the HF files only when the writer thread reaches them. mcore -> HF loads parameters group
by group (:class:`CheckpointParams`) into tensors that live only while they are written.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from typing import Callable, Optional

import torch

from megatron_swift.checkpoint import layout
from megatron_swift.checkpoint.layout import RELEASE, read_args_json  # noqa: F401  (re-exported for convert.py)
from megatron_swift.checkpoint.state import adapt_request, load_model_state, model_sharded_state_dict

from .plan import LocalParam, unwrap

logger = logging.getLogger(__name__)



# ----------------------------------------------------------------------------------- the model

def build_chunks(hf_config, overrides: Optional[dict] = None, meta: bool = False):
    """``megatron_swift.model.build_model``; with ``meta`` the parameters take no memory (shapes,
    names, TP attributes and ``sharded_state_dict`` work, values do not)."""
    from megatron_swift.model import build_model

    return build_model(hf_config, overrides, meta=meta)


# ------------------------------------------------------------------------- checkpoint layout

def iteration_dir(path: str) -> str:
    """The directory holding the dist checkpoint that ``path`` (a checkpoint root, or the iteration
    directory itself) means: ``megatron_swift.checkpoint.layout.resolve``'s rule."""
    root = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"mcore checkpoint directory {root} does not exist")
    ref = layout.resolve(root)
    if ref is None:
        raise FileNotFoundError(f"{root} holds no complete mcore checkpoint (no {layout.TRACKER}, release/ or "
                                f"complete iter_* directory)")
    return ref.directory


def write_layout(out_dir: str, args_info: dict, iteration=layout.RELEASE) -> None:
    layout.write_tracker(out_dir, iteration)
    layout.write_args_json(out_dir, args_info)


# ------------------------------------------------------------------------- saving (HF -> mcore)

class _Materializer:
    """Thread-safe, reference-counted cache of materialized parameters: a parameter saved as
    several pieces (gate/up halves of fc1) is computed once and dropped after its last piece."""

    def __init__(self, produce: Callable[..., torch.Tensor]):
        self.produce = produce
        self.lock = threading.Lock()
        self.entries: dict[int, list] = {}  # id(lp) -> [refs, event, tensor, error]

    def expect(self, lp: LocalParam) -> None:
        self.entries.setdefault(id(lp), [0, None, None, None])[0] += 1

    def get(self, lp: LocalParam) -> torch.Tensor:
        with self.lock:
            entry = self.entries[id(lp)]
            owner = entry[1] is None
            if owner:
                entry[1] = threading.Event()
            event = entry[1]
        if owner:
            try:
                entry[2] = self.produce(lp)
            except BaseException as e:
                entry[3] = e
            event.set()
        event.wait()
        if entry[3] is not None:
            raise entry[3]
        tensor = entry[2]
        with self.lock:
            entry[0] -= 1
            if entry[0] <= 0:
                entry[2] = None
        return tensor


def _half_rows(lp: LocalParam, view: torch.Tensor) -> Optional[tuple[int, int]]:
    """(a, b) when ``view`` is exactly the gate or the up half of a GATE_UP parameter (megatron
    saves the two halves of a SwiGLU fc1 as separate tensors): it can be read directly, without
    building the fused parameter and copying half of it out again."""
    from .mapping import GATE_UP

    shape = tuple(lp.param.shape)
    if lp.rule.transform != GATE_UP or len(shape) < 1 or tuple(view.shape[1:]) != shape[1:]:
        return None
    row = 1
    for s in shape[1:]:
        row *= s
    if not view.is_contiguous() or view.storage_offset() % row:
        return None
    a = view.storage_offset() // row
    b = a + view.shape[0]
    half = shape[0] // 2
    return (a, b) if (a, b) in ((0, half), (half, shape[0])) else None


# torch versions whose FileSystemWriter internals (_write_item, _write_data) the streaming writer was
# written and measured against; elsewhere torch's own writer is used
STREAMING_WRITER_TORCH = ((2, 13), (2, 14))


def _streaming_writer_class():
    """torch's ``FileSystemWriter`` minus one thing: torch (2.13) keeps tensors of a file referenced
    until the file is closed (``tensor_dict``, for its safetensors variant), so peak memory grows
    with the model. Measured by scripts/bench_convert.py (docs/conversion.md): HF -> mcore peaked at
    1.36x the largest shard for a 2 GB model and 1.55x for 4 GB with torch's writer, 0.8-1.1x with
    this one, which drops each tensor right after writing it. Used only on the torch versions above."""
    import inspect
    import queue

    from torch.distributed.checkpoint import FileSystemWriter

    version = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    if not STREAMING_WRITER_TORCH[0] <= version < STREAMING_WRITER_TORCH[1]:
        logger.info("torch %s: converting with torch's FileSystemWriter (peak memory grows with the model; "
                    "the streaming writer is verified for torch %s.x)", torch.__version__,
                    ".".join(map(str, STREAMING_WRITER_TORCH[0])))
        return FileSystemWriter
    from torch.distributed.checkpoint import filesystem as fs_mod
    from torch.distributed.checkpoint.planner import WriteItemType
    from torch.futures import Future

    takes_format = len(inspect.signature(fs_mod._write_item).parameters) >= 6

    def write_item(transforms, stream, data, item, storage_key):
        if takes_format:
            return fs_mod._write_item(transforms, stream, data, item, storage_key,
                                      fs_mod.SerializationFormat.TORCH_SAVE)
        return fs_mod._write_item(transforms, stream, data, item, storage_key)

    class StreamingFileSystemWriter(FileSystemWriter):
        def _write_files(self, planner, file_queue, result_queue, errors):
            try:
                while True:
                    try:
                        path, storage_key, items = file_queue.get_nowait()
                    except queue.Empty:
                        return
                    results = []
                    with self.fs.create_stream(path, "wb") as stream:
                        for item in items:
                            data = planner.resolve_data(item)
                            if item.type != WriteItemType.BYTE_IO:
                                data = data.detach().cpu()
                                if data.untyped_storage().size() != data.nbytes:
                                    data = data.clone()  # torch.save writes whole storages
                            results.append(write_item(self.transforms, stream, data, item, storage_key))
                            del data
                        if self.sync_files:
                            os.fsync(stream.fileno())
                    result_queue.put(results)
            except BaseException as e:  # re-raised by the calling thread
                errors.append(e)

        def _write_data(self, planner, file_queue):
            result_queue, errors = queue.Queue(), []
            threads = [threading.Thread(target=self._write_files, args=(planner, file_queue, result_queue, errors))
                       for _ in range(1, self.thread_count)]
            for t in threads:
                t.start()
            self._write_files(planner, file_queue, result_queue, errors)
            for t in threads:
                t.join()
            if errors:
                raise errors[0]
            results = []
            while not result_queue.empty():
                results += result_queue.get_nowait()
            future = Future()
            future.set_result(results)
            return future

    return StreamingFileSystemWriter


def _lazy_strategy_class():
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        TorchDistSaveShardedStrategy,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )
    from torch.distributed.checkpoint import save as dcp_save

    writer_class = _streaming_writer_class()

    class LazyPlanner(MCoreSavePlanner):
        def __init__(self, table, materializer, **kwargs):
            super().__init__(**kwargs)
            self.table = table
            self.materializer = materializer

        def resolve_data(self, write_item):
            obj = super().resolve_data(write_item)
            if not (isinstance(obj, torch.Tensor) and obj.is_meta):
                return obj
            lp, rows, size, stride, offset = self.table[(write_item.index.fqn, tuple(write_item.index.offset))]
            if rows is not None:  # a row block computed on its own (gate / up half of fc1)
                return self.materializer.produce(lp, rows=rows).reshape(obj.shape)
            full = self.materializer.get(lp)
            return full.as_strided(size, stride, offset).reshape(obj.shape)

    class LazyTorchDistSaveStrategy(TorchDistSaveShardedStrategy):
        """megatron's torch_dist save with tensors computed at write time.

        The translation to torch.distributed.checkpoint and the planner are megatron's own
        (``MCoreSavePlanner``); the writer is torch's ``FileSystemWriter`` (minus its habit of
        keeping written tensors alive), which asks the planner for each tensor just before
        writing it (megatron's async writer would collect them all first). ``thread_count``
        writer threads, one file each, per rank.
        """

        def __init__(self, params_by_id: dict, produce: Callable[[LocalParam], torch.Tensor],
                     thread_count: int = 1):
            super().__init__("torch_dist", 1, thread_count=thread_count)
            self.params_by_id = params_by_id
            self.produce = produce

        def save(self, sharded_state_dict, checkpoint_dir):
            sharded_state_dict, _, _ = _replace_state_dict_keys_with_sharded_keys(
                sharded_state_dict, self.keep_only_main_replica)
            materializer = _Materializer(self.produce)
            table = {}
            for sh in nested_values(sharded_state_dict):
                if not isinstance(sh, ShardedTensor) or not sh.data.is_meta:
                    continue
                data = sh.data
                base = data._base if data._base is not None else data
                lp = self.params_by_id.get(id(base))
                if lp is None:
                    raise RuntimeError(f"internal error: no parameter behind sharded tensor {sh.key}")
                rows = _half_rows(lp, data)
                table[(sh.key, tuple(sh.global_offset))] = (lp, rows, data.size(), data.stride(),
                                                             data.storage_offset())
                if rows is None:
                    materializer.expect(lp)
            pyt_state_dict = mcore_to_pyt_state_dict(sharded_state_dict, False)
            writer = writer_class(str(checkpoint_dir), thread_count=self.thread_count)
            planner = LazyPlanner(table, materializer, dedup_replicated_tensors=not self.keep_only_main_replica,
                                  flatten_state_dict=False)
            dcp_save(pyt_state_dict, storage_writer=writer, planner=planner)

    return LazyTorchDistSaveStrategy


def save_lazily(chunks: list, lps: list[LocalParam], produce: Callable[..., torch.Tensor],
                checkpoint_dir: str, thread_count: int = 1) -> None:
    """Saves meta-device ``chunks`` as a dist checkpoint, computing each tensor with
    ``produce(lp)`` (the rank's whole shard of that parameter) or ``produce(lp, rows=(a, b))``
    (rows ``[a, b)`` of it: the gate / up halves of fc1, which megatron saves separately)."""
    from megatron.core import dist_checkpointing

    os.makedirs(checkpoint_dir, exist_ok=True)
    strategy = _lazy_strategy_class()({id(lp.param): lp for lp in lps}, produce, thread_count)
    state = model_sharded_state_dict(chunks)
    state["checkpoint_version"] = 3.0
    state["iteration"] = 0
    dist_checkpointing.save(state, checkpoint_dir, sharded_strategy=strategy)


def save_checkpoint(chunks: list, checkpoint_dir: str) -> None:
    """Plain megatron save of built chunks (their current values)."""
    from megatron.core import dist_checkpointing

    os.makedirs(checkpoint_dir, exist_ok=True)
    state = model_sharded_state_dict(chunks)
    state["checkpoint_version"] = 3.0
    state["iteration"] = 0
    dist_checkpointing.save(state, checkpoint_dir)


# ------------------------------------------------------------------------ loading (mcore -> HF)

def load_checkpoint(chunks: list, checkpoint_dir: str) -> None:
    """Loads a whole dist checkpoint into built (real) chunks, at their layout."""
    from megatron.core import dist_checkpointing

    directory = iteration_dir(checkpoint_dir)
    state = model_sharded_state_dict(chunks)
    adapt_request(state, directory)
    load_model_state(chunks, dist_checkpointing.load(state, directory))


def _unprepended(sh, view: torch.Tensor):
    """The same ShardedTensor without prepended axes or a regular-grid claim, so that a subset of
    a stacked (per-layer) tensor can be loaded on its own (megatron's legacy path for prepended
    axes insists on loading every fragment of the grid at once)."""
    p = sh.prepend_axis_num
    return dataclasses.replace(sh, data=view.view((1,) * p + tuple(view.shape)),
                               local_shape=(1,) * p + tuple(sh.local_shape), prepend_axis_num=0,
                               axis_fragmentations=None)


class CheckpointParams:
    """Parameter values of meta-device chunks, loaded from a dist checkpoint a group at a time.

    ``materialize`` is collective (every rank loads its group of the same slot together)."""

    collective = True

    def __init__(self, chunks: list, checkpoint_dir: str):
        from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy

        self.dir = iteration_dir(checkpoint_dir)
        self.ssds = [unwrap(c).sharded_state_dict() for c in chunks]
        adapt_request({str(i): ssd for i, ssd in enumerate(self.ssds)}, self.dir)
        self.strategy = TorchDistLoadShardedStrategy()
        self.values: dict[int, torch.Tensor] = {}

    def materialize(self, group: list[LocalParam]) -> None:
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.dict_utils import nested_values
        from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

        sub = {}
        for lp in group:
            if lp.tied:
                continue
            entry = self.ssds[lp.chunk][lp.name]
            # megatron zeroes the tensors whose shape may differ (padded vocab) before loading
            real = torch.empty(lp.param.shape, dtype=lp.param.dtype)
            self.values[id(lp)] = real
            if isinstance(entry, ShardedTensorFactory):
                built = dataclasses.replace(entry, data=real).build()
                for i, sh in enumerate(nested_values(built)):
                    sub[f"{lp.chunk}/{lp.name}#{i}"] = _unprepended(sh, sh.data)
            else:
                d = entry.data
                sub[f"{lp.chunk}/{lp.name}"] = _unprepended(entry, real.as_strided(d.size(), d.stride(),
                                                                                   d.storage_offset()))
        dist_checkpointing.load(sub, self.dir, sharded_strategy=self.strategy, validate_access_integrity=False)

    def tensor(self, lp: LocalParam) -> torch.Tensor:
        return self.values[id(lp)]

    def release(self, group: list[LocalParam]) -> None:
        for lp in group:
            self.values.pop(id(lp), None)
