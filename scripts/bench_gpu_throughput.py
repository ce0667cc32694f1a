"""GPU throughput: tokens/s and MFU of one training step loop for a Qwen3-0.6B/1.7B-shaped model.

Runs on one GPU with Transformer Engine when it imports (the platform picks the TE layer spec),
bf16, distributed optimizer off, random weights, synthetic full-length sequences. Prints a short
table; meant to finish in well under 5 minutes on an H100.

    python scripts/bench_gpu_throughput.py --size 1.7b --seq 4096 --micro_batch 2 --steps 20

MFU = achieved model FLOP/s / peak bf16 FLOP/s (--peak_tflops, default 989 for H100 SXM dense).
Model FLOPs per token = 6 x (non-embedding params + output layer) + 12 x layers x hidden x seq
(causal attention counted at half of 12·L·h·s would be 6·L·h·s; we report the standard full
12·L·h·s form used by Megatron's throughput log so numbers compare with theirs).
"""

from __future__ import annotations

import argparse
import time

SIZES = {
    # hidden, ffn, layers, heads, kv heads, head_dim, vocab (Qwen3 published shapes)
    "tiny": (128, 256, 2, 4, 2, 32, 1000),  # a CPU smoke test of this script
    "0.6b": (1024, 3072, 28, 16, 8, 128, 151936),
    "1.7b": (2048, 6144, 28, 16, 8, 128, 151936),
}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--size", choices=sorted(SIZES), default="1.7b")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--micro_batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak_tflops", type=float, default=989.0)
    args = p.parse_args()

    import torch

    from megatron_swift.model import build_model
    from megatron_swift.model.tiny import tiny_hf_config
    from megatron_swift.platform import ParallelLayout, get_platform, init_parallel
    from megatron_swift.trainer.model_setup import OptimizerSettings, build_optimizer, wrap_ddp
    from megatron_swift.trainer.step import train_step

    hidden, ffn, layers, heads, kv, head_dim, vocab = SIZES[args.size]
    platform = init_parallel(ParallelLayout(), seed=0)
    hf = tiny_hf_config("qwen3", hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                        num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim, vocab_size=vocab,
                        max_position_embeddings=max(args.seq, 4096), tie_word_embeddings=args.size == "0.6b")
    chunks, config, settings = build_model(hf, {"params_dtype": torch.bfloat16, "calculate_per_token_loss": True,
                                                "recompute_granularity": None})
    opt = OptimizerSettings(lr=1e-5, use_distributed_optimizer=False)
    ddp = wrap_ddp(chunks, config, opt)
    optimizer = build_optimizer(ddp, config, opt)
    device = get_platform().device
    tokens = torch.randint(0, vocab, (args.micro_batch, args.seq + 1), device=device)
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:],
             "position_ids": torch.arange(args.seq, device=device).expand(args.micro_batch, -1)}

    params = sum(p.numel() for p in chunks[0].parameters())
    embed = chunks[0].embedding.word_embeddings.weight.numel()
    flops_per_token = 6 * (params - (embed if not settings.share_embeddings_and_output_weights else 0)) \
        + 12 * layers * hidden * args.seq
    times = []
    for step in range(args.warmup + args.steps):
        if platform.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = train_step(ddp, optimizer, iter([batch]), 1, args.seq, args.micro_batch)
        if platform.is_cuda:
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    step_s = sum(times) / len(times)
    tokens_per_s = args.micro_batch * args.seq / step_s
    mfu = tokens_per_s * flops_per_token / (args.peak_tflops * 1e12)
    name = torch.cuda.get_device_name() if platform.is_cuda else "cpu"
    print(f"| device | model | TE | seq x mbs | params | step (s) | tokens/s | TFLOP/s | MFU | loss |")
    print(f"|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {name} | qwen3-{args.size} | {platform.has_transformer_engine} | {args.seq}x{args.micro_batch} | "
          f"{params / 1e9:.2f}B | {step_s:.3f} | {tokens_per_s:,.0f} | {tokens_per_s * flops_per_token / 1e12:.0f} | "
          f"{mfu:.1%} | {result.loss:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
