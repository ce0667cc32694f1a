"""Adapts the data pipeline (megatron_swift.data) to the loop: micro batches for each step.

The pipeline yields this data-parallel rank's micro batches in a fixed order for a given
``consumed_samples``; a step takes ``global_batch / (micro_batch x DP)`` of them. Starting the
iterator at ``start_step x global_batch`` samples makes a resumed run see exactly the batches an
uninterrupted run would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.distributed


@dataclass
class TrainingData:
    batches_for_step: Callable[[int], list]
    eval_batches: Optional[Callable[[], Iterator[list]]]
    # The shape megatron's pipeline schedule sends between stages: [seq_length, rows, hidden]. A
    # padding-free (THD) micro batch is one row of all its sequences, whatever --micro_batch_size.
    seq_length: int
    rows_per_micro_batch: int
    template_name: Optional[str]
    num_train_samples: Optional[int]
    iters_for_epochs: Callable[[int], int]


def build_training_data(args) -> TrainingData:
    from megatron.core import parallel_state as ps
    from transformers import AutoTokenizer

    from megatron_swift.data.batching import move_batch
    from megatron_swift.data.pipeline import prepare_data
    from megatron_swift.platform import get_platform

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir or args.model, trust_remote_code=args.trust_remote_code)
    data = prepare_data(args, tokenizer)
    if getattr(args, "dataset_preview", 0):
        from megatron_swift.data.preview import preview_samples

        if torch.distributed.get_rank() == 0:
            print(preview_samples(data.train, tokenizer, args.dataset_preview), flush=True)
    dp_rank = ps.get_data_parallel_rank(with_context_parallel=True)
    dp_size = ps.get_data_parallel_world_size(with_context_parallel=True)
    mbs = args.micro_batch_size
    num_micro = args.global_batch_size // (mbs * dp_size)
    device = get_platform().device
    seq_length, rows = data.collator.schedule_shape(mbs, data.max_length or 0)

    def to_device(batch: dict) -> dict:
        return move_batch(batch, device)

    state = {"iterator": None, "next_step": None}

    def batches_for_step(step: int) -> list:
        if state["next_step"] != step:  # first call, or a jump (resume): restart at that position
            state["iterator"] = data.train_iterator(mbs, dp_rank, dp_size,
                                                    consumed_samples=step * args.global_batch_size)
        state["next_step"] = step + 1
        return [to_device(next(state["iterator"])) for _ in range(num_micro)]

    eval_batches = None
    if data.val is not None:
        def eval_batches():
            iterator = data.val_iterator(mbs, dp_rank, dp_size)
            limit = None if args.eval_iters is None or args.eval_iters < 0 else args.eval_iters
            done = 0
            group = []
            for batch in iterator:
                group.append(to_device(batch))
                if len(group) == num_micro:
                    yield group
                    group, done = [], done + 1
                    if limit is not None and done >= limit:
                        return
            if group:  # a last, smaller step (a val set smaller than one global batch included)
                yield group

    def iters_for_epochs(epochs: int) -> int:
        return data.train_iters(args.global_batch_size, epochs, mbs, dp_size)

    template_name = getattr(data.template, "name", None)
    return TrainingData(batches_for_step=batches_for_step, eval_batches=eval_batches, seq_length=seq_length,
                        rows_per_micro_batch=rows, template_name=template_name, num_train_samples=data.num_train_samples,
                        iters_for_epochs=iters_for_epochs)
