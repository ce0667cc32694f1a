"""GPU throughput: tokens/s and MFU of a training-step loop for a Qwen3-0.6B/1.7B-shaped model.

One GPU, the platform's layer spec (Transformer Engine when it imports), bf16 in megatron's
Float16Module with fp32 main params (as `megatron sft` trains), the fusions this machine has,
random weights, synthetic sequences: full-length padded rows (`--layout bshd`) or one packed
padding-free row of several sequences (`--layout thd`). Prints a one-row markdown table and, with
`--json`, writes the numbers.

    python scripts/bench_gpu_throughput.py --size 1.7b --seq 4096 --micro_batch 2 --steps 20

MFU = model FLOP/s / peak bf16 FLOP/s (`--peak_tflops`: 989 dense for an H100 SXM / H200).
Model FLOPs are megatron_swift/trainer/flops.py's: 2 x the weights each token multiplies (QKV
and output projections with the real head_dim, which for Qwen3 is not hidden / heads; SwiGLU MLP;
output layer) plus causal attention (2 x 2 x L^2 x heads x head_dim per layer, halved), x 3 for
forward + backward. Recomputation is not counted.
"""

from __future__ import annotations

import argparse
import json
import time

SIZES = {
    # hidden, ffn, layers, heads, kv heads, head_dim, vocab (Qwen3 published shapes)
    "tiny": (128, 256, 2, 4, 2, 32, 1000),  # a CPU smoke test of this script
    "0.6b": (1024, 3072, 28, 16, 8, 128, 151936),
    "1.7b": (2048, 6144, 28, 16, 8, 128, 151936),
}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--size", choices=sorted(SIZES), default="1.7b")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--micro_batch", type=int, default=2)
    p.add_argument("--layout", choices=("bshd", "thd"), default="bshd")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak_tflops", type=float, default=989.0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import torch
    from megatron.core.transformer.module import Float16Module

    from megatron_swift.data.batching import Collator, move_batch
    from megatron_swift.model import build_model
    from megatron_swift.model.tiny import tiny_hf_config
    from megatron_swift.platform import ParallelLayout, init_parallel
    from megatron_swift.trainer.flops import sequence_lengths, training_flops
    from megatron_swift.trainer.model_setup import OptimizerSettings, build_optimizer, wrap_ddp
    from megatron_swift.trainer.step import train_step

    hidden, ffn, layers, heads, kv, head_dim, vocab = SIZES[args.size]
    platform = init_parallel(ParallelLayout(), seed=0)
    hf = tiny_hf_config("qwen3", hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                        num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim, vocab_size=vocab,
                        max_position_embeddings=max(args.seq, 4096), tie_word_embeddings=args.size == "0.6b")
    dtype = torch.bfloat16
    chunks, config, settings = build_model(hf, {"params_dtype": dtype, "calculate_per_token_loss": True,
                                                "perform_initialization": True})
    chunks = [Float16Module(config, c) for c in chunks]
    opt = OptimizerSettings(lr=1e-5, use_distributed_optimizer=False)
    ddp = wrap_ddp(chunks, config, opt)
    optimizer = build_optimizer(ddp, config, opt)
    g = torch.Generator().manual_seed(0)
    if args.layout == "bshd":
        samples = [torch.randint(0, vocab, (args.seq,), generator=g).tolist() for _ in range(args.micro_batch)]
    else:  # one packed row of mbs x seq tokens in sequences of varied length
        total, samples = args.micro_batch * args.seq, []
        while total > 0:
            n = min(total, int(torch.randint(args.seq // 8, args.seq, (1,), generator=g)))
            samples.append(torch.randint(0, vocab, (n,), generator=g).tolist())
            total -= n
    collator = Collator(pad_token_id=0, padding_free=args.layout == "thd")
    batch = move_batch(collator([{"input_ids": s, "labels": s} for s in samples]), platform.device)
    rows = 1 if args.layout == "thd" else args.micro_batch
    seq = batch["input_ids"].shape[1]
    flops = training_flops(config, settings.padded_vocab_size, sequence_lengths(batch))
    times = []
    result = None
    for step in range(args.warmup + args.steps):
        if platform.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = train_step(ddp, optimizer, iter([batch]), 1, seq, rows)
        if platform.is_cuda:
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    step_s = sum(times) / len(times)
    tokens = sum(sequence_lengths(batch))
    out = {
        "device": torch.cuda.get_device_name() if platform.is_cuda else "cpu",
        "model": f"qwen3-{args.size}", "te": platform.has_transformer_engine, "layout": args.layout,
        "tokens_per_step": tokens, "params_b": round(sum(p.numel() for p in chunks[0].parameters()) / 1e9, 3),
        "step_s": round(step_s, 4), "tokens_per_s": round(tokens / step_s, 1),
        "tflops": round(flops / step_s / 1e12, 2), "mfu": round(flops / step_s / (args.peak_tflops * 1e12), 4),
        "loss": round(result.loss, 4),
        "fusions": {k: getattr(config, k) for k in ("apply_rope_fusion", "bias_activation_fusion", "masked_softmax_fusion",
                                                    "gradient_accumulation_fusion")},
    }
    print("| device | model | TE | layout | tokens/step | step (s) | tokens/s | TFLOP/s | MFU | loss |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {out['device']} | {out['model']} | {out['te']} | {args.layout} | {tokens} | {out['step_s']} | "
          f"{out['tokens_per_s']:,.0f} | {out['tflops']} | {out['mfu']:.1%} | {out['loss']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f)
    return out


if __name__ == "__main__":
    main()
