"""``megatron pt`` / ``megatron sft``: from validated arguments to a finished, saved run.

1. typed settings from the arguments (trainer/options.py), process groups, this rank's model chunks
   (HF config -> mcore), DDP, optimizer
2. weights: ``--load`` (mcore checkpoint; resume unless ``--finetune``), else the HF safetensors
   of ``--model`` converted in memory, else (a config-only dir) random init, said in the log
3. data: datasets -> template -> batches for each step (this data-parallel rank's share)
4. the loop (trainer/loop.py), which logs, evaluates and saves
"""

from __future__ import annotations

import glob
import logging
import os
import time

import torch

from megatron_swift.platform import init_parallel

from .checkpoint import find_checkpoint, load_checkpoint
from .loop import LoopSettings, train, write_args_json_once
from .lr_schedule import ScheduleSettings, build_scheduler
from .model_setup import apply_freezing, build_optimizer, wrap_ddp
from .options import ModelSource, TrainingSettings, training_settings

logger = logging.getLogger("megatron_swift")


def _configure_logging(level_name: str | None) -> None:
    rank = int(os.environ.get("RANK", "0"))
    level = getattr(logging, level_name) if level_name else (logging.INFO if rank == 0 else logging.WARNING)
    logging.basicConfig(level=level, format=f"[%(asctime)s rank{rank}] %(message)s", datefmt="%H:%M:%S")
    logging.getLogger().setLevel(level)
    logging.getLogger("megatron_swift").setLevel(level)
    from megatron_swift.platform import quiet_megatron_logs

    quiet_megatron_logs(level)


def hf_config_of(source: ModelSource, hf_config_dict: dict | None = None):
    """The model's transformers config, with ``--rope_scaling`` applied."""
    from megatron_swift.model import load_hf_config

    if source.model_dir:
        config = load_hf_config(source.model_dir, trust_remote_code=source.trust_remote_code)
    else:
        from transformers import AutoConfig

        cfg = dict(hf_config_dict)
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    if source.model_type and source.model_type != config.model_type:
        raise ValueError(f"--model_type {source.model_type}: {source.model} is a {config.model_type!r} model "
                         f"(config.json); the family comes from config.json, leave --model_type unset")
    if source.rope_scaling is not None:
        from megatron_swift.model.config import apply_rope_scaling

        apply_rope_scaling(config, source.rope_scaling)
    return config


