"""Megatron checkpoint directories: one set of rules for the validator, the trainer and the converters.

``layout`` (stdlib only, so argument validation can use it before torch is imported): the tracker
file, iteration directories, which checkpoint a directory resolves to, ``args.json``. ``state``
(torch): the model / RNG parts of a checkpoint's state dict. Saving and loading whole training
checkpoints (optimizer, scheduler, atomic publish, rotation) is ``megatron_swift.trainer.checkpoint``.
"""
from megatron_swift.checkpoint.layout import (ARGS_FILE, RELEASE, TRACKER, CheckpointError, CheckpointRef,
                                              complete_iterations, has_checkpoint, iteration_dirname, read_args_json,
                                              read_tracker, resolve, write_args_json, write_tracker)

__all__ = ["ARGS_FILE", "RELEASE", "TRACKER", "CheckpointError", "CheckpointRef", "complete_iterations",
           "has_checkpoint", "iteration_dirname", "read_args_json", "read_tracker", "resolve", "write_args_json",
           "write_tracker"]
