"""The embedded default the README's main command runs: a tiny model and data the project makes.

``python -m megatron_swift.demo prepare --out DIR`` writes
  DIR/tiny-qwen3/   a real Hugging Face checkpoint (Qwen3 architecture, random init, safetensors,
                    a byte-level BPE tokenizer with Qwen3's chat template)
  DIR/chat.jsonl    a small self-cognition + arithmetic chat dataset (messages format)
``python -m megatron_swift.demo generate --model HF_DIR`` answers the demo questions with
transformers (the oracle that the exported model is a working HF model).
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


def prepare(out: str, family: str = "qwen3", seed: int = 0) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_swift.model.tiny import tiny_hf_config
    from megatron_swift.template.tiny_tokenizer import make_tiny_tokenizer

    model_dir = os.path.join(out, f"tiny-{family}")
    os.makedirs(model_dir, exist_ok=True)
    tokenizer = make_tiny_tokenizer(model_dir, family)
    config = tiny_hf_config(family, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                            vocab_size=len(tokenizer), tie_word_embeddings=True,
                            bos_token_id=None, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                            pad_token_id=tokenizer.pad_token_id, torch_dtype="float32")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(model_dir, safe_serialization=True)
    data_path = os.path.join(out, "chat.jsonl")
    with open(data_path + ".tmp", "w") as f:
        for row in demo_rows(seed):
            f.write(json.dumps(row) + "\n")
    os.replace(data_path + ".tmp", data_path)
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
