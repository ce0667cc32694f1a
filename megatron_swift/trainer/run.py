"""``megatron pt`` / ``megatron sft``: from validated arguments to a finished, saved run.

1. process groups + this rank's model chunks (HF config -> mcore), DDP, optimizer
2. weights: ``--load`` (mcore checkpoint; resume unless ``--finetune``), else the HF safetensors
   of ``--model`` converted in memory, else (a config-only dir) random init, said in the log
3. data: datasets -> template -> batches for each step (this data-parallel rank's share)
4. the loop (trainer/loop.py), which logs, evaluates and saves
"""

from __future__ import annotations

import glob
import json
import logging
import os
import time

import torch

from megatron_swift.platform import init_parallel

from . import options
from .checkpoint import load_checkpoint, read_latest
from .loop import LoopSettings, train, write_args_json_once
from .lr_schedule import ScheduleSettings, build_scheduler
from .model_setup import apply_freezing, build_optimizer, wrap_ddp

logger = logging.getLogger("megatron_swift")


def _configure_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[%(asctime)s rank{rank}] %(message)s", datefmt="%H:%M:%S")


def hf_config_of(args):
    from megatron_swift.model import load_hf_config

    if args.model_dir:
        return load_hf_config(args.model_dir, trust_remote_code=args.trust_remote_code)
    from transformers import AutoConfig

    cfg = dict(args.hf_config)
    return AutoConfig.for_model(cfg.pop("model_type"), **cfg)


def save_dir_of(args) -> str:
    """``--save``, plus ``v<N>-<timestamp>`` when ``--add_version`` (rank 0 decides, all agree)."""
    save = args.save
    if not args.add_version or (args.load and os.path.abspath(args.load) == os.path.abspath(save)):
        return save
    name = [None]
    if torch.distributed.get_rank() == 0:
        existing = [d for d in glob.glob(os.path.join(save, "v*-*")) if os.path.isdir(d)]
        numbers = [int(os.path.basename(d)[1:].split("-")[0]) for d in existing
                   if os.path.basename(d)[1:].split("-")[0].isdigit()]
        name[0] = os.path.join(save, f"v{max(numbers, default=-1) + 1}-{time.strftime('%Y%m%d-%H%M%S')}")
    torch.distributed.broadcast_object_list(name, src=0)
    return name[0]


def _hf_weight_files(model_dir: str | None) -> list[str]:
    if not model_dir:
        return []
    return sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))


def run_training(args) -> int:
    _configure_logging()
    init_parallel(options.parallel_layout(args), seed=args.seed)
    if not args.model_dir:  # a hub id: each node's first rank fetches it into the cache first
        from megatron_swift.data.pipeline import main_process_first
        from megatron_swift.model.hub import resolve_model_dir

        with main_process_first():
            args.model_dir = resolve_model_dir(args.model, args.use_hf, args.hub_token, args.model_revision)
    hf_config = hf_config_of(args)

    from megatron_swift.model import build_model

    where = os.path.join(args.model_dir or str(args.model), "config.json")
    chunks, config, settings = build_model(hf_config, options.model_overrides(args), where=where)
    if config.bf16 or config.fp16:
        # megatron's half-precision wrapper: logits leave the last stage in fp32, so the loss and
        # its reduction are computed in fp32 (the optimizer keeps fp32 main params)
        from megatron.core.transformer.module import Float16Module

        chunks = [Float16Module(config, chunk) for chunk in chunks]
    frozen = apply_freezing(chunks, config.num_layers, args.freeze_parameters, args.freeze_parameters_regex,
                            args.freeze_parameters_ratio, args.trainable_parameters, args.trainable_parameters_regex)
    if frozen:
        logger.info("froze %d parameter tensors on this rank", frozen)
    opt_settings = options.optimizer_settings(args)
    ddp_chunks = wrap_ddp(chunks, config, opt_settings)
    optimizer = build_optimizer(ddp_chunks, config, opt_settings)

    from .data_feed import build_training_data

    data = build_training_data(args)
    if args.dataset_preview:  # a dry run: the samples are printed, nothing is trained
        from megatron_swift.platform import destroy_parallel

        destroy_parallel()
        return 0
    train_iters = args.train_iters or data.iters_for_epochs(args.max_epochs)
    scheduler = build_scheduler(optimizer, ScheduleSettings(
        lr=args.lr, train_iters=train_iters, min_lr=args.min_lr, lr_decay_style=args.lr_decay_style,
        lr_decay_iters=args.lr_decay_iters, lr_warmup_iters=args.lr_warmup_iters,
        lr_warmup_fraction=args.lr_warmup_fraction, weight_decay=args.weight_decay))

    start = 0
    if args.load and read_latest(args.load) is not None:
        loaded = load_checkpoint(args.load, ddp_chunks, optimizer, scheduler, finetune=args.finetune,
                                 load_optim=not args.no_load_optim, load_rng=not args.no_load_rng)
        start = loaded.iteration
        if start:
            logger.info("loaded %s: resuming at iteration %d", loaded.directory, start)
        else:
            logger.info("loaded weights from %s", loaded.directory)
    elif _hf_weight_files(args.model_dir):
        from megatron_swift.converters.api import load_hf_into_mcore

        load_hf_into_mcore(ddp_chunks, args.model_dir, config, settings)
        optimizer.reload_model_params()
        logger.info("loaded Hugging Face weights from %s", args.model_dir)
    else:
        logger.warning("%s has no *.safetensors and no --load was given: training from random init",
                       args.model_dir or args.model)

    save_dir = save_dir_of(args)
    write_args_json_once(args, save_dir, extra={"model_type": hf_config.model_type, "template": data.template_name,
                                               "hf_config": hf_config.to_dict(), "model_dir": args.model_dir})
    loop = LoopSettings(
        train_iters=train_iters, micro_batch_size=data.rows_per_micro_batch, seq_length=data.seq_length,
        log_interval=args.log_interval, save_dir=save_dir, save_interval=args.save_interval,
        save_optim=not args.no_save_optim, save_rng=not args.no_save_rng,
        tensorboard_dir=args.tensorboard_dir or os.path.join(save_dir, "runs"),
        eval_interval=args.eval_interval, wandb_project=args.wandb_project, wandb_exp_name=args.wandb_exp_name,
    )
    state = train(ddp_chunks, optimizer, scheduler, data.batches_for_step, loop, start_iteration=start,
                  eval_batches=data.eval_batches)
    if torch.distributed.get_rank() == 0:
        logger.info("done: %d iterations, final loss %.4f; checkpoint in %s", state.iteration,
                    state.losses[-1] if state.losses else float("nan"), save_dir)
    from megatron_swift.platform import destroy_parallel

    destroy_parallel()
    return 0
