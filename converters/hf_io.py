"""Streaming safetensors I/O: read only the slices a rank needs, write tensors straight into
pre-planned shard files.

Reading (:class:`HFCheckpoint`): the shard headers (a few KB each) give every tensor's dtype,
shape and byte range; a read of rows ``[a, b)`` of a row-major tensor is ONE ``os.pread`` of
exactly those bytes. Column slices read the covering row range and slice it. Nothing is
memory-mapped, so a process's resident memory is the tensors it is converting, not the files it
has touched. This is ours rather than safetensors' ``safe_open().get_slice`` because that maps the
file: a slice is a view into the mapping (it must be copied out before the file closes; reading it
after returned other data) and the mapped pages count towards RSS while it is open. Measured with
scripts/bench_convert.py (2 GB model, 2 writer threads), HF -> mcore peaked at 1.14x-1.70x the
largest shard through get_slice + copy and 0.77x-0.79x with pread (docs/conversion.md).

Writing (:class:`ShardPlan`, :class:`ShardWriter`): every rank knows the full list of output
tensors (names, shapes, dtype) before any data exists, so ``huggingface_hub`` splits them into
shard files (its names and index) and every tensor's byte offset is fixed up front. Rank 0
creates the files; whichever rank holds a finished tensor ``pwrite``s it at its offset (thread
pool, ``--thread_count``). safetensors' writers need a file's whole state dict in memory, so
writing into a planned file at an offset is ours; no shard is ever assembled in memory.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import queue
import re
import struct
import threading
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from .mapping import Source, Stacked, format_key

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: Union[str, int]) -> int:
    """``"5GB"`` -> 5_000_000_000 (decimal units like transformers; KiB/MiB/GiB are binary, which
    huggingface_hub's private parse_size_to_int does not accept)."""
    if isinstance(size, int):
        return size
    m = _SIZE.match(str(size))
    if not m:
        raise ValueError(f"max_shard_size: expected a size like 5GB or 500MB, got {size!r}")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])


# ----------------------------------------------------------------------------------------- reading

@dataclass(frozen=True)
class TensorInfo:
    file: str  # absolute path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: str) -> dict[str, TensorInfo]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        size = os.fstat(f.fileno()).st_size
        if n > size - 8:
            raise ValueError(f"{path}: not a safetensors file (header length {n} > file size {size})")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ValueError(f"{path}: corrupt safetensors header ({e})") from None
    header.pop("__metadata__", None)
    base = 8 + n
    out = {}
    for key, info in header.items():
        dtype = DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: tensor {key} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        if base + end > size:
            raise ValueError(f"{path}: tensor {key} ends at byte {base + end}, past the end of the file "
                             f"({size} bytes): the file is truncated")
        out[key] = TensorInfo(path, dtype, tuple(info["shape"]), base + begin, end - begin)
    return out


def _pread_exact(fd: int, nbytes: int, offset: int) -> bytearray:
    buf = bytearray(nbytes)
    view = memoryview(buf)
    done = 0
    while done < nbytes:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise OSError(f"short read at byte {offset + done}")
        done += n
    return buf


