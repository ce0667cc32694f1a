"""2 ranks, 2 intra-op threads each: megatron's all-gather (the distributed optimizer's parameter
gather) through the CPU workaround vs gloo's own; prints one JSON line on rank 0."""
import json
import os

import torch
import torch.distributed as dist

from megatron_swift.platform import destroy_parallel, init_parallel


def threads() -> int:
    return len(os.listdir(f"/proc/{os.getpid()}/task"))


torch.set_num_threads(2)
init_parallel()
from megatron.core.distributed import param_and_grad_buffer  # noqa: E402

rank, size = dist.get_rank(), dist.get_world_size()
torch.mm(torch.randn(256, 256), torch.randn(256, 256))  # the training thread's own team exists
shard = torch.randn(1 << 20, generator=torch.Generator().manual_seed(rank))
shard[0] = -0.0
ours, gloo = torch.empty(size * shard.numel()), torch.empty(size * shard.numel())
in_place = torch.full((size * shard.numel(),), float("nan"))
in_place.chunk(size)[rank].copy_(shard)  # the parameter buffer gathers into itself

before = threads()
param_and_grad_buffer.dist_all_gather_func(ours, shard, group=dist.group.WORLD)
param_and_grad_buffer.dist_all_gather_func(in_place, in_place.chunk(size)[rank], group=dist.group.WORLD)
handle = param_and_grad_buffer.dist_all_gather_func(ours, shard, group=dist.group.WORLD, async_op=True)
handle.wait()
after_ours = threads()
param_and_grad_buffer.dist_all_gather_func._megatron_swift_original(gloo, shard, group=dist.group.WORLD)
after_gloo = threads()
if rank == 0:
    print(json.dumps({"same": bool(torch.equal(ours, gloo)), "in_place_same": bool(torch.equal(in_place, gloo)),
                      "threads_started_by_ours": after_ours - before,
                      "threads_started_by_gloo": after_gloo - after_ours}))
destroy_parallel()
