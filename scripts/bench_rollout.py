"""The colocated vLLM rollout engine on a random-init Qwen3 (CPU by default; needs vLLM installed).

Measures: engine load seconds (``vllm.LLM`` construction, the model already on disk), generation
throughput (completion tokens per second over ``--prompts`` x ``--n`` completions of ``--tokens``
tokens, median of 3), and weight sync (``iter_hf_weights(everywhere=True)`` from the built mcore model
into the engine: seconds, and seconds per MB of weights). Prints a markdown table (docs/grpo.md).

    python scripts/bench_rollout.py --out /tmp/bench_rollout [--hidden 512 --layers 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("MEGATRON_SWIFT_DEVICE", "cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--hidden", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32)
    opts = parser.parse_args()

    import torch

    from megatron_swift.converters.api import iter_hf_weights, load_hf_into_mcore
    from megatron_swift.converters.mcore_io import build_chunks
    from megatron_swift.demo import prepare_model
    from megatron_swift.model import load_hf_config
    from megatron_swift.platform import ParallelLayout, init_parallel
    from megatron_swift.rollout.engine import SamplingSettings
    from megatron_swift.rollout.vllm_colocate import VLLMColocateEngine

    init_parallel(ParallelLayout(), seed=0)
    rows = []
    for hidden in opts.hidden:
        model_dir = prepare_model(os.path.join(opts.out, f"qwen3_h{hidden}"), "qwen3", hidden_size=hidden,
                                  intermediate_size=2 * hidden, num_hidden_layers=opts.layers,
                                  head_dim=hidden // 4)
        engine = VLLMColocateEngine(model_dir, max_model_len=256, dtype="float32", seed=0, max_num_seqs=64)
        gen = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, 500, (int(l),), generator=gen).tolist()
                   for l in torch.randint(8, 48, (opts.prompts,), generator=gen)]
        sampling = SamplingSettings(max_tokens=opts.tokens, temperature=1.0, seed=1)
        speeds = []
        for _ in range(3):
            started = time.perf_counter()
            out = engine.generate(prompts, sampling, n=opts.n)
            speeds.append(sum(len(c.token_ids) for c in out) / (time.perf_counter() - started))
        hf_config = load_hf_config(model_dir)
        chunks, config, settings = build_chunks(hf_config, {"perform_initialization": False})
        load_hf_into_mcore(chunks, model_dir, config, settings)
        weights = list(iter_hf_weights(chunks, config, settings, everywhere=True))
        mb = sum(t.numel() * t.element_size() for _, t in weights) / 2**20
        syncs = []
        for _ in range(3):
            started = time.perf_counter()
            engine.update_weights(iter_hf_weights(chunks, config, settings, everywhere=True))
            syncs.append(time.perf_counter() - started)
        sync = statistics.median(syncs)
        rows.append((hidden, opts.layers, mb, engine.load_seconds, statistics.median(speeds), sync, sync / mb))
        engine.close()
    print("| hidden | layers | weights (MB, fp32) | load (s) | generation (tokens/s) | sync (s) | sync (s/MB) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for h, layers, mb, load, speed, sync, per_mb in rows:
        print(f"| {h} | {layers} | {mb:.1f} | {load:.1f} | {speed:.0f} | {sync:.3f} | {per_mb:.4f} |")


if __name__ == "__main__":  # vLLM may spawn processes that re-import __main__
    main()
