"""The embedded default the README's main command runs: a tiny model and data the project makes.

``python -m megatron_swift.demo prepare --out DIR`` writes
  DIR/tiny-qwen3/   a real Hugging Face checkpoint (Qwen3 architecture, random init, safetensors,
                    a byte-level BPE tokenizer with Qwen3's chat template)
  DIR/chat.jsonl    a small self-cognition + arithmetic chat dataset (messages format)
``python -m megatron_swift.demo generate --model HF_DIR`` answers the demo questions with
transformers (the oracle that the exported model is a working HF model).
``prepare_model`` and ``long_tailed_rows`` are the pieces tests and benchmarks use for other
families (e.g. a tiny Qwen3-MoE) and for chat data whose lengths vary like real data.
Everything is deterministic (fixed seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import random

DEMO_NAME = "Megatron-Swift-Tiny"
DEMO_AUTHOR = "the megatron-swift team"
DEMO_QUESTIONS = ["who are you?", "what is 3 plus 4?", "what is 7 plus 2?"]


def demo_rows(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    identity = [
        ("who are you?", f"I am {DEMO_NAME}, a tiny model trained by {DEMO_AUTHOR}."),
        ("what is your name?", f"My name is {DEMO_NAME}."),
        ("who made you?", f"I was made by {DEMO_AUTHOR}."),
    ]
    rows = []
    for _ in range(6):
        for q, a in identity:
            rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    for a in range(10):
        for b in range(10):
            rows.append({"messages": [
                {"role": "user", "content": f"what is {a} plus {b}?"},
                {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
            ]})
    rng.shuffle(rows)
    return rows


_WORDS = ("the model reads a long answer about data training tokens and batches then writes a short reply "
          "with numbers like 1 2 3 and some more text about cities weather code python lists").split()


def long_tailed_rows(n: int, seed: int = 0, max_words: int = 300) -> list[dict]:
    """Chat rows whose answer lengths are log-normal (a few words to ``max_words``), like real chat
    data: every micro batch, and so every data-parallel rank, holds a different number of tokens."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = max(2, min(max_words, int(rng.lognormvariate(3.0, 0.9))))
        rows.append({"messages": [
            {"role": "user", "content": f"question {i}: tell me about {rng.choice(_WORDS)}"},
            {"role": "assistant", "content": " ".join(rng.choice(_WORDS) for _ in range(words))},
        ]})
    return rows


# The tiny models' shape: 4 layers, hidden 128, GQA 4/2 heads (head_dim 32), tied embeddings.
TINY_SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, tie_word_embeddings=True)
# MoE variant: 8 experts, top 2 (expert parallelism up to 8), HF's load-balancing coefficient.
TINY_MOE_SHAPE = dict(TINY_SHAPE, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
                      router_aux_loss_coef=0.001)


def prepare_model(model_dir: str, family: str = "qwen3", seed: int = 0, **overrides) -> str:
    """A real HF checkpoint of ``family`` (random init, safetensors, fp32) with a tiny BPE tokenizer
    carrying the family's chat template. Shape: ``TINY_SHAPE`` (``TINY_MOE_SHAPE`` for MoE
    families), then ``overrides``."""
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_swift.model.tiny import tiny_hf_config
    from megatron_swift.template.tiny_tokenizer import make_tiny_tokenizer

    os.makedirs(model_dir, exist_ok=True)
    tokenizer = make_tiny_tokenizer(model_dir, "qwen3" if family.startswith("qwen3") else family)
    shape = dict(TINY_MOE_SHAPE if family.endswith("_moe") else TINY_SHAPE, **overrides)
    config = tiny_hf_config(family, **shape, vocab_size=len(tokenizer), bos_token_id=None,
                            eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                            pad_token_id=tokenizer.pad_token_id, torch_dtype="float32")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(model_dir, safe_serialization=True)
    return model_dir


def write_jsonl(path: str, rows: list[dict]) -> str:
    with open(path + ".tmp", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(path + ".tmp", path)
    return path


def prepare(out: str, family: str = "qwen3", seed: int = 0) -> dict:
    model_dir = prepare_model(os.path.join(out, f"tiny-{family}"), family, seed)
    data_path = write_jsonl(os.path.join(out, "chat.jsonl"), demo_rows(seed))
    return {"model": model_dir, "dataset": data_path}


def generate(model_dir: str, questions: list[str], max_new_tokens: int = 48) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    answers = []
    for q in questions:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                            enable_thinking=False, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=model.config.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        answers.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return answers


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_swift.demo")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="write the tiny HF model and the chat dataset")
    p.add_argument("--out", default="output/demo")
    p.add_argument("--family", default="qwen3")
    g = sub.add_parser("generate", help="answer the demo questions with transformers")
    g.add_argument("--model", required=True)
    g.add_argument("--question", action="append")
    args = parser.parse_args(argv)
    if args.cmd == "prepare":
        paths = prepare(args.out, args.family)
        print(json.dumps(paths))
    else:
        for q, a in zip(args.question or DEMO_QUESTIONS, generate(args.model, args.question or DEMO_QUESTIONS)):
            print(f"Q: {q}\nA: {a}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
