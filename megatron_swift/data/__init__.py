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
"""

from megatron_swift.template.tiny_tokenizer import make_tiny_tokenizer

from .batching import Collator, move_batch, sequence_boundaries, shift_labels
from .dataset import DataOptions, DropStats, LoadedData, encode_dataset, load_datasets, sample_indices
from .iterators import MicroBatchSampler, micro_batches, streaming_micro_batches, train_iters_for_epochs
from .loading import DataRowError, DatasetNotFoundError, DatasetSpec, parse_dataset_spec
from .packing import PackedDataset, pack_dataset, pack_lengths
from .pipeline import PreparedData, collator_from_args, encode_mode, prepare_data
from .preprocess import RowError, normalize_row
from .preview import format_labels, preview_samples

__all__ = [
    "Collator", "DataOptions", "DataRowError", "DatasetNotFoundError", "DatasetSpec", "DropStats", "LoadedData",
    "MicroBatchSampler", "PackedDataset", "PreparedData", "RowError", "collator_from_args", "encode_dataset",
    "encode_mode", "format_labels", "load_datasets", "make_tiny_tokenizer", "micro_batches", "move_batch",
    "normalize_row", "pack_dataset", "pack_lengths", "parse_dataset_spec", "prepare_data", "preview_samples",
    "sample_indices", "sequence_boundaries", "shift_labels", "streaming_micro_batches", "train_iters_for_epochs",
]
