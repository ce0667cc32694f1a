"""The one place that knows which machine we run on.

``get_platform()`` decides once per process: CUDA + NCCL when a GPU is visible, otherwise CPU +
gloo. No other module in megatron_swift asks "am I on CPU?". Code that needs
the device or a capability asks the platform object instead (``platform.device``,
``platform.has_transformer_engine``, ``platform.adjust_model_config``).

``init_parallel(...)`` creates the default process group (from torchrun's env vars, or a
private single-process group), megatron's model-parallel groups and the RNG tracker. On CPU it
also installs the compatibility layer (``cpu_compat``) that lets megatron-core's CUDA-only code
paths run; ``destroy_parallel()`` removes it again, so code after it (or transformers and vLLM in
the same process) sees plain torch.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import socket
import warnings
from dataclasses import dataclass
from functools import cached_property
from typing import Optional

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

# megatron-core warns at import whenever TE/apex are missing; that is the expected state on CPU
# and the fallbacks are what we test, so the warning is noise in every command's output.
warnings.filterwarnings("ignore", message=r"Transformer Engine and Apex are not installed")
warnings.filterwarnings("ignore", message=r"Apex is not installed")


@dataclass(frozen=True)
class Platform:
    device_type: str  # "cuda" or "cpu"
    backend: str  # "nccl" or "gloo"

    @property
    def is_cuda(self) -> bool:
        return self.device_type == "cuda"

    @property
    def device(self) -> torch.device:
        if self.is_cuda:
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    @cached_property
    def has_transformer_engine(self) -> bool:
        if not self.is_cuda:
            return False
        try:
            import transformer_engine.pytorch  # noqa: F401
        except ImportError as exc:
            if getattr(exc, "name", "") != "transformer_engine":  # installed but broken: say why, once
                logger.warning("Transformer Engine is installed but does not import (%s: %s); using megatron's "
                               "local layer spec without fused kernels", type(exc).__name__, exc)
            return False
        except Exception as exc:  # TE raises more than ImportError when its CUDA libraries mismatch
            logger.warning("Transformer Engine is installed but does not import (%s: %s); using megatron's local "
                           "layer spec without fused kernels", type(exc).__name__, exc)
            return False
        return True

    @cached_property
    def has_apex_gradient_accumulation(self) -> bool:
        """NVIDIA apex's fused_weight_gradient_mlp_cuda, which megatron's own linears (the output
        layer too, whatever the layer spec) need for gradient-accumulation fusion."""
        if not self.is_cuda:
            return False
        try:
            import fused_weight_gradient_mlp_cuda  # noqa: F401
        except ImportError:
            return False
        return True

    def kernel_defaults(self, fields: dict) -> dict:
        """Fusions this machine has, for the TransformerConfig fields the run left to it."""
        te = self.has_transformer_engine
        experts = fields.get("num_moe_experts") or 0
        local_experts = experts // max(fields.get("expert_model_parallel_size", 1) or 1, 1)
        return {
            "masked_softmax_fusion": te,
            "bias_dropout_fusion": self.is_cuda,  # megatron's jit-fused kernel
            "bias_activation_fusion": self.is_cuda,
            "apply_rope_fusion": te,
            # on CPU kernels/wgrad.py stands in for apex's extension (mcore_compat installs it)
            "gradient_accumulation_fusion": self.has_apex_gradient_accumulation or not self.is_cuda,
            "moe_grouped_gemm": te and local_experts > 1,
        }

    def adjust_model_fields(self, fields: dict) -> list[str]:
        """Fills the fusions the run left to the machine (by capability) and replaces settings this
        machine cannot run; returns one line per decision for the log.

        Called on the field dict before ``TransformerConfig`` is constructed (its validation rejects
        fusions whose kernels are missing). Explicit requests for missing kernels were refused before
        workers started (``args/support.py``). On CPU, batched p2p (``batch_isend_irecv``) over gloo
        delivered wrong activations to later microbatches in the interleaved (virtual) pipeline
        schedule with tied embeddings (measured: microbatches 3+ differed from a single process);
        unbatched p2p matches exactly.
        """
        changes = []
        for name, available in self.kernel_defaults(fields).items():
            if name not in fields:
                fields[name] = available
                if available:
                    changes.append(f"{name} on (available here)")
        if self.is_cuda:
            return changes

        def force(name, value, why):
            if fields.get(name) not in (None, value):
                changes.append(f"{name} {fields.get(name)} -> {value} ({why})")
            fields[name] = value

        force("batch_p2p_comm", False, "batched p2p over gloo misroutes interleaved-pipeline messages")
        for flag in ("bias_activation_fusion", "bias_dropout_fusion",
                     "masked_softmax_fusion", "apply_rope_fusion", "persist_layer_norm",
                     "moe_permute_fusion", "moe_grouped_gemm"):
            force(flag, False, "no fused kernels on CPU")
        return changes


_PLATFORM: Optional[Platform] = None

# megatron-core messages that describe its internals on every run (bucket member lists, config
# dumps, the rerun state machine); shown with --logging_level DEBUG
_CHATTY_LOGGERS = ("megatron.core",)
_NOISY_WARNINGS = (
    r"If you are using transformer_engine as the transformer implementation",  # wrong on the local spec
    r"full scope is deprecated",
    r"The \.grad attribute of a Tensor that is not a leaf Tensor",
    r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated",
)


class _DropInfoAsWarning(logging.Filter):
    """megatron-core's rerun state machine warns when it starts in the (default) disabled mode."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("Rerun State Machine" in message or "RerunStateMachine initialized" in message)


