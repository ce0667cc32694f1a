"""Trains a tiny model for N steps on deterministic synthetic batches at a given layout, with
optional checkpointing, SIGKILL after a save, and resume. Writes the per-step losses (rank 0).

The batch of step i depends only on i, so a resumed run sees exactly the data an uninterrupted
run sees.
"""

from __future__ import annotations

import argparse
import json
import os
import signal

import torch


def parse():
    p = argparse.ArgumentParser()
    p.add_argument("--family", default="qwen3")
    p.add_argument("--out", required=True)
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--vpp", type=int, default=None)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--sp", action="store_true")
    p.add_argument("--num_layers", type=int, default=2)
    p.add_argument("--save", default=None)
    p.add_argument("--save_interval", type=int, default=None)
    p.add_argument("--load", default=None)
    p.add_argument("--finetune", action="store_true")
    p.add_argument("--kill_after_iteration", type=int, default=None)
    p.add_argument("--kill_during_save_iteration", type=int, default=None)
    p.add_argument("--distributed_optimizer", action="store_true")
    p.add_argument("--init_ckpt", default=None, help="initial weights shared by all layouts")
    p.add_argument("--save_init", action="store_true")
    p.add_argument("--global_batch", type=int, default=4)
    p.add_argument("--micro_batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=16)
    return p.parse_args()


def main():
    args = parse()
    from megatron.core import parallel_state as ps

    from megatron_swift.model import build_model
    from megatron_swift.model.tiny import tiny_hf_config
    from megatron_swift.platform import ParallelLayout, destroy_parallel, init_parallel
    from megatron_swift.trainer import checkpoint as ckpt
    from megatron_swift.trainer.loop import LoopSettings, train
    from megatron_swift.trainer.lr_schedule import ScheduleSettings, build_scheduler
    from megatron_swift.trainer.model_setup import OptimizerSettings, build_optimizer, wrap_ddp
    from parity_worker import global_batch, microbatches

    init_parallel(ParallelLayout(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
                                 virtual_pipeline_model_parallel_size=args.vpp, expert_model_parallel_size=args.ep),
                  seed=3)
    hf = tiny_hf_config(args.family, num_hidden_layers=args.num_layers)
    # CPU initialisation: the same random weights at every layout (megatron's device init draws per shard)
    chunks, config, settings = build_model(hf, {"calculate_per_token_loss": True, "sequence_parallel": args.sp,
                                                "use_cpu_initialization": True})
    if args.init_ckpt:  # before the optimizer exists, so its main params start from these weights
        from parity_worker import share_initial_weights

        share_initial_weights(chunks, args.init_ckpt, save=args.save_init)
    opt = OptimizerSettings(lr=3e-3, use_distributed_optimizer=args.distributed_optimizer)
    ddp_chunks = wrap_ddp(chunks, config, opt)
    optimizer = build_optimizer(ddp_chunks, config, opt)
    scheduler = build_scheduler(optimizer, ScheduleSettings(lr=3e-3, min_lr=3e-4, train_iters=args.iters,
                                                            lr_warmup_iters=2, weight_decay=0.1))
    start = 0
    if args.load:
        loaded = ckpt.load_checkpoint(args.load, ddp_chunks, optimizer, scheduler, finetune=args.finetune)
        start = loaded.iteration

    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()

    def batches_for_step(step: int) -> list:
        batch = global_batch(args.global_batch, args.seq, settings.vocab_size, seed=1000 + step)
        return microbatches(batch, dp_rank, dp_size, args.micro_batch)

    if args.kill_after_iteration is not None:
        original = ckpt.save_checkpoint

        def save_then_die(save_dir, iteration, *a, **k):
            out = original(save_dir, iteration, *a, **k)
            if iteration == args.kill_after_iteration:
                os.kill(os.getpid(), signal.SIGKILL)
            return out

        ckpt.save_checkpoint = save_then_die  # what the loop's Checkpointer calls

    if args.kill_during_save_iteration is not None:
        from megatron.core import dist_checkpointing

        original_save = dist_checkpointing.save

        def save_then_die_before_publish(state, directory, *a, **k):
            out = original_save(state, directory, *a, **k)
            if state.get("iteration") == args.kill_during_save_iteration:
                os.kill(os.getpid(), signal.SIGKILL)  # files written, not yet renamed/published
            return out

        dist_checkpointing.save = save_then_die_before_publish

    loop = LoopSettings(train_iters=args.iters, micro_batch_size=args.micro_batch, seq_length=args.seq,
                        log_interval=1, save_dir=args.save, save_interval=args.save_interval)
    state = train(ddp_chunks, optimizer, scheduler, batches_for_step, loop, start_iteration=start)
    if torch.distributed.get_rank() == 0:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "losses.json"), "w") as f:
            json.dump({"start": start, "losses": state.losses}, f)
    destroy_parallel()


if __name__ == "__main__":
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
