"""Datasets -> normalized rows -> template encoding -> padded / padding-free (THD) / packed micro batches.

Public API (see ``pipeline.py`` for the trainer's recipe)::

    prepare_data(args, tokenizer) -> PreparedData     # .train_iterator(...), .val_iterator(...), .collator
    load_datasets(DataOptions(...)) -> LoadedData     # rows only (normalized; sampled; split)
    encode_dataset(ds, template, mode=...)            # rows -> input_ids/labels/length
    Collator(pad_token_id, padding_free=..., ...)     # samples -> the trainer's micro-batch dict
    micro_batches(dataset, collator, mbs, dp_rank, dp_size, ...)
    pack_dataset(encoded, max_length, cache_dir)      # --packing
    preview_samples(dataset, tokenizer, n)            # dry-run text
    make_tiny_tokenizer(dir, template_name)           # small real tokenizers for tests / demos
    check_dataset_args(args)                          # --dataset/--val_dataset checks before any worker (stdlib)

Importing the package is cheap: the names above load their modules (torch, datasets, ...) on first
use, so ``megatron_swift.data.checks`` (stdlib only) can run while the CLI validates arguments.
"""

import importlib

_EXPORTS = {
    "megatron_swift.template.tiny_tokenizer": ["make_tiny_tokenizer"],
    ".batching": ["Collator", "move_batch", "sequence_boundaries", "shift_labels"],
    ".checks": ["check_dataset_args"],
    ".dataset": ["DataOptions", "DropStats", "LoadedData", "encode_dataset", "load_datasets", "sample_indices"],
    ".iterators": ["MicroBatchSampler", "micro_batches", "streaming_micro_batches", "train_iters_for_epochs"],
    ".loading": ["DataRowError", "DatasetNotFoundError", "DatasetSpec", "parse_dataset_spec"],
    ".packing": ["PackedDataset", "pack_dataset", "pack_lengths"],
    ".pipeline": ["PreparedData", "collator_from_args", "encode_mode", "prepare_data"],
    ".preprocess": ["RowError", "UnsupportedRowError", "normalize_row"],
    ".preview": ["format_labels", "preview_samples"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
