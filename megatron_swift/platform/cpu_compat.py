"""Runs megatron-core 0.16.x on a machine without CUDA, between ``init_parallel`` and ``destroy_parallel``.

megatron-core assumes CUDA in a handful of ways (measured in shared/notes/megatron-core-on-cpu.md):
it asks ``torch.cuda.current_device()`` for the device of new tensors, passes ``device="cuda"``
literally to tensor factories and ``.cuda()``/``.to("cuda")``, keeps per-region "CUDA" RNG
states, asserts ``tensor.type() == "torch.cuda.FloatTensor"`` in the optimizer, records streams
and events, and references TE-only symbols in MoE code. ``install()`` bridges them and
``uninstall()`` puts everything back:

* torch's tensor factories (``torch.empty``, ``zeros``, ``tensor``, ``arange``, ... and
  ``Tensor.new_*``) read a CUDA ``device=`` as CPU and ``pin_memory=True`` as False;
  ``Tensor.to("cuda")`` stays on CPU and ``Tensor.cuda()``/``pin_memory()`` return the tensor.
  Patching these ~40 names catches megatron's ~175 call sites, process-wide while installed (its
  dist-checkpointing threads too), and costs nothing on the other torch calls of a step (a
  ``TorchFunctionMode`` did the same for every call, ~2 us each: ~8% of a small model's step).
  ``Tensor.type()`` answers with the CUDA spelling only to megatron's optimizer modules, the code
  that asserts on it; everyone else (transformers, vLLM) sees the true CPU type name.
* ``torch.cuda`` helpers that would raise on a CPU build (``current_device``, ``synchronize``,
  streams, events, memory stats, RNG) get CPU stand-ins. ``torch.cuda.is_available()`` stays
  False and ``device_count()`` 0, so megatron's and transformers' own "no CUDA" fallbacks
  (dist-checkpointing, straggler detector, TE probes, device maps) keep working.
* megatron's "CUDA" RNG tracker keeps its states on the CPU default generator, so
  ``model_parallel_cuda_manual_seed`` and ``tracker.fork()`` seed and restore what CPU ops use.

Only ``megatron_swift.platform`` imports this module. It is tested against the pinned
megatron-core (tests/test_platform.py); a version bump must re-run those tests.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
import threading

import torch
from typing import Optional

_CPU = torch.device("cpu")
_install_lock = threading.Lock()
_installed: "Optional[_Installed]" = None

# the modules whose dtype checks compare Tensor.type() with CUDA type names (megatron-core 0.16:
# optimizer.py, distrib_optimizer.py, clip_grads.py)
_ASKS_FOR_CUDA_TYPE_NAMES = ("megatron.core.optimizer",)


def _is_cuda_device(device) -> bool:
    if device is None:
        return False
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int is how CUDA code names a GPU ("device=torch.cuda.current_device()").
    return isinstance(device, int) and not isinstance(device, bool)


_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
    torch.int64: "torch.cuda.LongTensor",
    torch.int32: "torch.cuda.IntTensor",
    torch.uint8: "torch.cuda.ByteTensor",
    torch.bool: "torch.cuda.BoolTensor",
}


def _megatron_asks() -> bool:
    """Whether ``Tensor.type()`` was called from megatron's optimizer (the caller is two frames up:
    this function, then the ``Tensor.type`` stand-in)."""
    caller = sys._getframe(2).f_globals.get("__name__", "")
    return caller.startswith(_ASKS_FOR_CUDA_TYPE_NAMES)


# torch factories that take ``device=`` / ``pin_memory=`` (torch 2.x; what a TorchFunctionMode
# would see of megatron's allocations), and the Tensor methods that place tensors
_FACTORIES = ("arange", "as_tensor", "asarray", "empty", "empty_like", "empty_permuted", "empty_strided", "eye",
              "full", "full_like", "linspace", "logspace", "ones", "ones_like", "rand", "rand_like", "randint",
              "randint_like", "randn", "randn_like", "randperm", "range", "scalar_tensor", "sparse_coo_tensor",
              "tensor", "tril_indices", "triu_indices", "zeros", "zeros_like")
_NEW_METHODS = ("new_empty", "new_empty_strided", "new_full", "new_ones", "new_tensor", "new_zeros")


def _placing_on_cpu(factory):
    """``factory`` with a CUDA ``device=`` read as CPU and ``pin_memory`` off."""

    @functools.wraps(factory)
    def on_cpu(*args, **kwargs):
        if kwargs:
            if _is_cuda_device(kwargs.get("device")):
                kwargs["device"] = _CPU
            if kwargs.get("pin_memory"):
                kwargs["pin_memory"] = False
        return factory(*args, **kwargs)

    return on_cpu


def _tensor_stand_ins() -> dict:
    """``torch.Tensor`` attribute -> its CPU version."""
    to, type_ = torch.Tensor.to, torch.Tensor.type

    def to_on_cpu(self, *args, **kwargs):
        if args and _is_cuda_device(args[0]):
            args = (_CPU,) + args[1:]
        if kwargs and _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = _CPU
        return to(self, *args, **kwargs)

    def type_for_megatron(self, *args, **kwargs):
        if not args and "dtype" not in kwargs and _megatron_asks():
            return _CUDA_TYPE_NAMES.get(self.dtype) or type_(self)
        return type_(self, *args, **kwargs)

    stand_ins = {"to": functools.wraps(to)(to_on_cpu), "type": functools.wraps(type_)(type_for_megatron),
                 "cuda": lambda self, *args, **kwargs: self, "pin_memory": lambda self, *args, **kwargs: self,
                 "is_pinned": lambda self, *args, **kwargs: False}
    for name in _NEW_METHODS:
        stand_ins[name] = _placing_on_cpu(getattr(torch.Tensor, name))
    return stand_ins


class _NullStream:
    """Stands in for torch.cuda.Stream/ExternalStream: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, event=None):
        return event or _NullEvent()

    def synchronize(self):
        pass

    def query(self):
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _NullEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _returning(value):
    """A fresh stub per patched name: torch._dynamo keys its trace rules by function object and
    refuses one object registered under two torch names."""

    def stub(*args, **kwargs):
        return value

    return stub


