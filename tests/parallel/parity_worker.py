"""One training step of a tiny model at a given parallel layout; the oracle for parity tests.

Run as a single process (the reference) or under torchrun (the parallel layout). Both see the
same global batch. Outputs, all un-sharded by megatron-core's dist-checkpointing so layouts
compare key by key:
  OUT/result.json   loss, num_tokens, grad_norm (rank 0)
  OUT/grads/        the finalized gradients, as a dist checkpoint (not with the distributed
                    optimizer, whose grad buffers hold only the local shard)
  OUT/params/       the parameters after one optimizer step
The reference run (``--save_init``) also writes the initial weights that parallel runs load, so
every layout starts from the same numbers.
"""

from __future__ import annotations

import argparse
import json
import os

import torch


def parse():
    p = argparse.ArgumentParser()
    p.add_argument("--family", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--init_ckpt", required=True)
    p.add_argument("--save_init", action="store_true")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--vpp", type=int, default=None)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--sp", action="store_true")
    p.add_argument("--distributed_optimizer", action="store_true")
    p.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    p.add_argument("--num_layers", type=int, default=2)
    p.add_argument("--tie", action="store_true")
    p.add_argument("--global_batch", type=int, default=8)
    p.add_argument("--micro_batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--upstream_router", action="store_true",
                   help="megatron-core's own TopKRouter (to show its layout-dependent router-loss scale)")
    return p.parse_args()


def global_batch(n: int, seq: int, vocab: int, seed: int = 1234) -> dict:
    """Random tokens; each row's first 1-5 targets carry no loss (a 'prompt')."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (n, seq + 1), generator=g)
    labels = tokens[:, 1:].clone()
    prompt = torch.randint(1, 6, (n,), generator=g)
    for row, k in enumerate(prompt.tolist()):
        labels[row, :k] = -100
    return {
        "input_ids": tokens[:, :-1].contiguous(),
        "labels": labels,
        "position_ids": torch.arange(seq).unsqueeze(0).expand(n, -1).contiguous(),
    }


def microbatches(batch: dict, dp_rank: int, dp_size: int, micro: int):
    n = batch["input_ids"].shape[0]
    per_rank = n // dp_size
    rows = slice(dp_rank * per_rank, (dp_rank + 1) * per_rank)
    local = {k: v[rows] for k, v in batch.items()}
    return [{k: v[i:i + micro] for k, v in local.items()} for i in range(0, per_rank, micro)]


def sharded_state_dict(chunks: list) -> dict:
    from megatron_swift.trainer.model_setup import unwrap

    return {f"chunk{i}": unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)}


def share_initial_weights(chunks: list, path: str, save: bool) -> bool:
    """The reference run saves its initial weights; every layout loads them (megatron reshards).
    Returns True when it saved."""
    from megatron.core import dist_checkpointing

    from megatron_swift.model import unwrap

    if save:
        os.makedirs(path, exist_ok=True)
        dist_checkpointing.save(sharded_state_dict(chunks), path)
        return True
    state = dist_checkpointing.load(sharded_state_dict(chunks), path)
    for i, chunk in enumerate(chunks):
        unwrap(chunk).load_state_dict(state[f"chunk{i}"], strict=True)
    return False


def save_tensors(chunks: list, path: str, source: str = "params") -> None:
    """Saves params (or their finalized grads, swapped in for the save) as a dist checkpoint."""
    from megatron.core import dist_checkpointing

    from megatron_swift.trainer.model_setup import grad_of, model_parameters

    os.makedirs(path, exist_ok=True)
    saved = []
    if source == "grads":
        for _, p in model_parameters(chunks):
            saved.append((p, p.data.clone()))
            g = grad_of(p)
            p.data.copy_(g if g is not None else torch.zeros_like(p))
    try:
        dist_checkpointing.save(sharded_state_dict(chunks), path)
    finally:
        for p, data in saved:
            p.data.copy_(data)


def main():
    args = parse()
    from megatron.core import parallel_state as ps

    from megatron_swift.model import build_model
    from megatron_swift.model.tiny import tiny_hf_config
    from megatron_swift.platform import ParallelLayout, destroy_parallel, init_parallel
    from megatron_swift.trainer.model_setup import OptimizerSettings, build_optimizer, wrap_ddp
    forward_backward = globals().get("forward_backward") or __import__("megatron_swift.trainer.step", fromlist=["x"]).forward_backward

    layout = ParallelLayout(
        tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
        virtual_pipeline_model_parallel_size=args.vpp, expert_model_parallel_size=args.ep,
    )
    init_parallel(layout, seed=7)
    if args.upstream_router:
        import megatron_swift.model.moe_router as ours
        from megatron.core.transformer.moe.router import TopKRouter

        ours.TopKRouter = TopKRouter
    hf = tiny_hf_config(args.family, num_hidden_layers=args.num_layers, tie_word_embeddings=args.tie)
    # CPU initialisation: the same random weights at every layout (megatron's device init draws per shard)
    chunks, config, settings = build_model(hf, dict(sequence_parallel=args.sp, calculate_per_token_loss=True,
                                                    use_cpu_initialization=True))
    opt = OptimizerSettings(optimizer=args.optimizer, lr=1e-2, weight_decay=0.1, clip_grad=1.0,
                            use_distributed_optimizer=args.distributed_optimizer)
    ddp_chunks = wrap_ddp(chunks, config, opt)
    optimizer = build_optimizer(ddp_chunks, config, opt)

    if not share_initial_weights(ddp_chunks, args.init_ckpt, save=args.save_init):
        # the optimizer's fp32 main params were copied at construction; refresh them
        optimizer.reload_model_params()

    batch = global_batch(args.global_batch, args.seq, settings.vocab_size)
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    mbs = microbatches(batch, dp_rank, dp_size, args.micro_batch)
    iterators = [iter(mbs) for _ in ddp_chunks] if len(ddp_chunks) > 1 else iter(mbs)

    for chunk in ddp_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    result = forward_backward(ddp_chunks, iterators, len(mbs), args.seq, args.micro_batch)
    if not args.distributed_optimizer:
        save_tensors(ddp_chunks, os.path.join(args.out, "grads"), source="grads")
    _, grad_norm, _ = optimizer.step()
    save_tensors(ddp_chunks, os.path.join(args.out, "params"))
    if torch.distributed.get_rank() == 0:
        with open(os.path.join(args.out, "result.json"), "w") as f:
            json.dump({"loss": result.loss, "num_tokens": result.num_tokens,
                       "grad_norm": float(grad_norm)}, f)
    destroy_parallel()


if __name__ == "__main__":  # dist-checkpointing's writer spawns processes that re-import __main__
    main()
