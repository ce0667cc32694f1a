"""Training features through `megatron sft` (real CLI, real runs on the tiny demo model).

Oracles: the uninterrupted run (async checkpoints, epoch caps), `megatron export --to_hf` of the same
checkpoint (the safetensors written during training), token counts computed from the data pipeline
(tokens/s), megatron's own LR schedule (fp16 skipped steps), the file system (rotation).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import torch

from helpers import MEGATRON, REPO, free_port, worker_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from megatron_swift.demo import long_tailed_rows, prepare, write_jsonl

    out = tmp_path_factory.mktemp("features")
    paths = prepare(str(out))
    paths["long"] = write_jsonl(str(out / "long.jsonl"), long_tailed_rows(40, seed=5))
    return paths


def sft(demo, save, *extra, nproc=1, dataset=None, check=True, timeout=600):
    cmd = [*MEGATRON, "sft", "--model", demo["model"], "--dataset", dataset or demo["dataset"],
           "--micro_batch_size", "2", "--global_batch_size", "8", "--lr", "1e-3", "--log_interval", "1",
           "--save", str(save), "--add_version", "false", "--split_dataset_ratio", "0", *map(str, extra)]
    env = worker_env(**({"NPROC_PER_NODE": nproc, "MASTER_PORT": free_port()} if nproc > 1 else {}))
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def rows(save, key="loss") -> list[dict]:
    with open(os.path.join(save, "logging.jsonl")) as f:
        return [json.loads(line) for line in f if f'"{key}"' in line]


def test_max_epochs_stops_a_streamed_run_at_the_epoch_boundary(demo, tmp_path):
    """--streaming with --train_iters 100 and --max_epochs 2 on 40 rows (5 steps per epoch): training
    stops after step 10, evaluates and saves there; the LR schedule still spans 100 iterations."""
    save = tmp_path / "stream"
    proc = sft(demo, save, "--streaming", "true", "--train_iters", "100", "--max_epochs", "2",
               "--val_dataset", demo["long"], "--eval_iters", "1", "--eval_interval", "1000",
               "--save_interval", "1000", dataset=demo["long"])
    logged = rows(save)
    assert [r["iteration"] for r in logged] == list(range(1, 11)), proc.stderr[-2000:]
    assert "ended after 2 epoch(s)" in proc.stderr
    assert [r["iteration"] for r in rows(save, "eval_loss")] == [10]
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "10"
    # cosine over 100 iterations: at iteration 10 the lr is still close to its peak
    assert 0.95e-3 < logged[-1]["lr"] < 1e-3


def test_max_epochs_with_train_iters_stops_at_whichever_comes_first(demo, tmp_path):
    save = tmp_path / "map"
    sft(demo, save, "--train_iters", "100", "--max_epochs", "1", "--save_interval", "1000", dataset=demo["long"])
    assert [r["iteration"] for r in rows(save)] == list(range(1, 6))  # 40 rows / 8 per step
    save = tmp_path / "iters"
    sft(demo, save, "--train_iters", "3", "--max_epochs", "5", "--save_interval", "1000", dataset=demo["long"])
    assert [r["iteration"] for r in rows(save)] == [1, 2, 3]


def test_rotation_keeps_the_newest_checkpoints(demo, tmp_path):
    save = tmp_path / "rot"
    proc = sft(demo, save, "--train_iters", "5", "--save_interval", "1", "--save_total_limit", "2",
               "--no_save_optim", "true")
    kept = sorted(p.name for p in save.iterdir() if p.name.startswith("iter_"))
    assert kept == ["iter_0000004", "iter_0000005"], kept
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "5"
    assert proc.stderr.count("--save_total_limit 2") == 3


def test_rotation_never_deletes_latest_or_a_checkpoint_being_written(tmp_path):
    from megatron_swift.trainer.checkpoint import rotate_checkpoints

    for i in (1, 2, 3, 4, 5):
        (tmp_path / f"iter_{i:07d}").mkdir()
        (tmp_path / f"iter_{i:07d}" / "metadata.json").write_text("{}")  # complete
    (tmp_path / "iter_0000006.tmp").mkdir()  # being written
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("2")  # e.g. rewound by hand
    removed = rotate_checkpoints(str(tmp_path), keep=2)
    assert sorted(os.path.basename(p) for p in removed) == ["iter_0000001", "iter_0000003"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("iter_")) == [
        "iter_0000002", "iter_0000004", "iter_0000005", "iter_0000006.tmp"]


def test_save_safetensors_equals_export_to_hf_and_loads_in_transformers(demo, tmp_path):
    """TP=2: the HF copy written during training is tensor-for-tensor `megatron export --to_hf` of the
    same checkpoint, and transformers loads it."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    save = tmp_path / "st"
    sft(demo, save, "--train_iters", "2", "--save_interval", "1000", "--save_safetensors", "true",
        "--tensor_model_parallel_size", "2", "--sequence_parallel", "true", nproc=2)
    copy = save / "iter_0000002" / "hf"
    exported = tmp_path / "exported"
    proc = subprocess.run([*MEGATRON, "export", "--mcore_model", str(save), "--to_hf", "true", "--output_dir",
                           str(exported)], env=worker_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    def tensors(d):
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out

    ours, theirs = tensors(copy), tensors(exported)
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    model = AutoModelForCausalLM.from_pretrained(str(copy))
    assert model.config.model_type == "qwen3"
    for name in ("config.json", "tokenizer.json", "chat_template.jinja"):
        assert (copy / name).is_file(), name


def test_async_save_resumes_like_the_uninterrupted_run(demo, tmp_path):
    full = tmp_path / "full"
    sft(demo, full, "--train_iters", "4", "--save_interval", "2", "--async_save", "true")
    assert sorted(p.name for p in full.iterdir() if p.name.startswith("iter_")) == ["iter_0000002", "iter_0000004"]
    resumed = tmp_path / "resumed"
    (resumed).mkdir()
    shutil.copytree(full / "iter_0000002", resumed / "iter_0000002")
    (resumed / "latest_checkpointed_iteration.txt").write_text("2")
    sft(demo, resumed, "--train_iters", "4", "--save_interval", "2", "--async_save", "true", "--load", str(resumed))
    expected = [r["loss"] for r in rows(full)][2:]
    assert [r["loss"] for r in rows(resumed) if r["iteration"] > 2] == pytest.approx(expected, rel=1e-6)


def test_fp16_skipped_steps_do_not_advance_the_lr_schedule(demo, tmp_path):
    """megatron's fp16 loss scaler starts at 2^32 and skips the first, overflowing steps; the LR
    schedule (warmup from 0) must stay where it is while updates are skipped."""
    save = tmp_path / "fp16"
    sft(demo, save, "--torch_dtype", "float16", "--train_iters", "3", "--lr_warmup_iters", "2",
        "--save_interval", "1000", "--no_save_optim", "true")
    logged = rows(save)
    assert [r.get("skipped_iterations") for r in logged] == [1, 2, 3]
    assert [r["lr"] for r in logged] == [0.0, 0.0, 0.0]


def test_logged_tokens_are_the_real_tokens(demo, tmp_path):
    """num_tokens counts non-padding tokens only: the same number with padded and padding-free batches
    under TP2+SP (which pads the padding-free row), and equal to the samples' lengths."""
    from transformers import AutoTokenizer

    from megatron_swift.args import parse_args
    from megatron_swift.data.pipeline import prepare_data

    counts = {}
    for name, flag in (("padded", "false"), ("thd", "true")):
        save = tmp_path / name
        sft(demo, save, "--train_iters", "2", "--padding_free", flag, "--tensor_model_parallel_size", "2",
            "--sequence_parallel", "true", "--save_interval", "1000", "--no_save_optim", "true", nproc=2,
            dataset=demo["long"])
        counts[name] = [r["num_tokens"] for r in rows(save)]
    args = parse_args("sft", ["--model", demo["model"], "--dataset", demo["long"], "--train_iters", "2",
                              "--split_dataset_ratio", "0"])
    data = prepare_data(args, AutoTokenizer.from_pretrained(demo["model"]))
    it = data.train_iterator(micro_batch_size=8)
    expected = [sum(len(s) for s in _sequences(next(it))) for _ in range(2)]
    assert counts["padded"] == counts["thd"] == expected


def _sequences(batch):
    cu = batch["packed_seq_params"].cu_seqlens_q.tolist()
    return [batch["input_ids"][0, a:b] for a, b in zip(cu[:-1], cu[1:])]


def test_pytorch_profiler_records_the_chosen_iterations(demo, tmp_path):
    """--profile --use_pytorch_profiler (megatron's flags): a chrome trace and an operator summary
    for iterations [profile_step_start, profile_step_end) on rank 0, and the run goes on."""
    save = tmp_path / "prof"
    sft(demo, save, "--train_iters", "4", "--profile", "true", "--use_pytorch_profiler", "true",
        "--profile_step_start", "2", "--profile_step_end", "4", "--save_interval", "1000", "--no_save_optim", "true")
    assert [r["iteration"] for r in rows(save)] == [1, 2, 3, 4]
    with open(save / "profile" / "rank0.trace.json") as f:
        trace = json.load(f)
    steps = {e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("ProfilerStep")}
    assert not steps  # one recording window, not a schedule
    names = {e.get("name") for e in trace["traceEvents"]}
    assert "aten::mm" in names or "aten::addmm" in names
    summary = (save / "profile" / "rank0.summary.txt").read_text()
    assert "Self CPU" in summary and "By input shape" in summary
