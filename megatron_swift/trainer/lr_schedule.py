"""Learning-rate schedule: megatron-core's OptimizerParamScheduler filled from the arguments."""

from __future__ import annotations


def warmup_iters(args, decay_iters: int) -> int:
    if args.lr_warmup_fraction is not None:
        return int(args.lr_warmup_fraction * decay_iters)
    return args.lr_warmup_iters


def build_scheduler(optimizer, args, train_iters: int):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    decay_iters = args.lr_decay_iters or train_iters
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=warmup_iters(args, decay_iters),
        lr_decay_steps=decay_iters,
        lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=train_iters,
        wd_incr_style="constant",
    )