class HFCheckpoint:
    """The safetensors weights of a Hugging Face model directory, read lazily."""

    def __init__(self, model_dir: str):
        self.dir = os.path.abspath(model_dir)
        if not os.path.isdir(self.dir):
            raise FileNotFoundError(f"HF model directory {model_dir!r} does not exist")
        self.files = self._find_files()
        self.tensors: dict[str, TensorInfo] = {}
        for path in self.files:
            for key, info in read_header(path).items():
                self.tensors[key] = info
        if self._weight_map is not None:
            for key, file in self._weight_map.items():
                if key not in self.tensors:
                    raise ValueError(f"{os.path.join(self.dir, INDEX_FILE)}: tensor {key} is listed in {file} "
                                     f"but {file} does not contain it")
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def _find_files(self) -> list[str]:
        self._weight_map = None
        index = os.path.join(self.dir, INDEX_FILE)
        if os.path.isfile(index):
            with open(index) as f:
                self._weight_map = json.load(f).get("weight_map") or {}
            names = sorted(set(self._weight_map.values()))
            missing = [n for n in names if not os.path.isfile(os.path.join(self.dir, n))]
            if missing:
                raise FileNotFoundError(
                    f"{index} lists {len(missing)} shard file(s) that do not exist: {', '.join(missing)}")
            return [os.path.join(self.dir, n) for n in names]
        single = os.path.join(self.dir, SINGLE_FILE)
        if os.path.isfile(single):
            return [single]
        files = sorted(glob.glob(os.path.join(self.dir, "*.safetensors")))
        if files:
            return files
        others = sorted(os.path.basename(p) for p in glob.glob(os.path.join(self.dir, "*.bin"))
                        + glob.glob(os.path.join(self.dir, "*.pt")) + glob.glob(os.path.join(self.dir, "*.pth")))
        hint = f" (found {', '.join(others)}: only safetensors weights are supported; convert them with " \
               f"transformers' save_pretrained(safe_serialization=True))" if others else ""
        raise FileNotFoundError(f"no safetensors weights in {self.dir}: expected {INDEX_FILE}, {SINGLE_FILE} "
                                f"or *.safetensors{hint}")

    @property
    def total_bytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())

    def _fd(self, path: str) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = self._fds[path] = os.open(path, os.O_RDONLY)
            return fd

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    # -------------------------------------------------------------------------- source lookup

    def resolve(self, source: Source, layer: Optional[int], expert: Optional[int]):
        """(key, TensorInfo, Stacked-or-None) of the first layout of ``source`` the checkpoint has."""
        key = format_key(source.key, layer, expert)
        if key in self.tensors:
            return key, self.tensors[key], None
        for alt in source.alternatives:
            if isinstance(alt, Stacked):
                k = format_key(alt.key, layer, expert)
                if k in self.tensors:
                    return k, self.tensors[k], alt
            else:
                k = format_key(alt, layer, expert)
                if k in self.tensors:
                    return k, self.tensors[k], None
        return None

    def require(self, source: Source, layer: Optional[int], expert: Optional[int],
                expected_shape: Optional[Sequence[int]] = None):
        found = self.resolve(source, layer, expert)
        if found is None:
            key = format_key(source.key, layer, expert)
            alts = [format_key(a.key if isinstance(a, Stacked) else a, layer, expert) for a in source.alternatives]
            also = f" (nor {', '.join(alts)})" if alts else ""
            raise ValueError(f"tensor {key} is missing from the checkpoint in {self.dir}{also}")
        key, info, stacked = found
        if expected_shape is not None:
            shape = self._logical_shape(info, stacked, key)
            if tuple(shape) != tuple(expected_shape):
                name = key if stacked is None else f"{key}[{expert}] part {stacked.part}"
                raise ValueError(f"shape mismatch for {name} ({os.path.basename(info.file)}): checkpoint has "
                                 f"{list(shape)}, the model config expects {list(expected_shape)}")
        return key, info, stacked

    @staticmethod
    def _logical_shape(info: TensorInfo, stacked: Optional[Stacked], key: str) -> tuple[int, ...]:
        if stacked is None:
            return info.shape
        if len(info.shape) != 3 or info.shape[1] % stacked.parts:
            raise ValueError(f"{key}: expected a [num_experts, {stacked.parts} x rows, cols] tensor, got "
                             f"{list(info.shape)}")
        return (info.shape[1] // stacked.parts, info.shape[2])

    # ------------------------------------------------------------------------------- reading

    def read(self, source: Source, layer: Optional[int], expert: Optional[int], expected_shape: Sequence[int],
             index: tuple) -> torch.Tensor:
        """``tensor[index]`` of an HF source (``index``: one slice per dim), reading only its rows."""
        key, info, stacked = self.require(source, layer, expert, expected_shape)
        shape = tuple(expected_shape)
        row_offset = 0
        if stacked is not None:
            rows_per_expert = info.shape[1]
            row_offset = expert * rows_per_expert + stacked.part * shape[0]
        return self._read_rows(info, shape, row_offset, index)

    def _read_rows(self, info: TensorInfo, shape: tuple, row_offset: int, index: tuple) -> torch.Tensor:
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        if not shape:  # a scalar
            return self._read_bytes(info, 0, info.nbytes, ()).clone()
        r0, r1, step = index[0].indices(shape[0])
        if step != 1:
            raise ValueError("strided reads are not supported")
        row_elems = 1
        for s in shape[1:]:
            row_elems *= s
        itemsize = torch.empty((), dtype=info.dtype).element_size()
        row_bytes = row_elems * itemsize
        start = (row_offset + r0) * row_bytes
        rows = self._read_bytes(info, start, (r1 - r0) * row_bytes, (r1 - r0, *shape[1:]))
        rest = index[1:]
        if all(s == slice(None) for s in rest):
            return rows
        return rows[(slice(None), *rest)].clone()

    def _read_bytes(self, info: TensorInfo, start: int, nbytes: int, shape: tuple) -> torch.Tensor:
        if nbytes == 0:
            return torch.empty(shape, dtype=info.dtype)
        buf = _pread_exact(self._fd(info.file), nbytes, info.start + start)
        return torch.frombuffer(buf, dtype=torch.uint8).view(info.dtype).reshape(shape)


# ----------------------------------------------------------------------------------------- writing

@dataclass(frozen=True)
class PlannedTensor:
    key: str
    shape: tuple[int, ...]
    file: str  # file name inside the output dir
    offset: int  # absolute byte offset in the file
    nbytes: int


def _header_bytes(entries: list[tuple[str, tuple, int, int]], dtype_name: str) -> bytes:
    header = {"__metadata__": {"format": "pt"}}
    for key, shape, begin, end in entries:
        header[key] = {"dtype": dtype_name, "shape": list(shape), "data_offsets": [begin, end]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return raw


class ShardPlan:
    """Where every output tensor goes: ``huggingface_hub``'s split into shard files of at most
    ``max_shard_size`` bytes (a larger tensor gets a shard of its own; its file names), in the given
    order, plus each tensor's byte offset in its file."""

    def __init__(self, tensors: Sequence[tuple[str, Sequence[int]]], dtype: torch.dtype, max_shard_size: int):
        from huggingface_hub import split_torch_state_dict_into_shards

        self.dtype = dtype
        shapes = {key: tuple(int(s) for s in shape) for key, shape in tensors}
        # meta tensors: huggingface_hub sizes them from shape and dtype, nothing is allocated
        split = split_torch_state_dict_into_shards(
            {key: torch.empty(shape, dtype=dtype, device="meta") for key, shape in shapes.items()},
            filename_pattern=SINGLE_FILE.replace(".safetensors", "{suffix}.safetensors"),
            max_shard_size=max_shard_size)
        self.files: dict[str, tuple[bytes, int]] = {}  # name -> (header, total file size)
        self.tensors: dict[str, PlannedTensor] = {}
        for name, keys in split.filename_to_tensors.items():
            entries, pos = [], 0
            for key in keys:
                n = math.prod(shapes[key]) * dtype.itemsize
                entries.append((key, shapes[key], pos, pos + n))
                pos += n
            header = _header_bytes(entries, DTYPE_NAMES[dtype])
            base = 8 + len(header)
            self.files[name] = (struct.pack("<Q", len(header)) + header, base + pos)
            for key, shape, begin, end in entries:
                self.tensors[key] = PlannedTensor(key, shape, name, base + begin, end - begin)
        self.total_size = sum(t.nbytes for t in self.tensors.values())

    @property
    def sharded(self) -> bool:
        return len(self.files) > 1

    def create_files(self, out_dir: str) -> None:
        for name, (header, size) in self.files.items():
            with open(os.path.join(out_dir, name), "wb") as f:
                f.write(header)
                f.truncate(size)

    def index(self) -> dict:
        return {"metadata": {"total_size": self.total_size},
                "weight_map": {key: t.file for key, t in sorted(self.tensors.items())}}


class ShardWriter:
    """Writes finished tensors into the planned files with ``threads`` writer threads.

    ``submit`` blocks while ``threads`` tensors are waiting, which bounds the memory held by
    tensors in flight. Errors in a writer thread surface at the next ``submit`` or at ``close``.
    """

    def __init__(self, plan: ShardPlan, out_dir: str, threads: int = 1):
        self.plan = plan
        self.dir = out_dir
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, threads))
        self._error: Optional[BaseException] = None
        self.written: set[str] = set()
        self._threads = [threading.Thread(target=self._run, daemon=True, name=f"shard-writer-{i}")
                         for i in range(max(1, threads))]
        for t in self._threads:
            t.start()

    def _fd(self, name: str) -> int:
        with self._lock:
            fd = self._fds.get(name)
            if fd is None:
                fd = self._fds[name] = os.open(os.path.join(self.dir, name), os.O_WRONLY)
            return fd

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self._write(*item)
            except BaseException as e:  # reported to the submitting thread
                self._error = e
            finally:
                self._queue.task_done()

    def _write(self, key: str, tensor: torch.Tensor) -> None:
        planned = self.plan.tensors[key]
        data = tensor.detach().to("cpu", self.plan.dtype).contiguous()  # live GPU weights too
        if tuple(data.shape) != planned.shape:
            raise ValueError(f"{key}: tensor shape {list(data.shape)} != planned {list(planned.shape)}")
        raw = memoryview(data.view(-1).view(torch.uint8).numpy()) if data.numel() else memoryview(b"")
        fd = self._fd(planned.file)
        done = 0
        while done < planned.nbytes:
            done += os.pwrite(fd, raw[done:], planned.offset + done)
        with self._lock:
            self.written.add(key)

    def submit(self, key: str, tensor: torch.Tensor) -> None:
        if self._error is not None:
            raise self._error
        if key not in self.plan.tensors:
            raise KeyError(f"{key} is not in the shard plan")
        self._queue.put((key, tensor))

    def close(self) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join()
        with self._lock:
            for fd in self._fds.values():
                os.fsync(fd)
                os.close(fd)
            self._fds.clear()
        if self._error is not None:
            raise self._error
