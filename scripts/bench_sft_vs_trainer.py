"""CPU benchmark: `megatron sft` (padding-free THD) vs transformers' Trainer (padded batches).

Same tiny model (same initial weights), same long-tailed chat data tokenized by the same template,
same hyper-parameters (AdamW, lr, warmup, cosine, global batch 16). Reports real (non-padding)
tokens per second and the per-step losses side by side.

    .venv/bin/pip install accelerate   # the Trainer needs it
    .venv/bin/python scripts/bench_sft_vs_trainer.py --out output/bench_sft --steps 30

Writes OUT/results.json and prints a markdown table (copied into docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("the model reads a long answer about data training tokens and batches then writes a short reply "
         "with numbers like 1 2 3 and some more text about cities weather code python lists").split()


def make_data(path: str, n: int, seed: int = 0) -> dict:
    """Long-tailed response lengths (log-normal), like real chat data."""
    rng = random.Random(seed)
    lengths = []
    with open(path, "w") as f:
        for i in range(n):
            words = max(3, min(350, int(rng.lognormvariate(3.4, 0.9))))
            lengths.append(words)
            answer = " ".join(rng.choice(WORDS) for _ in range(words))
            f.write(json.dumps({"messages": [{"role": "user", "content": f"question {i}: tell me something"},
                                             {"role": "assistant", "content": answer}]}) + "\n")
    lengths.sort()
    return {"rows": n, "median_words": lengths[n // 2], "p99_words": lengths[int(n * 0.99)]}


def make_model(model_dir: str, seed: int = 0) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_swift.model.tiny import tiny_hf_config
    from megatron_swift.template.tiny_tokenizer import make_tiny_tokenizer

    tok = make_tiny_tokenizer(model_dir, "qwen3")
    cfg = tiny_hf_config("qwen3", hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=64, vocab_size=len(tok), tie_word_embeddings=True,
                         eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(model_dir, safe_serialization=True)


def run_megatron(model_dir, data, out, steps, max_length, nproc: int, tp: int) -> dict:
    save = os.path.join(out, f"megatron_np{nproc}_tp{tp}")
    shutil.rmtree(save, ignore_errors=True)
    cmd = [sys.executable, "-m", "megatron_swift.cli.main", "sft", "--model", model_dir, "--dataset", data,
           "--split_dataset_ratio", "0", "--max_length", str(max_length), "--padding_free", "true",
           "--micro_batch_size", "8", "--global_batch_size", "16", "--train_iters", str(steps),
           "--lr", "1e-3", "--min_lr", "0", "--lr_warmup_iters", "2", "--weight_decay", "0.0",
           "--adam_beta2", "0.999", "--clip_grad", "1.0", "--log_interval", "1", "--save", save,
           "--add_version", "false", "--no_save_optim", "true", "--tensor_model_parallel_size", str(tp),
           "--use_distributed_optimizer", "false"]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=str(2 // nproc))
    if nproc > 1:
        env["NPROC_PER_NODE"] = str(nproc)
    t0 = time.time()
    subprocess.run(cmd, check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL)
    wall = time.time() - t0
    logs = [json.loads(l) for l in open(os.path.join(save, "logging.jsonl")) if '"loss"' in l]
    steady = logs[2:]  # the first steps include warm-up (allocations, caches)
    return {"losses": [r["loss"] for r in logs], "real_tokens_per_s": sum(r["tokens_per_sec"] for r in steady) / len(steady),
            "wall_s": wall}


def run_trainer(model_dir, data, out, steps, max_length) -> dict:
    import torch
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                              TrainerCallback, TrainingArguments)

    from megatron_swift.template import MaxLengthError, get_template

    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(model_dir)
    template = get_template(tok, "qwen3", max_length=max_length, loss_scale="default")
    encoded = []
    for line in open(data):
        try:
            e = template.encode(json.loads(line))  # the exact ids/labels megatron sft trains on
        except MaxLengthError:
            continue  # --truncation_strategy delete drops these on the megatron side too
        encoded.append({"input_ids": e["input_ids"], "labels": e["labels"]})
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    losses, real = [], {"tokens": 0}

    class Collate(DataCollatorForSeq2Seq):
        def __call__(self, features, return_tensors=None):
            real["tokens"] += sum(len(f["input_ids"]) for f in features)
            return super().__call__(features, return_tensors)

    class LogLoss(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    targs = TrainingArguments(output_dir=os.path.join(out, "trainer"), per_device_train_batch_size=8,
                              gradient_accumulation_steps=2, max_steps=steps, learning_rate=1e-3,
                              warmup_steps=2, lr_scheduler_type="cosine", weight_decay=0.0, adam_beta2=0.999,
                              max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[],
                              dataloader_num_workers=0, use_cpu=True, seed=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=targs, train_dataset=encoded,
                      data_collator=Collate(tok, padding=True, label_pad_token_id=-100), callbacks=[LogLoss()])
    t0 = time.time()
    trainer.train()
    wall = time.time() - t0
    return {"losses": losses, "real_tokens_per_s": real["tokens"] / wall, "wall_s": wall}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="output/bench_sft")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--max_length", type=int, default=512)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    model_dir, data = os.path.join(args.out, "model"), os.path.join(args.out, "data.jsonl")
    data_stats = make_data(data, args.rows)
    make_model(model_dir)
    results = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "data": data_stats,
        "megatron_sft_1proc": run_megatron(model_dir, data, args.out, args.steps, args.max_length, 1, 1),
        "megatron_sft_2proc_tp2": run_megatron(model_dir, data, args.out, args.steps, args.max_length, 2, 2),
        "hf_trainer_padded": run_trainer(model_dir, data, args.out, args.steps, args.max_length),
    }
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    base = results["hf_trainer_padded"]["real_tokens_per_s"]
    print("| run | real tokens/s | vs Trainer | wall (s) | loss step 1 | loss step 5 | loss last |")
    print("|---|---|---|---|---|---|---|")
    for name in ("megatron_sft_1proc", "megatron_sft_2proc_tp2", "hf_trainer_padded"):
        r = results[name]
        print(f"| {name} | {r['real_tokens_per_s']:.0f} | {r['real_tokens_per_s'] / base:.2f}x | {r['wall_s']:.0f} | "
              f"{r['losses'][0]:.3f} | {r['losses'][4]:.3f} | {r['losses'][-1]:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
