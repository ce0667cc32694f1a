"""Colocated vLLM under a 2-process training layout: each rank builds its own engine, syncs the
trained weights through ``iter_hf_weights(everywhere=True)`` and scores a fixed sequence; the rank
compares with transformers on the weights it received.

    python -m torch.distributed.run --nproc_per_node 2 rollout_colocate_worker.py HF_DIR LAYOUT_JSON OUT_DIR

OUT_DIR/rank<r>.json: {"max_diff": float, "stale_diff": float, "weights_sum": float, "tokens": [[...]]}
"""

from __future__ import annotations

import json
import os
import sys
import zlib

SEQ = [5, 17, 230, 41, 99, 3, 512, 77, 18, 260, 61, 7, 140]


def main():
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from convert_worker import layout_of
    from megatron_swift.converters.api import iter_hf_weights, load_hf_into_mcore
    from megatron_swift.converters.mcore_io import build_chunks
    from megatron_swift.model import load_hf_config
    from megatron_swift.platform import destroy_parallel, init_distributed, init_parallel
    from megatron_swift.rollout.engine import SamplingSettings
    from megatron_swift.rollout.vllm_colocate import VLLMColocateEngine

    hf_dir, layout, out_dir = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    init_distributed()
    init_parallel(layout_of(layout), seed=3)
    hf_config = load_hf_config(hf_dir)
    chunks, config, settings = build_chunks(hf_config, {"perform_initialization": False})
    load_hf_into_mcore(chunks, hf_dir, config, settings)
    engine = VLLMColocateEngine(hf_dir, max_model_len=128, dtype="float32", seed=0, max_num_seqs=8)
    stale = torch.tensor(engine.prompt_logprobs(SEQ))
    # a training step's worth of change, as training makes it: TP shards differ, replicated tensors
    # (norms) stay equal on the ranks that hold them
    from megatron.core import parallel_state as ps

    with torch.no_grad():
        for chunk in chunks:
            for name, p in chunk.named_parameters():
                shard = ps.get_tensor_model_parallel_rank() if getattr(p, "tensor_model_parallel", False) else 0
                key = f"{name}|{shard}|{ps.get_pipeline_model_parallel_rank()}"
                gen = torch.Generator().manual_seed(zlib.crc32(key.encode()))
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    weights = list(iter_hf_weights(chunks, config, settings, everywhere=True))
    engine.update_weights(iter(weights))
    got = torch.tensor(engine.prompt_logprobs(SEQ))
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    model.load_state_dict(dict(weights), strict=False)
    with torch.no_grad():
        logits = model(torch.tensor([SEQ])).logits[0, :-1]
    want = torch.log_softmax(logits, -1).gather(-1, torch.tensor(SEQ[1:])[:, None])[:, 0]
    completions = engine.generate([[11, 12, 13]], SamplingSettings(max_tokens=8, temperature=1.0, seed=5), n=2)
    engine.close()
    assert dist.is_initialized()
    dist.barrier()  # the trainer's group still works after the engine is gone
    with open(os.path.join(out_dir, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump({"max_diff": float((got - want).abs().max()), "stale_diff": float((stale - want).abs().max()),
                   "weights_sum": float(sum(t.double().sum() for _, t in weights)),
                   "tokens": [c.token_ids for c in completions]}, f)
    destroy_parallel()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
