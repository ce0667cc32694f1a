"""Shared fixtures (helpers for launching processes are in helpers.py)."""

import os
import sys

import pytest

# The suite is a CPU + gloo suite also on a GPU host: its in-process megatron world, its 2-process jobs
# (NCCL on a 1-GPU host would ask for device 1) and the scripts they run all inherit this. The
# gpu-marked tests drop it for their own subprocess.
os.environ.setdefault("MEGATRON_SWIFT_DEVICE", "cpu")


@pytest.fixture(scope="session")
def megatron_world1():
    """This pytest process as a world of size 1 with megatron's parallel state initialised."""
    from megatron_swift.platform import ParallelLayout, init_parallel

    return init_parallel(ParallelLayout(), seed=1234)


@pytest.fixture(autouse=True)
def _fresh_moe_aux_loss_scale():
    """megatron keeps the MoE aux-loss gradient scale in a class attribute: a bare ``backward()``
    outside its schedules (tests of the model alone) leaves it 0-dim, and a later schedule's
    ``set_loss_scale`` (shape [1]) then fails to copy into it. Each test starts without one, as a
    process does."""
    yield
    moe_utils = sys.modules.get("megatron.core.transformer.moe.moe_utils")
    if moe_utils is not None:
        moe_utils.MoEAuxLossAutoScaler.main_loss_backward_scale = None


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need CUDA (+ Transformer Engine); each has a CPU counterpart that always runs."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (CPU counterpart runs instead)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
