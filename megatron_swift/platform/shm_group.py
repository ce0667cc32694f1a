"""A same-host tensor-parallel process group over shared memory (CPU only).

Over gloo every tensor-parallel collective costs ~1-1.5 ms on this class of machine however small
the tensor (TCP loopback round trips through gloo's worker threads), and a TP=2 step of the CPU
benchmark issues ~28 of them. When all ranks of a group live on one host, the data need not move
through sockets at all: each rank writes its tensor into its own slot of one shared-memory
segment, tells every peer "written" with a few bytes over a Unix socket, waits for the same from
every peer, and then reads the peers' slots directly. Gloo has no shared-memory transport for
this, and torch ships no other CPU backend, which is why this is written here.

Correctness rules:
- Every collective is a full exchange (every rank signals every rank), so each one is also a
  barrier. Slots are double-buffered: a rank writes slot ``n % 2`` for its n-th collective only
  after every peer signalled collective n-1, which each peer does only after it finished reading
  collective n-2 (the last user of that slot).
- Reductions add the slots in rank order on every rank, so all ranks hold bit-identical results
  (for two ranks: gloo's ``a + b``).
- The signal carries the collective's kind, dtype and size; a peer that called something else
  raises an error naming both calls instead of reading garbage.
- A peer that exits closes its sockets: the waiting rank raises naming the peer and the
  collective; waits are bounded by the group's timeout.
- Tensors are written through ``.data``, as gloo writes them: no autograd record, no version bump
  (a collective on a tensor in an autograd graph behaves as with gloo).
- All-reduces and broadcasts of tensors larger than a slot run as a sequence of slot-sized
  collectives over the flat tensor (each chunk double-buffered like any collective).
- What this group does not implement (other collectives, other reduce ops, non-contiguous tensors,
  all-gathers / reduce-scatters larger than a slot) goes to a gloo group over the same ranks,
  synchronously, so ordering holds.
"""

from __future__ import annotations

import collections
import datetime
import logging
import mmap
import os
import socket
import struct
import uuid

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import _create_work_from_future

logger = logging.getLogger(__name__)

BACKEND_NAME = "megatron_swift_shm"
SEGMENT_BYTES = 32 << 20  # per group: 2 slots x group size
_ALIGN = 64
_SIGNAL = struct.Struct("<BBQ")  # collective kind, dtype code, bytes
_KINDS = {"all_reduce": 1, "all_gather_into_tensor": 2, "reduce_scatter_tensor": 3, "broadcast": 4}
_KIND_NAMES = {v: k for k, v in _KINDS.items()}
_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
           torch.int16, torch.int8, torch.uint8, torch.bool]
_REDUCE = {dist.ReduceOp.SUM: torch.add, dist.ReduceOp.MAX: torch.maximum, dist.ReduceOp.MIN: torch.minimum,
           dist.ReduceOp.PRODUCT: torch.mul}


def _op(opts):
    """The RedOpType of an options object (its ReduceOp does not hash like the enum)."""
    if opts is None:
        return dist.ReduceOp.SUM
    return getattr(opts.reduceOp, "op", opts.reduceOp)


class PeerError(RuntimeError):
    pass


def _done(result) -> "dist.Work":
    fut = torch.futures.Future()
    fut.set_result(result)
    return _create_work_from_future(fut)


