"""scripts/gpu_check.py in its dry mode: every step of the GPU check runs its code on a CPU.

The GPU run itself needs a lent GPU (docs/gpu.md); this keeps the script from rotting between those
runs. In dry mode both "platform" and "local" builds use the local spec, so the step comparisons
(TE vs local logits, checkpoint keys, packed vs padded attention, export precision, SFT losses) check
the plumbing and the oracles, and a failing step here is a broken script, not a GPU finding.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import REPO

pytestmark = pytest.mark.slow


def test_gpu_check_dry_run_passes_every_step(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--out", str(tmp_path), "--dry"],
                          capture_output=True, text=True, timeout=900)
    records = [json.loads(line) for line in (tmp_path / "gpu_check.jsonl").read_text().splitlines()]
    failed = {r["step"]: r.get("error") for r in records if not r.get("ok")}
    assert not failed, f"{failed}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0
    steps = [r["step"] for r in records]
    assert steps == ["env", "specs", "te_vs_local", "thd", "export", "checkpoint", "sft", "throughput"], steps
    # the table a reader pastes into docs/gpu.md
    assert "| step | ok | seconds | result |" in proc.stdout
