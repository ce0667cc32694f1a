"""The collectives the converters use, on the platform's device.

NCCL only takes tensors on the GPU, while the converters read and write weights in host memory
(safetensors slices, the shard writer). Every collective of the conversion goes through here: the
tensors are moved to the platform device for the collective and come back on the CPU, so the same
code runs over gloo (CPU) and NCCL (GPU). tests/test_convert.py checks that nothing else in
``converters/`` calls ``torch.distributed`` collectives directly.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def device() -> torch.device:
    from megatron_swift.platform import get_platform

    return get_platform().device


def gather(tensor: torch.Tensor, group, size: int, dst_is_me: bool) -> Optional[list]:
    """``dist.gather`` to the group's first rank; the list (on the CPU) there, None elsewhere."""
    if size == 1:
        return [tensor]
    on_device = tensor.contiguous().to(device())
    dst = dist.get_global_rank(group, 0)
    out = [torch.empty_like(on_device) for _ in range(size)] if dst_is_me else None
    dist.gather(on_device, out, dst=dst, group=group)
    return [t.cpu() for t in out] if out is not None else None


def all_gather_list(tensor: torch.Tensor, group, size: int) -> list:
    """Every group rank's tensor, in group-rank order (on the CPU), on every rank."""
    if size == 1:
        return [tensor]
    on_device = tensor.contiguous().to(device())
    parts = [torch.empty_like(on_device) for _ in range(size)]
    dist.all_gather(parts, on_device, group=group)
    return [t.cpu() for t in parts]


def all_gather_object(obj, group) -> list:
    """Every group rank's (picklable) ``obj``, in group-rank order."""
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def max_int(value: int, group=None) -> int:
    t = torch.tensor([int(value)], dtype=torch.int64, device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t.item())


def min_int(value: int, group=None) -> int:
    t = torch.tensor([int(value)], dtype=torch.int64, device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return int(t.item())


def all_gather_cat(tensor: torch.Tensor, group, dim: int = -1) -> torch.Tensor:
    """Concatenation of every group rank's tensor along ``dim`` (on the CPU)."""
    on_device = tensor.contiguous().to(device())
    parts = [torch.empty_like(on_device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, on_device, group=group)
    return torch.cat(parts, dim=dim).cpu()


def broadcast(tensor: Optional[torch.Tensor], src: int, shape, dtype, group=None) -> torch.Tensor:
    """``tensor`` from global rank ``src`` to every rank of ``group`` (default: all; on the CPU)."""
    buffer = (tensor.contiguous().to(device()) if tensor is not None
              else torch.empty(shape, dtype=dtype, device=device()))
    dist.broadcast(buffer, src=src, group=group)
    return buffer.cpu()
