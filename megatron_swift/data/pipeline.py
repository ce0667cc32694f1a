"""From parsed arguments + tokenizer to micro-batch iterators: the one entry point the trainer uses.

::

    data = prepare_data(args, tokenizer)          # load, normalize, sample, split, encode, pack
    it = data.train_iterator(micro_batch_size=args.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                             consumed_samples=consumed)   # cyclic; next() -> one micro-batch dict
    for _ in range(num_microbatches): batch = next(it)    # (megatron's schedule calls next())
    seq_length, mbs = data.collator.schedule_shape(args.micro_batch_size, data.max_length)
    val = data.val_iterator(micro_batch_size, dp_rank, dp_size)   # one pass, or None

Modes (what a row encodes to) follow the command: ``pt`` (generation template, loss on all tokens),
``sft``, and for ``rlhf``: ``pair`` (dpo, rm, orpo, simpo, cpo), ``kto``, ``prompt`` (grpo, gkd, ppo).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, List, Optional

from .batching import Collator
from .dataset import DataOptions, DropStats, encode_dataset, load_datasets
from .iterators import micro_batches, streaming_micro_batches, train_iters_for_epochs
from .packing import pack_dataset

logger = logging.getLogger(__name__)

RLHF_MODES = {"dpo": "pair", "rm": "pair", "orpo": "pair", "simpo": "pair", "cpo": "pair", "kto": "kto",
              "grpo": "prompt", "gkd": "prompt", "ppo": "prompt"}


def encode_mode(args) -> str:
    command = getattr(args, "command", "") or "sft"
    if command == "pt":
        return "pt"
    if command == "rlhf":
        return RLHF_MODES[getattr(args, "rlhf_type", "dpo")]
    return "sft"


@contextlib.contextmanager
def main_process_first():
    """The first process of each node preprocesses (and fills the datasets cache) before the others."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        yield True
        return
    first = int(os.environ.get("LOCAL_RANK", dist.get_rank())) == 0
    if not first:
        dist.barrier()
    try:
        yield first
    finally:
        if first:
            dist.barrier()


@dataclass
class PreparedData:
    train: Any  # encoded datasets.Dataset, PackedDataset, or IterableDataset (streaming)
    val: Any
    template: Any
    collator: Collator
    mode: str
    streaming: bool
    shuffle: bool
    seed: int
    max_length: Optional[int]
    stats: List[DropStats] = field(default_factory=list)

    @property
    def num_train_samples(self) -> Optional[int]:
        return None if self.streaming else len(self.train)

    def train_iterator(self, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                       consumed_samples: int = 0, max_epochs: Optional[int] = None) -> Iterator[dict]:
        """Cyclic; a streamed dataset ends after ``max_epochs`` passes when given."""
        if self.streaming:
            return streaming_micro_batches(self.train, self.collator, micro_batch_size, dp_rank, dp_size,
                                           consumed_samples=consumed_samples, max_epochs=max_epochs)
        return micro_batches(self.train, self.collator, micro_batch_size, dp_rank, dp_size, shuffle=self.shuffle,
                             seed=self.seed, consumed_samples=consumed_samples)

    def val_iterator(self, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1) -> Optional[Iterator[dict]]:
        if self.val is None:
            return None
        if self.streaming:
            return streaming_micro_batches(self.val, self.collator, micro_batch_size, dp_rank, dp_size, cyclic=False)
        return micro_batches(self.val, self.collator, micro_batch_size, dp_rank, dp_size, shuffle=False,
                             cyclic=False)

    def train_iters(self, global_batch_size: int, max_epochs: int, micro_batch_size: int = 1,
                    dp_size: int = 1) -> int:
        if self.streaming:
            raise ValueError("--max_epochs needs the dataset length; with --streaming give --train_iters")
        return train_iters_for_epochs(len(self.train), global_batch_size, max_epochs, micro_batch_size, dp_size)


