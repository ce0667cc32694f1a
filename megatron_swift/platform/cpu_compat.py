"""Runs megatron-core 0.16.x on a machine without CUDA, between ``init_parallel`` and ``destroy_parallel``.

megatron-core assumes CUDA in a handful of ways (measured in shared/notes/megatron-core-on-cpu.md):
it asks ``torch.cuda.current_device()`` for the device of new tensors, passes ``device="cuda"``
literally to tensor factories and ``.cuda()``/``.to("cuda")``, keeps per-region "CUDA" RNG
states, asserts ``tensor.type() == "torch.cuda.FloatTensor"`` in the optimizer, records streams
and events, and references TE-only symbols in MoE code. ``install()`` bridges them and
``uninstall()`` puts everything back:

* ``_CudaToCpuMode`` is a ``TorchFunctionMode`` (thread-local: the thread that initialised the
  parallel state, where megatron runs). It rewrites every CUDA device argument of a torch call to
  CPU and turns ``Tensor.cuda()``/``pin_memory()`` into no-ops; one mode catches all ~175 call
  sites instead of patching each. ``Tensor.type()`` answers with the CUDA spelling only to
  megatron's optimizer modules, the code that asserts on it; everyone else (transformers, vLLM)
  sees the true CPU type name.
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
import logging
import sys
import threading

import torch
from typing import Optional

from torch.overrides import TorchFunctionMode

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
    this function, then ``__torch_function__``)."""
    caller = sys._getframe(2).f_globals.get("__name__", "")
    return caller.startswith(_ASKS_FOR_CUDA_TYPE_NAMES)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA placement in torch calls to CPU (see module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.autograd.backward or func is torch.Tensor.backward:
            return self._backward(func, args, kwargs)
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and "dtype" not in kwargs and _megatron_asks():
            tensor = args[0]
            return _CUDA_TYPE_NAMES.get(tensor.dtype, func(*args, **kwargs))
        if func is torch.Tensor.is_pinned:
            return False
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device=_CPU)
        if kwargs.get("pin_memory"):
            kwargs = dict(kwargs, pin_memory=False)
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU) + tuple(args[2:])
        return func(*args, **kwargs)

    def _backward(self, func, args, kwargs):
        """Runs autograd with this mode active.

        A mode is popped while its handler runs, so ``torch.autograd.backward`` called through
        the handler would run every custom ``Function.backward`` (megatron's TP/SP collectives
        allocate buffers there) without the CUDA->CPU rewrite. Calling autograd's engine directly
        with the mode re-entered keeps it active for the whole backward pass.
        """
        from torch.autograd import _make_grads, _tensor_or_tensors_to_tuple
        from torch.autograd.graph import _engine_run_backward

        if func is torch.Tensor.backward:
            names = ("tensors", "grad_tensors", "retain_graph", "create_graph", "inputs")
            call = dict(zip(names, args))
            call.update(kwargs)
            if "gradient" in call:
                call["grad_tensors"] = call.pop("gradient")
        else:
            names = ("tensors", "grad_tensors", "retain_graph", "create_graph", "grad_variables", "inputs")
            call = dict(zip(names, args))
            call.update(kwargs)
        tensors = call["tensors"]
        tensors = (tensors,) if isinstance(tensors, torch.Tensor) else tuple(tensors)
        inputs = call.get("inputs")
        if inputs is None:
            inputs = ()
        elif isinstance(inputs, torch.Tensor):
            inputs = (inputs,)
        else:
            inputs = tuple(inputs)
        create_graph = bool(call.get("create_graph") or False)
        retain_graph = call.get("retain_graph")
        retain_graph = create_graph if retain_graph is None else retain_graph
        with self:
            grads = _make_grads(tensors, _tensor_or_tensors_to_tuple(call.get("grad_tensors"), len(tensors)),
                                is_grads_batched=False)
            _engine_run_backward(tensors, grads, retain_graph, create_graph, inputs,
                                 allow_unreachable=True, accumulate_grad=True)
        return None


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
        self.mode: Optional[_CudaToCpuMode] = None

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
    """Installs the CPU compatibility layer in this thread (idempotent). ``init_parallel`` calls it."""
    global _installed
    with _install_lock:
        if _installed is not None:
            return
        installed = _Installed()
        for name, value in _cuda_stand_ins().items():
            installed.patch(torch.cuda, name, value)
        for name, value in _nvtx_stand_ins().items():
            installed.patch(torch.cuda.nvtx, name, value)
        _patch_megatron(installed)
        logging.getLogger("megatron.core.tensor_parallel.random").addFilter(_FORK_WARNING_FILTER)
        installed.mode = _CudaToCpuMode()
        installed.mode.__enter__()
        _installed = installed


def uninstall() -> None:
    """Puts back everything ``install`` replaced (``destroy_parallel`` calls it)."""
    global _installed
    with _install_lock:
        if _installed is None:
            return
        installed, _installed = _installed, None
        # torch's mode stack is LIFO; another mode pushed on top of ours (a caller's own) must be
        # exited first, or popping would remove theirs
        top = torch._C._get_function_stack_at(torch._C._len_torch_function_stack() - 1) \
            if torch._C._len_torch_function_stack() else None
        if top is not installed.mode:
            _installed = installed
            raise RuntimeError("cpu_compat.uninstall: another TorchFunctionMode was entered after the CPU "
                               "layer and is still active; exit it first")
        installed.mode.__exit__(None, None, None)
        installed.restore()
        logging.getLogger("megatron.core.tensor_parallel.random").removeFilter(_FORK_WARNING_FILTER)


def is_installed() -> bool:
    return _installed is not None
