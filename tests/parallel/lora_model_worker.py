"""One LoRA training step of a tiny model at a given layout (the parity_worker of full training,
with adapters): OUT/result.json (loss, grad norm), OUT/grads and OUT/params as dist checkpoints
(un-sharded by megatron when compared). The reference run (``--save_init``) writes the initial
weights, adapters included, that every layout loads."""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from parity_worker import global_batch, microbatches, save_tensors, share_initial_weights  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--family", default="qwen3")
    p.add_argument("--out", required=True)
    p.add_argument("--init_ckpt", required=True)
    p.add_argument("--save_init", action="store_true")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--sp", action="store_true")
    p.add_argument("--steps", type=int, default=1)
    args = p.parse_args()
    from megatron.core import parallel_state as ps

    from megatron_swift.model import build_model
    from megatron_swift.model.tiny import tiny_hf_config
    from megatron_swift.platform import ParallelLayout, destroy_parallel, init_parallel
    from megatron_swift.trainer.model_setup import OptimizerSettings, build_optimizer, wrap_ddp
    from megatron_swift.trainer.step import forward_backward
    from megatron_swift.tuners.lora import LoraSettings, apply_lora

    init_parallel(ParallelLayout(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
                                 expert_model_parallel_size=args.ep, expert_tensor_parallel_size=1), seed=7)
    hf = tiny_hf_config(args.family, num_hidden_layers=2)
    chunks, config, settings = build_model(hf, dict(sequence_parallel=args.sp, calculate_per_token_loss=True,
                                                    use_cpu_initialization=True))
    apply_lora(chunks, config, LoraSettings(rank=4, alpha=8, dropout=0.0, init_weights="false"))
    opt = OptimizerSettings(optimizer="adam", lr=1e-2, weight_decay=0.1, clip_grad=1.0,
                            use_distributed_optimizer=False)
    ddp_chunks = wrap_ddp(chunks, config, opt)
    optimizer = build_optimizer(ddp_chunks, config, opt)
    if not share_initial_weights(ddp_chunks, args.init_ckpt, save=args.save_init):
        optimizer.reload_model_params()
    batch = global_batch(8, 16, settings.vocab_size)
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    results = []
    for step in range(args.steps):
        mbs = microbatches(batch, dp_rank, dp_size, 2)
        for chunk in ddp_chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        result = forward_backward(ddp_chunks, iter(mbs), len(mbs), 16, 2)
        if step == 0:
            save_tensors(ddp_chunks, os.path.join(args.out, "grads"), source="grads")
        _, grad_norm, _ = optimizer.step()
        results.append({"loss": result.loss, "grad_norm": float(grad_norm)})
    save_tensors(ddp_chunks, os.path.join(args.out, "params"))
    if torch.distributed.get_rank() == 0:
        with open(os.path.join(args.out, "result.json"), "w") as f:
            json.dump(results, f)
    destroy_parallel()


if __name__ == "__main__":
    main()
