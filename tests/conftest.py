"""Shared fixtures (helpers for launching processes are in helpers.py)."""

import pytest


@pytest.fixture(scope="session")
def megatron_world1():
    """This pytest process as a world of size 1 with megatron's parallel state initialised."""
    from megatron_swift.platform import ParallelLayout, init_parallel

    return init_parallel(ParallelLayout(), seed=1234)