def collator_from_args(args, pad_token_id: int, max_length: Optional[int], pipeline_fixed_shapes: bool = True) -> Collator:
    """THD for --padding_free or --packing; lengths a multiple of TP under sequence parallelism;
    fixed shapes under pipeline parallelism (``pipeline_fixed_shapes``)."""
    tp = getattr(args, "tensor_model_parallel_size", 1) or 1
    cp = getattr(args, "context_parallel_size", 1) or 1
    multiple = tp if getattr(args, "sequence_parallel", False) and tp > 1 else 1
    multiple *= 2 * cp if cp > 1 else 1  # each CP rank gets 2 chunks, each a multiple of the SP split
    thd = bool(getattr(args, "padding_free", True) or getattr(args, "packing", False))
    mode = encode_mode(args)
    kto_kl = mode == "kto" and getattr(args, "loss_type", None) != "apo_zero_unpaired"  # KTO's KL sequences
    per_sample = 2 if mode == "pair" or kto_kl else 1  # a preference pair: chosen + rejected
    fixed = None
    if pipeline_fixed_shapes and (getattr(args, "pipeline_model_parallel_size", 1) or 1) > 1:
        if max_length is None:
            raise ValueError("pipeline parallelism needs fixed micro-batch shapes: set --max_length")
        fixed = max_length * (getattr(args, "micro_batch_size", 1) * per_sample if thd else 1)
        fixed = -(-fixed // multiple) * multiple
    return Collator(pad_token_id=pad_token_id, padding_free=thd, pad_to_multiple_of=multiple, fixed_length=fixed,
                    context_parallel_size=cp, sequences_per_sample=per_sample, kto_kl=kto_kl)


def prepare_data(args, tokenizer, *, template=None, mode: Optional[str] = None, cache_dir: Optional[str] = None,
                 pipeline_fixed_shapes: bool = True) -> PreparedData:
    """Parsed arguments (DataArguments + TemplateArguments + parallel sizes) -> PreparedData."""
    from megatron_swift.template import template_from_args

    mode = mode or encode_mode(args)
    template = template or template_from_args(args, tokenizer)
    opts = DataOptions.from_args(args)
    if not opts.dataset:
        raise ValueError("--dataset is required")
    packing = bool(getattr(args, "packing", False))
    packing_cache = getattr(args, "packing_cache", None)
    if packing and (opts.streaming or mode not in ("sft", "pt")):
        raise ValueError("--packing supports pt/sft without --streaming")
    if packing and template.max_length is None:
        raise ValueError("--packing needs --max_length (the pack size)")
    with main_process_first() as first:
        if not first:
            opts = DataOptions.from_args(args, load_from_cache_file=True)
        loaded = load_datasets(opts, require_response=mode != "prompt", cache_dir=cache_dir)
        stats = list(loaded.stats)
        enc = dict(mode=mode, strict=opts.strict, num_proc=opts.dataset_num_proc,
                   load_from_cache_file=opts.load_from_cache_file, stats=stats)
        train = encode_dataset(loaded.train, template, name="train", **enc)
        val = encode_dataset(loaded.val, template, name="val", **enc)
        if packing:
            train = pack_dataset(train, template.max_length, packing_cache, opts.load_from_cache_file)
            if val is not None:
                val = pack_dataset(val, template.max_length, packing_cache, opts.load_from_cache_file)
    if not opts.streaming and len(train) == 0:
        drops = "; ".join(s.summary() for s in stats if s.step == "encode" and s.name == "train")
        raise ValueError(f"no training samples left: {drops or 'every row was dropped (see the drop counts above)'}")
    collator = collator_from_args(args, template.pad_token_id, template.max_length, pipeline_fixed_shapes)
    return PreparedData(train=train, val=val, template=template, collator=collator, mode=mode,
                        streaming=opts.streaming, shuffle=opts.dataset_shuffle, seed=opts.data_seed,
                        max_length=template.max_length, stats=stats)
