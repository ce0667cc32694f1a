"""The shared-memory tensor-parallel process group (platform/shm_group.py), on 2 real processes:
every collective bit-identical to gloo on the same ranks, ranks out of step or gone raise an error
that says so (not a hang, not garbage), and megatron's TP group uses it after init_parallel."""
import json
from pathlib import Path

from helpers import torchrun

WORKER = Path(__file__).parent / "parallel" / "shm_group_worker.py"


def run(scenario: str) -> dict:
    proc = torchrun(WORKER, 2, [scenario])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_collective_equals_gloo_and_no_file_is_left():
    result = run("ops")
    assert result["backend"] == "megatron_swift_shm"
    assert result["calls"] > 1000, result["calls"]  # 40 rounds x 4 dtypes x (4 reduce ops + 4 others) + fallbacks
    assert result["differ"] == [], result["differ"]
    assert result["big_through_gloo"] == 0, result["through_gloo"]  # chunked through shared memory
    assert result["through_gloo"].get("broadcast", 0) >= 1, result["through_gloo"]  # a strided tensor still does
    assert result["files"] == [], "the shared segment must be unlinked once every rank has mapped it"


def test_ranks_calling_different_collectives_get_an_error_naming_both():
    error = run("mismatch")["error"]
    assert error and "out of step" in error and "all_reduce" in error and "broadcast" in error, error


def test_a_peer_that_exits_is_reported_not_waited_for():
    result = run("peer_exit")
    assert result["error"] and "closed its connection" in result["error"], result
    assert result["seconds"] < 30, result


def test_a_peer_that_never_arrives_times_out(monkeypatch):
    monkeypatch.setenv("SHM_TEST_TIMEOUT", "3")
    result = run("timeout")
    assert result["error"] and "timed out after 3s" in result["error"], result
    assert 2.5 < result["seconds"] < 20, result


def test_megatron_tensor_parallel_group_runs_over_shared_memory():
    result = run("megatron")
    assert result["backend"] == "megatron_swift_shm" and result["tp_ranks"] == [0, 1], result
    assert result["sum"] == [3.0, 3.0, 3.0] and result["files"] == [], result


def test_tensor_parallel_group_stays_gloo_when_switched_off(monkeypatch):
    monkeypatch.setenv("MEGATRON_SWIFT_SHM_TP", "0")
    result = run("megatron")
    assert result["backend"] == "gloo" and result["sum"] == [3.0, 3.0, 3.0], result
