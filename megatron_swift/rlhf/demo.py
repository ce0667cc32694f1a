"""The DPO and GRPO demos on the embedded tiny model (scripts/demo_dpo.sh, scripts/demo_grpo.sh).

``prepare``: the tiny Qwen3-architecture HF model (megatron_swift.demo) and preference pairs: for
"what is a plus b?" the chosen answer has the right sum, the rejected one a wrong sum (same length,
so raw log-probs compare fairly). ``preference``: with transformers, how often the model gives the
chosen answer the higher log-prob, and the mean margin logp(chosen) - logp(rejected).

    python -m megatron_swift.rlhf.demo prepare --out DIR
    python -m megatron_swift.rlhf.demo preference --model HF_DIR --data DIR/pairs.jsonl [--ref START_DIR]

``prepare-grpo``: the tiny model (random init), 200 "what is a plus b?" prompts (with a ``solution``
column) and a reward plugin registered the ms-swift way (``letters``: the share of ASCII letters in a
completion, a dense rule a random model can learn in a few dozen steps). ``reward-curve``: the mean
reward of the first and last steps of a GRPO run's logging.jsonl.

    python -m megatron_swift.rlhf.demo prepare-grpo --out DIR
    python -m megatron_swift.rlhf.demo reward-curve --log RUN/logging.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import random


def preference_rows(seed: int = 0) -> list:
    rng = random.Random(seed)
    rows = []
    for a in range(10):
        for b in range(10):
            wrong = (a + b + rng.randrange(1, 9)) % 19
            rows.append({"messages": [{"role": "user", "content": f"what is {a} plus {b}?"},
                                      {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}],
                         "rejected_response": f"{a} plus {b} is {wrong}."})
    rng.shuffle(rows)
    return rows


def prepare(out: str) -> dict:
    from megatron_swift.demo import prepare_model, write_jsonl

    model = prepare_model(os.path.join(out, "tiny-qwen3"), "qwen3")
    return {"model": model, "dataset": write_jsonl(os.path.join(out, "pairs.jsonl"), preference_rows())}


def _margins(model_dir: str, data: str) -> list:
    """logp(chosen) - logp(rejected) of each pair, by transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_swift.args import parse_args
    from megatron_swift.template import template_from_args

    args = parse_args("rlhf", ["--model", model_dir, "--dataset", data, "--train_iters", "1"], world_size=1)
    template = template_from_args(args, AutoTokenizer.from_pretrained(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    margins = []
    with torch.no_grad():
        for line in open(data):
            enc = template.encode(json.loads(line), "pair")
            logps = []
            for side in ("chosen", "rejected"):
                ids = torch.tensor([enc[f"{side}_input_ids"]])
                mask = torch.tensor(enc[f"{side}_labels"][1:]).ne(-100)
                lp = torch.log_softmax(model(ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
                logps.append(float(lp[mask].sum()))
            margins.append(logps[0] - logps[1])
    return margins


def preference(model_dir: str, data: str, ref_dir: str = None) -> dict:
    """How often the model gives the chosen answer the higher log-prob; with ``ref_dir`` also DPO's
    reward accuracy: how often its margin grew over the reference's (the implicit reward
    beta x (logp - logp_ref) of the chosen answer beats the rejected one's)."""
    margins = _margins(model_dir, data)
    out = {"prefers_chosen": sum(m > 0 for m in margins) / len(margins),
           "mean_margin": round(sum(margins) / len(margins), 4), "pairs": len(margins)}
    if ref_dir:
        grew = [m - r for m, r in zip(margins, _margins(ref_dir, data))]
        out["reward_accuracy"] = sum(g > 0 for g in grew) / len(grew)
        out["mean_margin_gain"] = round(sum(grew) / len(grew), 4)
    return out


LETTERS_PLUGIN = '''from megatron_swift.plugin import ORM, orms


class AsciiLetters(ORM):
    """The share of ASCII letters in a completion."""

    def __call__(self, completions, **kwargs):
        return [sum(ch.isascii() and ch.isalpha() for ch in c) / max(len(c), 1) for c in completions]


orms["letters"] = AsciiLetters
'''


def prepare_grpo(out: str) -> dict:
    from megatron_swift.demo import prepare_model, write_jsonl

    model = prepare_model(os.path.join(out, "tiny-qwen3"), "qwen3", seed=3)
    rows = [{"messages": [{"role": "user", "content": f"what is {a} plus {b}?"}], "solution": str(a + b)}
            for a in range(20) for b in range(10)]
    random.Random(0).shuffle(rows)
    plugin = os.path.join(out, "letters_reward.py")
    with open(plugin, "w") as f:
        f.write(LETTERS_PLUGIN)
    return {"model": model, "dataset": write_jsonl(os.path.join(out, "prompts.jsonl"), rows), "plugin": plugin}


def reward_curve(log: str, key: str = "reward", window: int = 5) -> dict:
    steps = [json.loads(line) for line in open(log) if '"loss"' in line]
    rewards = [r[key] for r in steps if key in r]
    if len(rewards) < 2 * window:
        raise SystemExit(f"{log}: {len(rewards)} steps with {key!r}; need at least {2 * window}")
    first, last = rewards[:window], rewards[-window:]
    return {"steps": len(rewards), f"first_{window}_mean": round(sum(first) / window, 4),
            f"last_{window}_mean": round(sum(last) / window, 4)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_swift.rlhf.demo")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("prepare").add_argument("--out", default="output/demo_dpo")
    p = sub.add_parser("preference")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--ref", help="the starting model: also report the reward accuracy against it")
    sub.add_parser("prepare-grpo").add_argument("--out", default="output/demo_grpo")
    p = sub.add_parser("reward-curve")
    p.add_argument("--log", required=True)
    p.add_argument("--key", default="reward")
    args = parser.parse_args(argv)
    if args.cmd == "prepare":
        print(json.dumps(prepare(args.out)))
    elif args.cmd == "prepare-grpo":
        print(json.dumps(prepare_grpo(args.out)))
    elif args.cmd == "reward-curve":
        print(json.dumps(reward_curve(args.log, args.key)))
    else:
        print(json.dumps(preference(args.model, args.data, args.ref)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
