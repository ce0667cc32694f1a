"""2 ranks: the shared-memory process group against gloo on the same ranks; prints one JSON line
on rank 0. Scenarios (argv[1]): ``ops`` every collective vs gloo, ``mismatch`` ranks calling
different collectives, ``peer_exit`` rank 1 exits before a collective, ``timeout`` rank 1 never
arrives, ``megatron`` megatron's tensor-parallel group after init_parallel."""
import datetime
import json
import os
import sys
import time

import torch
import torch.distributed as dist

from megatron_swift.platform import shm_group

scenario = sys.argv[1]


def shm_files() -> list:
    return sorted(f for f in os.listdir("/dev/shm") if f.startswith("megatron_swift_"))


def report(result: dict) -> None:
    if dist.get_rank() == 0:
        print(json.dumps(result), flush=True)


def compare_ops(shm, gloo, backend) -> dict:
    """Each collective on both groups with the same inputs; names of those that differ."""
    rank, size = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(1234 + rank)
    differ, calls = [], 0

    def check(name, run):
        nonlocal calls
        a, b = run(gloo), run(shm)
        calls += 1
        if not all(torch.equal(x, y) for x, y in zip(a, b, strict=True)):
            differ.append(name)

    def inputs(n, dtype):
        if dtype.is_floating_point:
            return torch.randn(n, generator=gen).to(dtype)
        return torch.randint(-1000, 1000, (n,), generator=gen).to(dtype)

    # sizes that alternate between the two slot parities, tiny to near the slot size
    for round_ in range(40):
        n = [1, 7, 94422, 3, 1 << 16][round_ % 5] * (1 + round_ % 3)
        for dtype in (torch.float32, torch.bfloat16, torch.float64, torch.int64):
            x = inputs(n, dtype)
            for op in (dist.ReduceOp.SUM, dist.ReduceOp.MAX, dist.ReduceOp.MIN, dist.ReduceOp.PRODUCT):
                if op == dist.ReduceOp.PRODUCT and dtype.is_floating_point:
                    x_ = x.clamp(-1.5, 1.5)
                else:
                    x_ = x

                def all_reduce(group, x_=x_, op=op):
                    y = x_.clone()
                    dist.all_reduce(y, op=op, group=group)
                    return [y]
                check(f"all_reduce {op} {dtype} {n}", all_reduce)

            def gather(group, x=x):
                out = torch.full((size * x.numel(),), 7, dtype=x.dtype)
                dist.all_gather_into_tensor(out, x, group=group)
                return [out]
            check(f"all_gather_into_tensor {dtype} {n}", gather)

            def scatter(group, x=x):
                full = torch.cat([x] * size) + rank
                out = torch.empty(x.numel(), dtype=x.dtype)
                dist.reduce_scatter_tensor(out, full, group=group)
                return [out]
            check(f"reduce_scatter_tensor {dtype} {n}", scatter)

            for root in range(size):
                def broadcast(group, x=x, root=root):
                    y = x.clone()
                    dist.broadcast(y, group_src=root, group=group)
                    return [y]
                check(f"broadcast from {root} {dtype} {n}", broadcast)

    # larger than a slot (several slots and a remainder): chunked through shared memory, not gloo
    handed_to_gloo = sum(backend.fallbacks.values())
    big = torch.randn(shm_group.SEGMENT_BYTES // 4 + 3, generator=gen)
    for dtype, op in ((torch.float32, dist.ReduceOp.SUM), (torch.bfloat16, dist.ReduceOp.MAX),
                      (torch.float64, dist.ReduceOp.SUM)):
        def big_all_reduce(group, dtype=dtype, op=op):
            y = big.to(dtype)
            dist.all_reduce(y, op=op, group=group)
            return [y]
        check(f"all_reduce {op} {dtype} larger than a slot", big_all_reduce)

    def big_broadcast(group):
        y = big.clone()
        dist.broadcast(y, group_src=1, group=group)
        return [y]
    check("broadcast larger than a slot", big_broadcast)
    big_through_gloo = sum(backend.fallbacks.values()) - handed_to_gloo

    # through gloo inside the shared-memory group: lists, objects, strided tensors

    strided = torch.randn(64, 8, generator=gen).t()

    def strided_broadcast(group):
        y = strided.clone()  # keeps the transposed strides
        assert not y.is_contiguous()
        dist.broadcast(y, group_src=1, group=group)
        return [y]
    check("broadcast of a non-contiguous tensor", strided_broadcast)

    def gather_list(group):
        out = [torch.empty(5) for _ in range(size)]
        dist.all_gather(out, torch.full((5,), float(rank)), group=group)
        return out
    check("all_gather (list)", gather_list)

    def gather_object(group):
        out = [None] * size
        dist.all_gather_object(out, {"rank": rank, "text": "x" * rank}, group=group)
        return [torch.tensor([o["rank"] for o in out])]
    check("all_gather_object", gather_object)

    def async_all_reduce(group):
        y = torch.arange(10.0) * (rank + 1)
        work = dist.all_reduce(y, group=group, async_op=True)
        work.wait()
        return [y]
    check("all_reduce async_op", async_all_reduce)

    def in_autograd_graph(group):  # as the naive log-softmax of test_rlhf_logprobs does
        x = torch.linspace(-1, 1, 6, dtype=torch.float64).requires_grad_(True)
        y = x.exp() * (rank + 1)
        dist.all_reduce(y, group=group)
        y.log().sum().backward()
        return [y.detach(), x.grad]
    check("all_reduce of a tensor in an autograd graph", in_autograd_graph)

    def coalesced(group):
        ys = [torch.arange(4.0) + rank, torch.arange(3.0) * rank]
        dist.all_reduce_coalesced(ys, group=group)
        return ys
    check("all_reduce_coalesced", coalesced)

    dist.barrier(group=shm)
    return {"differ": differ, "calls": calls, "big_through_gloo": big_through_gloo,
            "through_gloo": dict(backend.fallbacks)}


def main() -> None:
    timeout = datetime.timedelta(seconds=float(os.environ.get("SHM_TEST_TIMEOUT", "60")))
    dist.init_process_group("gloo", timeout=timeout)
    rank = dist.get_rank()
    if scenario == "megatron":
        from megatron.core import parallel_state

        from megatron_swift.platform import ParallelLayout, destroy_parallel, init_parallel

        init_parallel(ParallelLayout(tensor_model_parallel_size=2))
        tp = parallel_state.get_tensor_model_parallel_group()
        backend = dist.get_backend(tp)
        y = torch.full((3,), float(rank + 1))
        dist.all_reduce(y, group=tp)
        report({"backend": backend, "sum": y.tolist(), "tp_ranks": dist.get_process_group_ranks(tp),
                "files": shm_files()})
        destroy_parallel()
        return
    created = []  # the group objects this rank builds (their gloo hand-off counts)
    build = shm_group._create
    shm_group._create = lambda *args: created.append(build(*args)) or created[-1]
    shm_group.register()
    shm = dist.new_group([0, 1], backend=shm_group.BACKEND_NAME, timeout=timeout)
    files_after_setup = shm_files()
    if scenario == "ops":
        report({**compare_ops(shm, dist.group.WORLD, created[0]), "files": files_after_setup,
                "backend": dist.get_backend(shm)})
    elif scenario == "mismatch":
        try:
            if rank == 0:
                dist.all_reduce(torch.ones(4), group=shm)
            else:
                dist.broadcast(torch.ones(4), group_src=0, group=shm)
            report({"error": None})
        except RuntimeError as exc:
            report({"error": str(exc)})
    elif scenario in ("peer_exit", "timeout"):
        dist.all_reduce(torch.ones(4), group=shm)  # both alive
        if rank == 1:
            if scenario == "timeout":  # alive, but never calls the next collective
                time.sleep(float(os.environ["SHM_TEST_TIMEOUT"]) + 4)
            os._exit(0)
        start = time.monotonic()
        try:
            dist.all_reduce(torch.ones(4), group=shm)
            report({"error": None})
        except RuntimeError as exc:
            report({"error": str(exc), "seconds": time.monotonic() - start})
        os._exit(0)  # the default group's peer is gone (or late): no orderly teardown
    dist.destroy_process_group()


main()
