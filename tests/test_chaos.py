"""The chaos test's short form: three kills at random moments of a 2-process run, resumed each time.

Oracle: the uninterrupted run (losses of every iteration, final weights) and the file system (no
published checkpoint lost or changed, the tracker never naming an incomplete one or moving back).
scripts/chaos.py runs the long form (docs/reliability.md).
"""

from __future__ import annotations

import sys

import pytest

from helpers import REPO

pytestmark = pytest.mark.slow

sys.path.insert(0, str(REPO / "scripts"))
import chaos  # noqa: E402  (scripts/chaos.py)


def test_random_kills_lose_nothing_and_change_nothing(tmp_path):
    result = chaos.run(str(tmp_path), kills=3, seed=1)
    assert result["max_loss_diff"] <= 1e-5 and result["max_weight_diff"] <= 1e-5
    assert result["kills"] >= 1