class SharedMemoryProcessGroup(dist.ProcessGroup):
    """Collectives of one same-host group through a shared segment; the rest through gloo."""

    def __init__(self, store, rank: int, size: int, timeout: datetime.timedelta):
        super().__init__(rank, size)
        self._rank, self._size = rank, size
        self._timeout = timeout.total_seconds()
        self._gloo = dist.ProcessGroupGloo(dist.PrefixStore("gloo", store), rank, size, timeout)
        self._slot_bytes = (SEGMENT_BYTES // (2 * size)) // _ALIGN * _ALIGN
        self._calls = 0
        self.fallbacks = collections.Counter()  # collectives handed to gloo, by method (tests, debugging)
        self._segment, path = self._map_segment(store)
        try:
            self._peers = self._connect(store)
        finally:
            if rank == 0:
                os.unlink(path)

    # -- set-up ---------------------------------------------------------------------------------
    def _map_segment(self, store) -> tuple[mmap.mmap, str]:
        """Rank 0 creates a file in /dev/shm (space reserved up front: a full tmpfs would otherwise
        kill a rank with SIGBUS on first write); every rank maps it. Rank 0 unlinks it once every
        peer has connected (each maps before connecting), so nothing outlives the processes."""
        if self._rank == 0:
            path = os.path.join("/dev/shm", f"megatron_swift_{uuid.uuid4().hex}")
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            try:
                os.posix_fallocate(fd, 0, SEGMENT_BYTES)
            except OSError:
                os.close(fd)
                os.unlink(path)
                raise
            store.set("segment", path)
        else:
            path = store.get("segment").decode()
            fd = os.open(path, os.O_RDWR)
        try:
            segment = mmap.mmap(fd, SEGMENT_BYTES)
        finally:
            os.close(fd)
        self._bytes = torch.frombuffer(segment, dtype=torch.uint8)
        return segment, path

    def _slot(self, rank: int, parity: int) -> torch.Tensor:
        start = (parity * self._size + rank) * self._slot_bytes
        return self._bytes[start:start + self._slot_bytes]

    def _connect(self, store) -> dict[int, socket.socket]:
        """A Unix socket to every peer (abstract namespace: no file, gone with the process); the
        higher rank connects to the lower one and introduces itself."""
        name = f"\0megatron_swift_{uuid.uuid4().hex}"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(name)
        listener.listen(self._size)
        listener.settimeout(self._timeout)
        store.set(f"addr{self._rank}", name.encode())
        peers = {}
        for lower in range(self._rank):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self._timeout)
            sock.connect(store.get(f"addr{lower}").decode())
            sock.sendall(struct.pack("<I", self._rank))
            peers[lower] = sock
        for _ in range(self._rank + 1, self._size):
            sock, _ = listener.accept()
            sock.settimeout(self._timeout)
            peers[struct.unpack("<I", self._recv(sock, 4, "connect"))[0]] = sock
        listener.close()
        return peers

    # -- the exchange ---------------------------------------------------------------------------
    def _recv(self, sock: socket.socket, n: int, what: str) -> bytes:
        data = b""
        while len(data) < n:
            try:
                chunk = sock.recv(n - len(data))
            except socket.timeout:
                raise PeerError(f"{BACKEND_NAME}: {what} timed out after {self._timeout:.0f}s waiting for a "
                                f"peer of group rank {self._rank}") from None
            except OSError:  # reset: the peer exited with our signal unread
                chunk = b""
            if not chunk:
                raise PeerError(f"{BACKEND_NAME}: a peer of group rank {self._rank} closed its connection during "
                                f"{what} (it exited or crashed; see its log)")
            data += chunk
        return data

    def _exchange(self, kind: str, tensor: torch.Tensor) -> int:
        """Signal every peer that this rank's slot holds collective ``kind``; wait for all peers'
        signals; return the slot parity to read."""
        parity = self._calls % 2
        self._calls += 1
        signal = _SIGNAL.pack(_KINDS[kind], _DTYPES.index(tensor.dtype), tensor.numel() * tensor.element_size())
        for peer, sock in self._peers.items():
            try:
                sock.sendall(signal)
            except OSError as exc:
                raise PeerError(f"{BACKEND_NAME}: group rank {peer} is gone ({exc}) during {kind} "
                                f"(it exited or crashed; see its log)") from None
        for peer, sock in self._peers.items():
            got = self._recv(sock, _SIGNAL.size, kind)
            if got != signal:
                other_kind, other_dtype, other_bytes = _SIGNAL.unpack(got)
                raise PeerError(
                    f"{BACKEND_NAME}: collectives out of step: group rank {self._rank} called {kind} on "
                    f"{tuple(tensor.shape)} {tensor.dtype}, group rank {peer} called "
                    f"{_KIND_NAMES.get(other_kind, other_kind)} on {other_bytes} bytes of "
                    f"{_DTYPES[other_dtype] if other_dtype < len(_DTYPES) else other_dtype}")
        return parity

    def _view(self, rank: int, parity: int, like: torch.Tensor) -> torch.Tensor:
        return self._slot(rank, parity)[:like.numel() * like.element_size()].view(like.dtype)

    def _reduce_slots(self, op, parity: int, like: torch.Tensor, part: slice, out: torch.Tensor) -> None:
        """``out`` = the ranks' slots (elements ``part``) reduced in rank order: the same bits on every rank."""
        reduce = _REDUCE[op]
        reduce(self._view(0, parity, like)[part], self._view(1, parity, like)[part], out=out)
        for rank in range(2, self._size):
            reduce(out, self._view(rank, parity, like)[part], out=out)

    def _shareable(self, *tensors: torch.Tensor) -> bool:
        return all(t.device.type == "cpu" and t.is_contiguous() and t.dtype in _DTYPES for t in tensors)

    def _fits(self, *tensors: torch.Tensor) -> bool:
        return self._shareable(*tensors) and all(t.numel() * t.element_size() <= self._slot_bytes for t in tensors)

    def _chunks(self, tensor: torch.Tensor):
        """The flat tensor in slot-sized views (one view when it fits a slot)."""
        return tensor.view(-1).split(self._slot_bytes // tensor.element_size())

    # -- collectives (the methods torch.distributed calls on a group) -----------------------------
    def allreduce(self, tensors, opts=None):
        op = _op(opts)
        if len(tensors) != 1 or op not in _REDUCE or not self._shareable(tensors[0]) or tensors[0].dtype == torch.bool:
            return self._fallback("allreduce", tensors, opts)
        for chunk in self._chunks(tensors[0].data):
            self._view(self._rank, self._calls % 2, chunk).copy_(chunk)
            parity = self._exchange("all_reduce", chunk)
            self._reduce_slots(op, parity, chunk, slice(None), chunk)
        return _done(tensors)

    def all_gather_single(self, output, input, opts=None):
        if not self._fits(input, output) or output.numel() != input.numel() * self._size or output.dtype != input.dtype:
            return self._fallback("_allgather_base", output, input, opts)
        result, output, input = [output], output.data, input.data
        self._view(self._rank, self._calls % 2, input).copy_(input.view(-1))
        parity = self._exchange("all_gather_into_tensor", input)
        for rank, chunk in enumerate(output.view(-1).chunk(self._size)):
            chunk.copy_(self._view(rank, parity, input))
        return _done(result)

    def reduce_scatter_single(self, output, input, opts=None):
        op = _op(opts)
        if (op not in _REDUCE or not self._fits(input, output) or output.dtype == torch.bool
                or input.numel() != output.numel() * self._size or output.dtype != input.dtype):
            return self._fallback("_reduce_scatter_base", output, input, opts)
        result, output, input = [output], output.data, input.data
        self._view(self._rank, self._calls % 2, input).copy_(input.view(-1))
        parity = self._exchange("reduce_scatter_tensor", input)
        mine = slice(self._rank * output.numel(), (self._rank + 1) * output.numel())
        self._reduce_slots(op, parity, input, mine, output.view(-1))
        return _done(result)

    def broadcast(self, tensors, opts=None):
        root = opts.rootRank if opts is not None else 0
        if len(tensors) != 1 or not self._shareable(tensors[0]):
            return self._fallback("broadcast", tensors, opts)
        for chunk in self._chunks(tensors[0].data):
            if self._rank == root:
                self._view(self._rank, self._calls % 2, chunk).copy_(chunk)
            parity = self._exchange("broadcast", chunk)
            if self._rank != root:
                chunk.copy_(self._view(root, parity, chunk))
        return _done(tensors)

    # Coalesced variants: one collective per tensor (each is cheap here; order is kept).
    def allreduce_coalesced(self, tensors, opts=None):
        for tensor in tensors:
            self.allreduce([tensor], opts)
        return _done(tensors)

    def all_gather_single_coalesced(self, outputs, inputs, opts=None):
        for output, input in zip(outputs, inputs, strict=True):
            self.all_gather_single(output, input, opts)
        return _done(outputs)

    def reduce_scatter_single_coalesced(self, outputs, inputs, opts=None):
        for output, input in zip(outputs, inputs, strict=True):
            self.reduce_scatter_single(output, input, opts)
        return _done(outputs)

    _allgather_base = all_gather_single
    _reduce_scatter_base = reduce_scatter_single
    allgather_into_tensor_coalesced = all_gather_single_coalesced
    reduce_scatter_tensor_coalesced = reduce_scatter_single_coalesced

    def _fallback(self, method: str, *args):
        self.fallbacks[method] += 1
        return _on_gloo(self, method, *[a for a in args if a is not None])

    def getBackendName(self) -> str:
        return BACKEND_NAME

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank

    def shutdown(self) -> None:
        for sock in self._peers.values():
            sock.close()
        self._peers = {}

    def __repr__(self) -> str:
        return f"SharedMemoryProcessGroup(rank={self._rank}, size={self._size})"


def _on_gloo(group: SharedMemoryProcessGroup, gloo_name: str, *args, **kwargs):
    result = getattr(group._gloo, gloo_name)(*args, **kwargs)
    if isinstance(result, dist.Work):
        result.wait()  # keep the order with the shared-memory collectives
    return result


def _through_gloo(name: str, gloo_name: str):
    def call(self, *args, **kwargs):
        return _on_gloo(self, gloo_name, *args, **kwargs)
    call.__name__ = name
    return call


# Collectives this group leaves to gloo (ProcessGroup's own methods would look for a registered
# backend, which a Python group has none of).
for _name, _gloo_name in (("allgather", "allgather"), ("allgather_coalesced", "allgather_coalesced"),
                          ("alltoall", "alltoall"), ("alltoall_base", "alltoall_base"),
                          ("all_to_all_single", "alltoall_base"), ("barrier", "barrier"), ("gather", "gather"),
                          ("monitored_barrier", "monitored_barrier"), ("recv", "recv"),
                          ("recv_anysource", "recv_anysource"), ("reduce", "reduce"),
                          ("reduce_scatter", "reduce_scatter"), ("scatter", "scatter"), ("send", "send")):
    setattr(SharedMemoryProcessGroup, _name, _through_gloo(_name, _gloo_name))


def _create(store, rank, size, timeout):
    return SharedMemoryProcessGroup(store, rank, size, timeout)


def register() -> None:
    if BACKEND_NAME not in dist.Backend.backend_list:
        dist.Backend.register_backend(BACKEND_NAME, _create, devices=["cpu"])


def _host_can_share() -> tuple[tuple, bool]:
    """Where this rank can share: the host, its /dev/shm mount and its network namespace (abstract
    Unix sockets live there), so containers on one host with separate mounts or namespaces do not
    count as one; and whether /dev/shm has room for a segment."""
    try:
        free = os.statvfs("/dev/shm")
        ok = free.f_bavail * free.f_frsize >= 4 * SEGMENT_BYTES
        where = (socket.gethostname(), os.stat("/dev/shm").st_dev, os.stat("/proc/self/ns/net").st_ino)
    except OSError:
        ok, where = False, (socket.gethostname(),)
    return where, ok


def use_for_tensor_parallel(timeout: datetime.timedelta) -> bool:
    """Replace megatron's tensor-parallel group with a shared-memory one where all its ranks share a
    host (every rank takes part: groups are created collectively, in the same order everywhere).
    Returns whether this rank's group was replaced. ``MEGATRON_SWIFT_SHM_TP=0`` keeps gloo."""
    from megatron.core import parallel_state

    if os.environ.get("MEGATRON_SWIFT_SHM_TP", "1") == "0" or parallel_state.get_tensor_model_parallel_world_size() == 1:
        return False
    register()
    mine = tuple(dist.get_process_group_ranks(parallel_state.get_tensor_model_parallel_group()))
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (mine, *_host_can_share()))
    hosts = {rank: (host, ok) for rank, (_, host, ok) in enumerate(everyone)}
    replaced = None
    for ranks in sorted({ranks for ranks, _, _ in everyone}):
        if len({hosts[r][0] for r in ranks}) == 1 and all(hosts[r][1] for r in ranks):
            group = dist.new_group(list(ranks), backend=BACKEND_NAME, timeout=timeout)
            if ranks == mine:
                replaced = group
    if replaced is None:
        logger.info("tensor-parallel group %s stays on gloo (not all on one host with /dev/shm space)", mine)
        return False
    parallel_state._TENSOR_MODEL_PARALLEL_GROUP = replaced
    return True