def save_dir_of(settings: TrainingSettings) -> str:
    """``--save``, plus ``v<N>-<timestamp>`` when ``--add_version`` (rank 0 decides, all agree)."""
    ckpt = settings.checkpoint
    save = ckpt.save
    resumed = [p for p in (ckpt.load, ckpt.adapter_load) if p and os.path.abspath(p) == os.path.abspath(save)]
    if not ckpt.add_version or resumed:
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
    settings = training_settings(args)
    _configure_logging(settings.logging.logging_level)
    if settings.manual_gc:
        import gc

        gc.disable()  # collected by the loop every --manual_gc_interval steps
        gc.collect()
    init_parallel(settings.layout, seed=settings.seed, timeout_seconds=settings.timeout_seconds,
                  backend=settings.distributed_backend)
    source = settings.source
    if not source.model_dir:  # a hub id: each node's first rank fetches it into the cache first
        from megatron_swift.data.pipeline import main_process_first
        from megatron_swift.model.hub import resolve_model_dir

        with main_process_first():
            source.model_dir = resolve_model_dir(source.model, source.use_hf, source.hub_token, source.model_revision)
        args.model_dir = source.model_dir  # the data layer reads the tokenizer from there
    hf_config = hf_config_of(source, args.hf_config)
    reward_model = settings.command == "rlhf" and args.rlhf_type == "rm"
    from megatron_swift.rlhf.reward import make_seq_cls_config, seq_cls_num_labels

    given_labels = seq_cls_num_labels(hf_config)
    if reward_model:  # a *ForSequenceClassification model with num_labels 1: the value head (rlhf/reward.py)
        if given_labels not in (None, 1):
            raise ValueError(f"--model {source.model}: a sequence-classification model with num_labels "
                             f"{given_labels}; a reward model (--rlhf_type rm) has num_labels 1")
        make_seq_cls_config(hf_config, num_labels=1)
    elif given_labels is not None:
        raise ValueError(f"--model {source.model}: {hf_config.architectures[0]} is a sequence-classification "
                         f"model; it trains with `megatron rlhf --rlhf_type rm` (`{settings.command}` needs a "
                         f"causal LM)")

    from megatron_swift.model import build_model

    resume = bool(settings.checkpoint.load and find_checkpoint(settings.checkpoint.load) is not None)
    has_weights = resume or bool(_hf_weight_files(source.model_dir))
    overrides = dict(settings.model_overrides)
    if not has_weights:
        overrides["perform_initialization"] = True  # nothing to load: a random start
    where = os.path.join(source.model_dir or str(source.model), "config.json")
    chunks, config, gpt_settings = build_model(hf_config, overrides, where=where)
    if config.bf16 or config.fp16:
        # megatron's half-precision wrapper: logits leave the last stage in fp32, so the loss and
        # its reduction are computed in fp32 (the optimizer keeps fp32 main params)
        from megatron.core.transformer.module import Float16Module

        chunks = [Float16Module(config, chunk) for chunk in chunks]
    if settings.lora is not None:
        from megatron_swift.tuners.lora import apply_lora_everywhere

        if settings.lora.peft_adapter:  # rank, alpha, targets... come from the adapter's config
            from megatron_swift.tuners.peft_io import settings_from_peft

            settings.lora = settings_from_peft(settings.lora, settings.lora.peft_adapter)
        if settings.checkpoint.adapter_load:  # its per-projection (canonical) layers, as it was built
            from dataclasses import replace

            from megatron_swift.tuners.lora import canonical_layers_in

            settings.lora = replace(settings.lora, canonical=tuple(sorted(
                set(settings.lora.canonical) | set(canonical_layers_in(settings.checkpoint.adapter_load)))))
        apply_lora_everywhere(chunks, config, settings.lora)
        if settings.checkpoint.save_safetensors:
            from megatron_swift.tuners.peft_io import check_peft_exportable

            check_peft_exportable(chunks, "--save_safetensors", gpt_settings.family)
    freeze = settings.freeze
    frozen = apply_freezing(chunks, config.num_layers, freeze.freeze_parameters, freeze.freeze_parameters_regex,
                            freeze.freeze_parameters_ratio, freeze.trainable_parameters,
                            freeze.trainable_parameters_regex)
    if frozen:
        logger.info("froze %d parameter tensors on this rank", frozen)
    ddp_chunks = wrap_ddp(chunks, config, settings.optimizer)
    group_overrides = None
    if settings.lora is not None:
        from megatron_swift.tuners.lora import lora_plus_overrides

        group_overrides = lora_plus_overrides(settings.lora, settings.optimizer.lr, settings.optimizer.min_lr)
    optimizer = build_optimizer(ddp_chunks, config, settings.optimizer, param_group_overrides=group_overrides)

    from .data_feed import build_training_data

    data = build_training_data(args, prefetch_steps=settings.prefetch_steps, max_epochs=settings.max_epochs)
    if settings.dataset_preview:  # a dry run: the samples are printed, nothing is trained
        from megatron_swift.platform import destroy_parallel

        destroy_parallel()
        return 0
    schedule_iters, stop_iters = _iterations(settings, data)
    scheduler = build_scheduler(optimizer, ScheduleSettings(
        lr=settings.optimizer.lr, train_iters=schedule_iters, min_lr=settings.optimizer.min_lr,
        lr_decay_style=settings.lr_decay_style, lr_decay_iters=settings.lr_decay_iters,
        lr_warmup_iters=settings.lr_warmup_iters, lr_warmup_fraction=settings.lr_warmup_fraction,
        weight_decay=settings.optimizer.weight_decay))

    ckpt = settings.checkpoint
    start = 0
    lora = settings.lora is not None
    if resume:  # under LoRA --load is the base model: weights only, no adapters
        loaded = load_checkpoint(ckpt.load, ddp_chunks, optimizer, scheduler, finetune=ckpt.finetune or lora,
                                 load_optim=ckpt.load_optim, load_rng=ckpt.load_rng,
                                 part="base" if lora else "all")
        start = loaded.iteration
        data.resume_from(start, loaded.data_state)
        if start:
            logger.info("loaded %s: resuming at iteration %d", loaded.directory, start)
        else:
            logger.info("loaded weights from %s", loaded.directory)
    elif has_weights:
        from megatron_swift.converters.api import load_hf_into_mcore

        load_hf_into_mcore(ddp_chunks, source.model_dir, config, gpt_settings)
        optimizer.reload_model_params()
        logger.info("loaded Hugging Face weights from %s", source.model_dir)
    else:
        logger.warning("%s has no *.safetensors and no --load was given: training from random init",
                       source.model_dir or source.model)
    if lora and settings.lora.peft_adapter:
        from megatron_swift.tuners.peft_io import load_peft_adapter

        load_peft_adapter(ddp_chunks, settings.lora.peft_adapter, config, gpt_settings)
        optimizer.reload_model_params()
        logger.info("loaded the PEFT adapter %s", settings.lora.peft_adapter)
    if lora and ckpt.adapter_load and find_checkpoint(ckpt.adapter_load) is not None:
        loaded = load_checkpoint(ckpt.adapter_load, ddp_chunks, optimizer, scheduler, finetune=ckpt.finetune,
                                 load_optim=ckpt.load_optim, load_rng=ckpt.load_rng, part="trainable",
                                 what="--adapter_load")
        start = loaded.iteration
        data.resume_from(start, loaded.data_state)
        resume = True
        logger.info("loaded the LoRA adapter %s%s", loaded.directory,
                    f": resuming at iteration {start}" if start else "")

    objective = None
    if settings.command == "rlhf":  # DPO / KTO: the loss hook and its reference model (megatron_swift/rlhf)
        from megatron_swift.checkpoint.layout import read_args_json
        from megatron_swift.rlhf.settings import build_objective, rlhf_settings

        # a resumed DPO/KTO run's weights are trained: the reference is not the policy then (an SFT
        # checkpoint given to --load is: preference training starts from it)
        resumed_rlhf = bool(start) and read_args_json(os.path.dirname(loaded.directory)).get("command") == "rlhf"
        if args.rlhf_type != "grpo":
            objective = build_objective(rlhf_settings(args), ddp_chunks, hf_config, overrides, where,
                                        policy_is_start=not resumed_rlhf, model_dir=source.model_dir,
                                        use_hf=source.use_hf, hub_token=source.hub_token,
                                        vocab_size=gpt_settings.vocab_size, lora=lora)

    if reward_model and getattr(hf_config, "pad_token_id", None) is None and data.pad_token_id is not None:
        hf_config.pad_token_id = data.pad_token_id  # transformers' *ForSequenceClassification needs it
    save_dir = save_dir_of(settings)
    if ckpt.overwrite and not resume:
        _clear_previous_run(save_dir)
    extra = {"model_type": hf_config.model_type, "template": data.template_name, "hf_config": hf_config.to_dict(),
             "model_dir": source.model_dir}
    if lora:
        from megatron_swift.tuners.lora import settings_record

        extra["lora"] = settings_record(settings.lora)
    write_args_json_once(args, save_dir, extra=extra)
    batches_for_step, seq_length, eval_batches = data.batches_for_step, data.seq_length, data.eval_batches
    engine = None
    if settings.command == "rlhf" and args.rlhf_type == "grpo":  # generation feeds the loop (rlhf/grpo_step.py)
        from megatron_swift.rlhf.grpo_run import build_grpo

        objective, batches_for_step, seq_length, engine = build_grpo(
            args, rlhf_settings(args), ddp_chunks, config, gpt_settings, hf_config, overrides, where, data,
            source.model_dir, save_dir if torch.distributed.get_rank() == 0 else None, resumed=bool(start))
        eval_batches = None  # evaluation by generation is not built (--split_dataset_ratio 0 for grpo)
    loop = LoopSettings(
        train_iters=schedule_iters, stop_iteration=stop_iters, micro_batch_size=data.rows_per_micro_batch,
        seq_length=seq_length, save_dir=save_dir, checkpoint=ckpt, logging=settings.logging,
        eval_interval=settings.eval_interval, exit=settings.exit,
        manual_gc_interval=settings.manual_gc_interval if settings.manual_gc else None, hf_export=_hf_export(settings, config, gpt_settings, hf_config, data) if ckpt.save_safetensors
        else None, objective=objective,
    )
    rank = torch.distributed.get_rank()
    try:
        state = train(ddp_chunks, optimizer, scheduler, batches_for_step, loop, start_iteration=start,
                      eval_batches=eval_batches, data_cursor=data.cursor)
    finally:
        if engine is not None:  # the rollout engine (GRPO); vLLM's shutdown also ends the process groups
            engine.close()
    if rank == 0:
        logger.info("done: %d iterations, final loss %.4f; checkpoint in %s", state.iteration,
                    state.losses[-1] if state.losses else float("nan"), save_dir)
    from megatron_swift.platform import destroy_parallel

    destroy_parallel()
    return 0