def quiet_megatron_logs(level: int) -> None:
    """megatron-core's internal chatter goes to DEBUG; our own lines (one per layout decision) stay."""
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(level if level <= logging.DEBUG else max(level, logging.WARNING))
    if level > logging.DEBUG:
        logging.getLogger("megatron.core.rerun_state_machine").addFilter(_DropInfoAsWarning())
    if level > logging.DEBUG:
        for pattern in _NOISY_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)


def get_platform() -> Platform:
    """Decides CUDA+NCCL or CPU+gloo once per process. ``MEGATRON_SWIFT_DEVICE=cpu`` forces CPU."""
    global _PLATFORM
    if _PLATFORM is None:
        forced = os.environ.get("MEGATRON_SWIFT_DEVICE", "").lower()
        use_cuda = torch.cuda.is_available() and forced != "cpu"
        if forced == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("MEGATRON_SWIFT_DEVICE=cuda but torch sees no CUDA device")
        _PLATFORM = Platform("cuda", "nccl") if use_cuda else Platform("cpu", "gloo")
        from . import mcore_compat

        for name in mcore_compat.install(_PLATFORM.device_type):
            logger.debug("megatron-core workaround installed: %s", name)
    return _PLATFORM


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


DEFAULT_TIMEOUT_SECONDS = 18000000  # ms-swift's --ddp_timeout default


def init_distributed(timeout_seconds: int = DEFAULT_TIMEOUT_SECONDS, backend: Optional[str] = None) -> Platform:
    """Creates the default process group (idempotent).

    Under torchrun the env vars (RANK, WORLD_SIZE, MASTER_ADDR/PORT) describe the job; a plain
    ``python`` process gets a private world of size 1 so megatron-core's collectives still work.
    ``timeout_seconds`` bounds every collective (``--ddp_timeout``): rank 0 may preprocess a large
    dataset or download a model while the others wait in a barrier. ``backend`` (``--distributed_backend``)
    defaults to the platform's (nccl on GPU, gloo on CPU).
    """
    platform = get_platform()
    if not platform.is_cuda:
        from . import cpu_compat

        cpu_compat.install()  # until destroy_parallel
    if dist.is_initialized():
        return platform
    timeout = datetime.timedelta(seconds=timeout_seconds)
    backend = backend or platform.backend
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        if platform.is_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend=backend, timeout=timeout)
    else:
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://127.0.0.1:{_free_port()}",
            rank=0,
            world_size=1,
            timeout=timeout,
        )
    return platform


@dataclass(frozen=True)
class ParallelLayout:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    context_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: Optional[int] = None

    @classmethod
    def from_args(cls, args) -> "ParallelLayout":
        """From parsed arguments (the parallel sizes users give, named as in SPEC.md)."""
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})

    def data_parallel_size(self, world_size: int) -> int:
        model_parallel = (
            self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size
        )
        if world_size % model_parallel:
            raise ValueError(
                f"world size {world_size} is not divisible by tensor_model_parallel_size x "
                f"pipeline_model_parallel_size x context_parallel_size = {model_parallel}"
            )
        return world_size // model_parallel


def init_parallel(layout: ParallelLayout = ParallelLayout(), seed: int = 42,
                  timeout_seconds: int = DEFAULT_TIMEOUT_SECONDS, backend: Optional[str] = None) -> Platform:
    """Default process group + megatron's model-parallel groups + seeded RNG tracker.

    Re-initialising with a different layout in the same process is allowed (tests do it): the
    old megatron groups are destroyed first.
    """
    from megatron.core import parallel_state

    platform = init_distributed(timeout_seconds, backend)
    layout.data_parallel_size(dist.get_world_size())  # raises a clear error on a bad layout
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor_model_parallel_size,
        pipeline_model_parallel_size=layout.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=layout.virtual_pipeline_model_parallel_size,
        context_parallel_size=layout.context_parallel_size,
        expert_model_parallel_size=layout.expert_model_parallel_size,
        expert_tensor_parallel_size=layout.expert_tensor_parallel_size,
        distributed_timeout_minutes=max(1, timeout_seconds // 60),  # megatron's sub-groups: the same timeout
    )
    if not platform.is_cuda:
        from . import shm_group

        shm_group.use_for_tensor_parallel(datetime.timedelta(seconds=timeout_seconds))
    seed_everything(seed)
    return platform


def seed_everything(seed: int) -> None:
    """Seeds python/numpy/torch and megatron's per-region RNG tracker (TP/EP offsets)."""
    import random

    import numpy as np
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def destroy_parallel() -> None:
    from megatron.core import parallel_state

    from . import cpu_compat

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    cpu_compat.uninstall()
