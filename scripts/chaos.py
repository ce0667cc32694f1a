"""Chaos test: kill `megatron sft` at random moments, resume each time, and check nothing was lost.

A 2-process run (TP 2 + SP, padding-free, checkpoints every step) is SIGKILLed as a whole (launcher,
torchrun, workers, checkpoint writers: a node lost or an OOM kill) after a random delay, so kills
land mid-step, mid-save and mid-publish; then it is resumed with --load = --save. After every kill:
the tracker names a complete checkpoint, no published checkpoint disappeared or changed, and the
tracker never moved backwards. At the end: the logged loss of every iteration (each once) and the
final weights equal an uninterrupted run's.

    .venv/bin/python scripts/chaos.py --out output/chaos --kills 20      # the long form (docs/reliability.md)
    .venv/bin/python scripts/chaos.py --out output/chaos --kills 3       # what tests/test_chaos.py runs
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ITERS = 14


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(paths: dict, save: str, resume: bool) -> list:
    cmd = [sys.executable, "-m", "megatron_swift.cli.main", "sft", "--model", paths["model"], "--dataset",
           paths["dataset"], "--micro_batch_size", "2", "--global_batch_size", "4", "--train_iters", str(ITERS),
           "--lr", "1e-3", "--lr_warmup_iters", "2", "--log_interval", "1", "--save", save, "--add_version", "false",
           "--save_interval", "1", "--split_dataset_ratio", "0", "--tensor_model_parallel_size", "2",
           "--sequence_parallel", "true"]
    return cmd + (["--load", save] if resume else [])


def start(cmd: list, log) -> subprocess.Popen:
    env = dict(os.environ, NPROC_PER_NODE="2", MASTER_PORT=str(_port()), OMP_NUM_THREADS="1",
               PYTHONWARNINGS="ignore")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def check_no_orphans(save: str, timeout: float = 10.0) -> None:
    """torchrun's workers run in sessions of their own: killing the launcher's process group must
    still end them (they die with torchrun, which dies with the launcher)."""
    import psutil

    deadline = time.time() + timeout
    while True:
        left = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if save in " ".join(p.info["cmdline"] or []) and p.status() != psutil.STATUS_ZOMBIE:
                    left.append(p)
            except psutil.Error:
                continue
        if not left or time.time() > deadline:
            break
        time.sleep(0.2)
    for p in left:
        p.kill()
    if left:
        raise AssertionError(f"processes of the killed run outlived it: {[p.pid for p in left]}")


def published(save: str) -> dict:
    """name -> checksum of every published checkpoint directory (``.tmp`` ones are not published)."""
    out = {}
    for entry in sorted(os.listdir(save)) if os.path.isdir(save) else []:
        path = os.path.join(save, entry)
        if entry.startswith("iter_") and not entry.endswith(".tmp") and os.path.isdir(path):
            h = hashlib.sha256()
            for root, _, files in sorted(os.walk(path)):
                for name in sorted(files):
                    with open(os.path.join(root, name), "rb") as f:
                        h.update(name.encode() + f.read())
            out[entry] = h.hexdigest()
    return out


def check_nothing_lost(save: str, before: dict, last_tracker: int) -> tuple[dict, int]:
    from megatron_swift.checkpoint import layout

    now = published(save)
    for name, digest in before.items():
        if now.get(name) != digest:
            raise AssertionError(f"checkpoint {name} was {'changed' if name in now else 'lost'} by a kill")
    ref = layout.resolve(save)  # raises if the tracker names something incomplete
    tracker = ref.iteration if ref else 0
    if tracker < last_tracker:
        raise AssertionError(f"the tracker moved backwards: {last_tracker} -> {tracker}")
    return now, tracker


def final_tensors(save: str) -> dict:
    from megatron.core.dist_checkpointing.serialization import load_plain_tensors

    from megatron_swift.checkpoint import layout
    from megatron_swift.platform import init_distributed

    init_distributed()  # dist-checkpointing reads through a (here: one-process) group
    return load_plain_tensors(layout.resolve(save).directory)


def logged(save: str) -> list:
    with open(os.path.join(save, "logging.jsonl")) as f:
        return [(r["iteration"], r["loss"]) for r in map(json.loads, f) if "loss" in r]


def run(out: str, kills: int, seed: int = 0) -> dict:
    from megatron_swift.demo import prepare

    os.makedirs(out, exist_ok=True)
    paths = prepare(os.path.join(out, "demo"))
    rng = random.Random(seed)
    reference = os.path.join(out, "reference")
    shutil.rmtree(reference, ignore_errors=True)
    with open(os.path.join(out, "reference.log"), "w") as log:
        if start(command(paths, reference, False), log).wait() != 0:
            raise RuntimeError(f"the uninterrupted run failed (see {out}/reference.log)")
    save = os.path.join(out, "chaos")
    shutil.rmtree(save, ignore_errors=True)
    before, tracker, events = {}, 0, []
    with open(os.path.join(out, "chaos.log"), "w") as log:
        for k in range(kills):
            proc = start(command(paths, save, resume=tracker > 0), log)
            delay = rng.uniform(6.0, 16.0)  # start-up is ~6 s; then a step or a save every few tenths
            try:
                proc.wait(timeout=delay)
                finished = True
            except subprocess.TimeoutExpired:
                finished = False
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                check_no_orphans(save)
            before, tracker = check_nothing_lost(save, before, tracker)
            events.append({"kill": k + 1, "after_s": round(delay, 2), "finished_first": finished,
                           "tracker_after": tracker, "partial": sorted(e for e in os.listdir(save) if e.endswith(".tmp"))
                           if os.path.isdir(save) else []})
            if finished:
                break
        proc = start(command(paths, save, resume=tracker > 0), log)
        if proc.wait() != 0:
            raise RuntimeError(f"the final resume failed (see {out}/chaos.log)")
    check_nothing_lost(save, before, tracker)
    ours, theirs = logged(save), logged(reference)
    if [i for i, _ in ours] != list(range(1, ITERS + 1)):
        raise AssertionError(f"logging.jsonl iterations after the kills: {[i for i, _ in ours]}")
    worst_loss = max(abs(a - b) for (_, a), (_, b) in zip(ours, theirs))
    a, b = final_tensors(save), final_tensors(reference)
    if sorted(a) != sorted(b):
        raise AssertionError("the final checkpoints hold different tensors")
    worst_weight = max(float((a[k].float() - b[k].float()).abs().max()) for k in a if hasattr(a[k], "float"))
    result = {"kills": len(events), "events": events, "max_loss_diff": worst_loss, "max_weight_diff": worst_weight}
    with open(os.path.join(out, "chaos.json"), "w") as f:
        json.dump(result, f, indent=1)
    if worst_loss > 1e-5 or worst_weight > 1e-5:
        raise AssertionError(f"the resumed run differs from the uninterrupted one: {result}")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="output/chaos")
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    result = run(os.path.abspath(args.out), args.kills, args.seed)
    print(json.dumps({k: v for k, v in result.items() if k != "events"}))
    for e in result["events"]:
        print(e)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    raise SystemExit(main())
