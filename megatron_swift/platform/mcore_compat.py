"""Workarounds for megatron-core / torch behaviour, each gated on the versions it is needed for.

Every workaround is one function here, registered with the megatron-core version range it was
written against and the platforms it applies to. ``install(platform)`` applies the ones that fit the
installed versions and returns their names (the platform logs them). Each has a test in
tests/test_platform.py that reproduces the upstream behaviour without the workaround, so a
megatron-core bump shows at once which ones can go.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

logger = logging.getLogger(__name__)


def megatron_core_version() -> tuple:
    from megatron.core import package_info

    return tuple(int(p) for p in package_info.__shortversion__.split(".")[:3])


@dataclass(frozen=True)
class Workaround:
    name: str
    why: str
    min_version: tuple  # inclusive
    max_version: tuple  # exclusive
    platforms: tuple  # device types ("cpu", "cuda") it applies to
    apply: Callable[[], None]

    def applies(self, device_type: str, version: Optional[tuple] = None) -> bool:
        version = version or megatron_core_version()
        return device_type in self.platforms and self.min_version <= version < self.max_version


# --------------------------------------------------------------------------------- workarounds

def _alltoall_split_sizes_as_lists() -> None:
    """The alltoall MoE dispatcher moves its split sizes to host memory as numpy arrays only when
    they live on CUDA (``maybe_move_tensor_to_cpu``: ``if tensor.is_cuda``); on CPU they stay
    tensors and ``all_to_all_single`` rejects them (TypeError in the binding). Turning CPU tensors
    into numpy arrays where megatron asks for numpy gives gloo what NCCL gets."""
    import torch
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    original = moe_utils.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy: bool = False, record_stream: bool = False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


WORKAROUNDS: tuple[Workaround, ...] = (
    Workaround("alltoall_split_sizes_as_lists", _alltoall_split_sizes_as_lists.__doc__,
               (0, 14, 0), (0, 17, 0), ("cpu",), _alltoall_split_sizes_as_lists),
)

_applied: set[str] = set()


def install(device_type: str) -> list[str]:
    """Applies the workarounds for this platform and megatron-core version (idempotent)."""
    version = megatron_core_version()
    names = []
    for workaround in WORKAROUNDS:
        if workaround.name in _applied or not workaround.applies(device_type, version):
            continue
        workaround.apply()
        _applied.add(workaround.name)
        names.append(workaround.name)
    return names
