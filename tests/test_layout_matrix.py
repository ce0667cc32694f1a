"""Parallel layouts through `megatron sft` on long-tailed chat data vs one process (CI subset).

Oracle: the same command as ONE process. Each case trains 3 steps of a tiny dense Qwen3 or a tiny
Qwen3-MoE (8 experts, top 2, load-balancing loss on) with micro batches of different token counts
on every rank; loss, gradient norm and load-balancing loss must equal the single process's within
1e-5 relative at every step. The full matrix (every layout x padded / padding-free / packed) is
scripts/layout_matrix.py, its table docs/layouts.md.

Cases that crashed or differed before: MoE EP2 with data parallelism (gloo size mismatch in the
allgather dispatcher), PP2 with padding-free micro batch 2 (wrong p2p shape), TP2+SP with the
load-balancing loss (router-loss gradient scaled by 1/TP).
"""

from __future__ import annotations


import sys

import pytest

from helpers import REPO

pytestmark = pytest.mark.slow

sys.path.insert(0, str(REPO / "scripts"))
import layout_matrix  # noqa: E402  (scripts/layout_matrix.py: the matrix this test runs a subset of)


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    return layout_matrix.Matrix(str(tmp_path_factory.mktemp("layout_matrix")))


@pytest.mark.parametrize("model,batch,layout", layout_matrix.CI_CASES,
                         ids=["-".join(case) for case in layout_matrix.CI_CASES])
def test_layout_equals_single_process(matrix, model, batch, layout):
    result = matrix.case(model, batch, layout)
    assert len(result["losses"]) == 3
    assert result["ok"], result
