"""`megatron sft` end to end through the CLI: real launcher, real torchrun relaunch, gloo ranks.

Oracle for "it trains": the loss on the bundled demo dataset falls well below where it started.
The two-"node" test runs two launchers on this machine (NNODES=2, NODE_RANK=0/1, one rank each)
and checks they trained as one TP=2 job (one log, world size 2). Bad input must fail with exit
code 2 and a message naming the argument, before torchrun starts any worker.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from helpers import MEGATRON, REPO, free_port, worker_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from megatron_swift.demo import prepare

    return prepare(str(tmp_path_factory.mktemp("demo")))


def sft_args(demo, save, iters=30, extra=()):
    return ["sft", "--model", demo["model"], "--dataset", demo["dataset"],
            "--micro_batch_size", "4", "--global_batch_size", "16", "--train_iters", str(iters),
            "--lr", "2e-3", "--min_lr", "2e-4", "--lr_warmup_iters", "3", "--log_interval", "1",
            "--save", str(save), "--add_version", "false", "--save_interval", "1000",
            *(["--split_dataset_ratio", "0"] if "--split_dataset_ratio" not in extra else []), *extra]


def records(save) -> list[dict]:
    with open(os.path.join(save, "logging.jsonl")) as f:
        return [json.loads(line) for line in f if '"loss"' in line]


def test_sft_tp2_padding_free_loss_falls_and_logs(demo, tmp_path):
    save = tmp_path / "sft"
    env = worker_env(NPROC_PER_NODE=2, MASTER_PORT=free_port())
    proc = subprocess.run([*MEGATRON, *sft_args(demo, save, extra=["--tensor_model_parallel_size", "2",
                                                                    "--sequence_parallel", "true",
                                                                    "--split_dataset_ratio", "0.1",
                                                                    "--eval_interval", "15"])],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    logs = records(save)
    assert [r["iteration"] for r in logs] == list(range(1, 31))
    for key in ("iteration", "loss", "lr", "grad_norm", "tokens_per_sec", "num_tokens"):
        assert key in logs[0]
    first, last = logs[0]["loss"], sum(r["loss"] for r in logs[-3:]) / 3
    assert last < 0.5 * first, (first, last)
    evals = [json.loads(line) for line in open(save / "logging.jsonl") if "eval_loss" in line]
    assert [e["iteration"] for e in evals] == [15, 30] and evals[1]["eval_loss"] < evals[0]["eval_loss"]
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "30"
    assert json.loads((save / "args.json").read_text())["tensor_model_parallel_size"] == 2
    assert list((save / "runs").iterdir()), "no tensorboard events"


def test_two_nodes_on_one_machine_train_as_one_job(demo, tmp_path):
    port = free_port()
    save = tmp_path / "sft2n"
    procs = []
    for node_rank in (0, 1):
        env = worker_env(NNODES=2, NODE_RANK=node_rank, NPROC_PER_NODE=1, MASTER_ADDR="127.0.0.1",
                         MASTER_PORT=port)
        procs.append(subprocess.Popen([*MEGATRON, *sft_args(demo, save, iters=4,
                                                            extra=["--tensor_model_parallel_size", "2"])],
                                      env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    logs = records(save)
    assert [r["iteration"] for r in logs] == [1, 2, 3, 4]
    assert json.loads((save / "args.json").read_text())["world_size"] == 2


def test_bad_input_fails_before_workers_start(demo, tmp_path):
    env = worker_env(NPROC_PER_NODE=2)
    cases = [
        (["--global_batch_size", "6", "--micro_batch_size", "4"], "global_batch_size"),
        (["--tensor_model_parallel_size", "4"], "tensor_model_parallel_size"),
        (["--load", str(tmp_path / "missing")], "--load"),
        (["--not_an_argument", "1"], "not_an_argument"),
        (["--lr_warmup_iters", "30"], "--lr_warmup_iters"),
    ]
    for extra, needle in cases:
        proc = subprocess.run([*MEGATRON, *sft_args(demo, tmp_path / "bad"), *extra], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, (extra, proc.stderr[-2000:])
        assert needle in proc.stderr, (extra, proc.stderr[-2000:])
        assert "torch.distributed.run" not in proc.stderr and "rank0" not in proc.stderr


def test_padding_free_equals_padded_over_five_steps(demo, tmp_path):
    """Same data order, same weights: THD batches train exactly like right-padded batches."""
    runs = {}
    for name, flag in (("padded", "false"), ("thd", "true")):
        save = tmp_path / name
        proc = subprocess.run([*MEGATRON, *sft_args(demo, save, iters=5, extra=["--padding_free", flag])],
                              env=worker_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        runs[name] = [r["loss"] for r in records(save)]
    assert len(runs["thd"]) == 5
    assert runs["thd"] == pytest.approx(runs["padded"], abs=1e-4), runs


def test_sft_from_export_to_mcore_checkpoint_equals_sft_from_hf(demo, tmp_path):
    """`megatron export --to_mcore` output feeds `megatron sft --mcore_model` (model from args.json):
    the same first losses as training from the HF directory (oracle: the HF weights path)."""
    mcore = tmp_path / "mcore"
    proc = subprocess.run([*MEGATRON, "export", "--model", demo["model"], "--to_mcore", "true", "--output_dir",
                           str(mcore)], env=worker_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = {}
    for name, source in (("hf", ["--model", demo["model"]]), ("mcore", ["--mcore_model", str(mcore)])):
        args = sft_args(demo, tmp_path / name, iters=4)
        i = args.index("--model")
        del args[i:i + 2]
        proc = subprocess.run([*MEGATRON, *args, *source], env=worker_env(), cwd=REPO, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        runs[name] = [r["loss"] for r in records(tmp_path / name)]
    assert runs["mcore"] == pytest.approx(runs["hf"], abs=1e-5), runs


def test_hub_model_offline_and_not_cached_is_a_clear_error(demo, tmp_path):
    args = sft_args(demo, tmp_path / "hub", iters=4)
    args[args.index("--model") + 1] = "no-such-org/no-such-model"
    env = worker_env(HF_HUB_OFFLINE=1, MODELSCOPE_OFFLINE=1, MODELSCOPE_CACHE=tmp_path / "ms",
                     HF_HOME=tmp_path / "hf")
    proc = subprocess.run([*MEGATRON, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "megatron sft: error: --model 'no-such-org/no-such-model'" in proc.stderr
    assert "offline" in proc.stderr and "Traceback" not in proc.stderr


def test_bf16_training_from_torch_dtype(demo, tmp_path):
    """--torch_dtype bfloat16 -> bf16 params in megatron's Float16Module, fp32 main params in the
    optimizer; the loss falls as in fp32 (oracle: the fp32 run's first loss, within bf16 noise)."""
    losses = {}
    for dtype in ("float32", "bfloat16"):
        save = tmp_path / dtype
        proc = subprocess.run([*MEGATRON, *sft_args(demo, save, iters=6, extra=["--torch_dtype", dtype])],
                              env=worker_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        losses[dtype] = [r["loss"] for r in records(save)]
    assert json.loads((tmp_path / "bfloat16" / "args.json").read_text())["bf16"] is True
    assert abs(losses["bfloat16"][0] - losses["float32"][0]) < 0.05, losses
    assert losses["bfloat16"][-1] < losses["bfloat16"][0] - 0.5, losses


def test_first_loss_equals_transformers_on_the_same_batch(demo, tmp_path):
    """The loss `megatron sft` logs for step 1 (two micro batches of varied-length rows, padding-free)
    is transformers' token-averaged cross entropy of the same HF weights on the same rows. Megatron
    pads the vocabulary to a multiple of 128 x TP; the padded logits must not enter the softmax (they
    added log(1024/1000) = 0.024 to every loss of the 1000-token demo model)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_swift.template import get_template

    save = tmp_path / "first"
    args = sft_args(demo, save, iters=4, extra=("--dataset_shuffle", "false", "--template", "qwen3",
                                                "--micro_batch_size", "4", "--global_batch_size", "8",
                                                "--padding_free", "true"))
    proc = subprocess.run([*MEGATRON, *args], env=worker_env(), cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    logged = records(save)[0]

    tokenizer = AutoTokenizer.from_pretrained(demo["model"])
    template = get_template(tokenizer, "qwen3")
    model = AutoModelForCausalLM.from_pretrained(demo["model"], dtype=torch.float32).eval()
    total, count = 0.0, 0
    with open(demo["dataset"]) as f:
        rows = [json.loads(next(f)) for _ in range(8)]
    for row in rows:
        encoded = template.encode(row)
        ids = torch.tensor([list(encoded["input_ids"])])
        labels = torch.tensor(list(encoded["labels"]))
        with torch.no_grad():
            logits = model(ids).logits[0, :-1]
        total += torch.nn.functional.cross_entropy(logits, labels[1:], ignore_index=-100, reduction="sum").item()
        count += int(labels[1:].ne(-100).sum())
    assert logged["loss_tokens"] == count
    assert logged["loss"] == pytest.approx(total / count, rel=2e-6), (logged, total / count)
