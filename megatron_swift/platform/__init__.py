"""The one place that knows which machine we run on.

``get_platform()`` decides once per process: CUDA + NCCL when a GPU is visible, otherwise CPU +
gloo. On CPU it installs the compatibility layer (``cpu_compat``) that lets megatron-core's
CUDA-only code paths run; no other module in megatron_swift asks "am I on CPU?". Code that needs
the device or a capability asks the platform object instead (``platform.device``,
``platform.has_transformer_engine``, ``platform.adjust_model_config``).

``init_parallel(...)`` creates the default process group (from torchrun's env vars, or a
private single-process group), megatron's model-parallel groups and the RNG tracker.
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
        except Exception:  # TE raises more than ImportError when its CUDA libs mismatch
            return False
        return True

    def adjust_model_fields(self, fields: dict) -> list[str]:
        """Replaces TransformerConfig settings this machine cannot run; returns what changed.

        Called on the field dict before ``TransformerConfig`` is constructed (its validation
        rejects fusions whose kernels are missing). On CPU: no fused kernels (TE/apex/triton);
        batched p2p (``batch_isend_irecv``) over gloo delivered wrong activations to later
        microbatches in the interleaved (virtual) pipeline schedule with tied embeddings
        (measured: microbatches 3+ differed from a single process), unbatched p2p matches exactly.
        """
        changes = []
        if self.is_cuda:
            return changes

        def force(name, value, why):
            if fields.get(name) not in (None, value):
                changes.append(f"{name} {fields.get(name)} -> {value} ({why})")
            fields[name] = value

        force("batch_p2p_comm", False, "batched p2p over gloo misroutes interleaved-pipeline messages")
        for flag in ("gradient_accumulation_fusion", "bias_activation_fusion", "bias_dropout_fusion",
                     "masked_softmax_fusion", "apply_rope_fusion", "persist_layer_norm",
                     "moe_permute_fusion", "moe_grouped_gemm", "cross_entropy_loss_fusion"):
            force(flag, False, "no fused kernels on CPU")
        return changes


_PLATFORM: Optional[Platform] = None


def get_platform() -> Platform:
    """Decides CUDA+NCCL or CPU+gloo once per process. ``MEGATRON_SWIFT_DEVICE=cpu`` forces CPU."""
    global _PLATFORM
    if _PLATFORM is None:
        forced = os.environ.get("MEGATRON_SWIFT_DEVICE", "").lower()
        use_cuda = torch.cuda.is_available() and forced != "cpu"
        if forced == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("MEGATRON_SWIFT_DEVICE=cuda but torch sees no CUDA device")
        if use_cuda:
            _PLATFORM = Platform("cuda", "nccl")
        else:
            from . import cpu_compat

            cpu_compat.install()
            _PLATFORM = Platform("cpu", "gloo")
        from . import mcore_compat

        for name in mcore_compat.install(_PLATFORM.device_type):
            logger.debug("megatron-core workaround installed: %s", name)
    return _PLATFORM


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(timeout_minutes: int = 30) -> Platform:
    """Creates the default process group (idempotent).

    Under torchrun the env vars (RANK, WORLD_SIZE, MASTER_ADDR/PORT) describe the job; a plain
    ``python`` process gets a private world of size 1 so megatron-core's collectives still work.
    """
    platform = get_platform()
    if dist.is_initialized():
        return platform
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        if platform.is_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend=platform.backend, timeout=timeout)
    else:
        dist.init_process_group(
            backend=platform.backend,
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


def init_parallel(layout: ParallelLayout = ParallelLayout(), seed: int = 42) -> Platform:
    """Default process group + megatron's model-parallel groups + seeded RNG tracker.

    Re-initialising with a different layout in the same process is allowed (tests do it): the
    old megatron groups are destroyed first.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    platform = init_distributed()
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
    )
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

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