def _clear_previous_run(save_dir: str) -> None:
    """``--overwrite_output_dir``: the earlier run's checkpoints, tracker and logs go (rank 0)."""
    import shutil

    from megatron_swift.checkpoint import layout

    if torch.distributed.get_rank() == 0 and os.path.isdir(save_dir):
        for entry in os.listdir(save_dir):
            path = os.path.join(save_dir, entry)
            if entry.startswith("iter_") or entry in (layout.TRACKER, "logging.jsonl", "runs", "exit_reason.json"):
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        logger.info("--overwrite_output_dir: removed the previous run's checkpoints and logs from %s", save_dir)
    torch.distributed.barrier()


def _iterations(settings: TrainingSettings, data) -> tuple[int, int]:
    """(iterations the LR schedule spans, iteration training stops at). ``--train_iters`` alone:
    both; ``--max_epochs`` alone: the iterations of that many epochs; both: the schedule spans
    train_iters and training stops at whichever comes first (a streamed dataset ends its last epoch
    by itself: the data feed says so)."""
    if settings.train_iters is None:
        epochs = data.iters_for_epochs(settings.max_epochs)
        return epochs, epochs
    if settings.max_epochs is None or data.num_train_samples is None:
        return settings.train_iters, settings.train_iters
    return settings.train_iters, min(settings.train_iters, data.iters_for_epochs(settings.max_epochs))


def _hf_export(settings: TrainingSettings, config, gpt_settings, hf_config, data):
    """``--save_safetensors``: what writes the HF copy of a saved iteration (see checkpoint.py);
    under LoRA the PEFT adapter."""
    if settings.lora is not None:
        from megatron_swift.tuners.peft_io import PeftCopy

        return PeftCopy(config, gpt_settings, settings.lora, settings.source.model)
    from .hf_copy import HFCopy

    return HFCopy(config=config, gpt_settings=gpt_settings, hf_config=hf_config, source_dir=settings.source.model_dir,
                  torch_dtype=settings.model_overrides.get("params_dtype"))