def _cuda_stand_ins() -> dict:
    """``torch.cuda`` attribute -> its CPU stand-in."""
    stand_ins = {
        # A device object, not an index, so `device=current_device()` means CPU even where no mode
        # is active (other threads).
        "current_device": _returning(_CPU),
        "set_device": _returning(None),
        "synchronize": _returning(None),
        "empty_cache": _returning(None),
        "Stream": _NullStream,
        "ExternalStream": _NullStream,
        "Event": _NullEvent,
        "current_stream": lambda *a, **k: _NullStream(),
        "default_stream": lambda *a, **k: _NullStream(),
        "stream": lambda *a, **k: contextlib.nullcontext(),
        "set_stream": _returning(None),
        "memory_stats": lambda *a, **k: {},
        "reset_peak_memory_stats": _returning(None),
        # "CUDA" RNG == the CPU default generator. torch.manual_seed() calls cuda.manual_seed_all,
        # so that one stays torch's own (a lazy no-op without CUDA) to avoid recursion.
        "get_rng_state": lambda device="cuda": torch.get_rng_state(),
        "set_rng_state": lambda new_state, device="cuda": torch.set_rng_state(new_state),
        "manual_seed": lambda seed: torch.default_generator.manual_seed(int(seed)),
    }
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved"):
        stand_ins[name] = _returning(0)
    return stand_ins


def _nvtx_stand_ins() -> dict:
    return {"range_push": _returning(None), "range_pop": _returning(None),
            "range": lambda *a, **k: contextlib.nullcontext()}


class _Installed:
    """What ``install`` replaced, to put back."""

    def __init__(self):
        self.patched: list[tuple[object, str, object]] = []  # (owner, name, original)

    def patch(self, owner, name: str, value) -> None:
        self.patched.append((owner, name, getattr(owner, name, _MISSING)))
        setattr(owner, name, value)

    def restore(self) -> None:
        for owner, name, original in reversed(self.patched):
            if original is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, original)
        self.patched.clear()


_MISSING = object()


def _patch_megatron(installed: _Installed) -> None:
    from megatron.core.tensor_parallel import random as mcore_random
    from megatron.core.transformer.moe import moe_utils

    def get_rng_state(device="cuda", clone=False, graph_safe=False):
        state = torch.get_rng_state()
        return state.clone() if clone else state

    def set_rng_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    installed.patch(mcore_random, "_get_cuda_rng_state", get_rng_state)
    installed.patch(mcore_random, "_set_cuda_rng_state", set_rng_state)
    # moe_utils names te_general_gemm only when TE imports (NameError otherwise).
    if not hasattr(moe_utils, "te_general_gemm"):
        installed.patch(moe_utils, "te_general_gemm", None)


class _DropForkWarning(logging.Filter):
    """tracker.fork() warns whenever the CPU RNG moved inside a "GPU" RNG region; on CPU the two
    generators are one, so the warning would fire on every dropout and means nothing here."""

    def filter(self, record):
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


_FORK_WARNING_FILTER = _DropForkWarning()


def install() -> None:
    """Installs the CPU compatibility layer (idempotent). ``init_parallel`` calls it."""
    global _installed
    with _install_lock:
        if _installed is not None:
            return
        installed = _Installed()
        for name, value in _cuda_stand_ins().items():
            installed.patch(torch.cuda, name, value)
        for name, value in _nvtx_stand_ins().items():
            installed.patch(torch.cuda.nvtx, name, value)
        # torch.device("meta") as a context (transformers' from_pretrained) recognises factories by
        # identity in a set it caches on first use: it must hold torch's own functions
        from torch.utils._device import _device_constructors

        _device_constructors()
        for name in _FACTORIES:
            installed.patch(torch, name, _placing_on_cpu(getattr(torch, name)))
        for name, value in _tensor_stand_ins().items():
            installed.patch(torch.Tensor, name, value)
        _patch_megatron(installed)
        logging.getLogger("megatron.core.tensor_parallel.random").addFilter(_FORK_WARNING_FILTER)
        _installed = installed


def uninstall() -> None:
    """Puts back everything ``install`` replaced (``destroy_parallel`` calls it)."""
    global _installed
    with _install_lock:
        if _installed is None:
            return
        installed, _installed = _installed, None
        installed.restore()
        logging.getLogger("megatron.core.tensor_parallel.random").removeFilter(_FORK_WARNING_FILTER)


def is_installed() -> bool:
    return _installed is not None
