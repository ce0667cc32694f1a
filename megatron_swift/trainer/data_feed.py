"""Adapts the data pipeline (megatron_swift.data) to the loop: micro batches for each step.

The pipeline yields this data-parallel rank's micro batches in a fixed order for a given
``consumed_samples``; a step takes ``global_batch / (micro_batch x DP)`` of them. Starting the
iterator at ``start_step x global_batch`` samples makes a resumed run see exactly the batches an
uninterrupted run would. With ``prefetch_steps`` > 0 a background thread prepares the next steps'
micro batches (collation, host-to-device copies) while the current step runs.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.distributed

logger = logging.getLogger("megatron_swift")


class EndOfData(Exception):
    """The data ran out before the step could be filled: the last of ``--max_epochs`` epochs of a
    streamed dataset is done (every data-parallel rank reads the same stream, so all agree)."""


@dataclass
class TrainingData:
    batches_for_step: Callable[[int], list]  # raises EndOfData when the data is done
    eval_batches: Optional[Callable[[], Iterator[list]]]
    # The shape megatron's pipeline schedule sends between stages: [seq_length, rows, hidden]. A
    # padding-free (THD) micro batch is one row of all its sequences, whatever --micro_batch_size.
    seq_length: int
    rows_per_micro_batch: int
    template_name: Optional[str]
    num_train_samples: Optional[int]
    iters_for_epochs: Callable[[int], int]
    # where the stream stands after an iteration (saved with checkpoints), and resuming from it
    cursor: Callable[[int], dict]
    resume_from: Callable[[int, dict], None]
    pad_token_id: Optional[int] = None  # the template's (a reward model's config records it)
    prepared: Optional[object] = None  # the data pipeline's PreparedData (GRPO reads its prompts)
    tokenizer: Optional[object] = None


class _Prefetcher:
    """Runs ``produce(step)`` for the following steps in a daemon thread, ``depth`` steps ahead.

    Steps are asked for in order; a request for another step (a resume that jumps) restarts the
    producer there. An exception in the thread (EndOfData included) is raised by ``get``."""

    def __init__(self, produce: Callable[[int], list], depth: int):
        self.produce, self.depth = produce, depth
        self.thread: Optional[threading.Thread] = None
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.next_step: Optional[int] = None
        self.stop = threading.Event()

    def _run(self, start: int, out: queue.Queue, stop: threading.Event) -> None:
        step = start
        while not stop.is_set():
            try:
                item = (step, self.produce(step), None)
            except BaseException as exc:  # delivered to the consumer, which raises it
                out.put((step, None, exc))
                return
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            step += 1

    def get(self, step: int) -> list:
        if self.next_step != step:
            self.close()
            self.stop = threading.Event()
            self.queue = queue.Queue(maxsize=self.depth)
            self.thread = threading.Thread(target=self._run, args=(step, self.queue, self.stop), daemon=True,
                                           name="megatron-swift-batches")
            self.thread.start()
        got, batches, error = self.queue.get()
        assert got == step, (got, step)
        if error is not None:
            self.next_step = None
            raise error
        self.next_step = step + 1
        return batches

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=5)
            self.thread = None


def build_training_data(args, prefetch_steps: int = 0, max_epochs: Optional[int] = None) -> TrainingData:
    from megatron.core import parallel_state as ps
    from transformers import AutoTokenizer

    from megatron_swift.data.batching import move_batch
    from megatron_swift.data.context_parallel import split_for_context_parallel
    from megatron_swift.data.pipeline import prepare_data
    from megatron_swift.platform import get_platform

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir or args.model, trust_remote_code=args.trust_remote_code)
    data = prepare_data(args, tokenizer)
    if getattr(args, "dataset_preview", 0):
        from megatron_swift.data.preview import preview_samples

        if torch.distributed.get_rank() == 0:
            print(preview_samples(data.train, tokenizer, args.dataset_preview), flush=True)
    # The ranks of a context-parallel group share their micro batches (each takes its part of every
    # sequence), so the data is sharded over data-parallel replicas without CP.
    dp_rank = ps.get_data_parallel_rank()
    dp_size = ps.get_data_parallel_world_size()
    cp_rank, cp_size = ps.get_context_parallel_rank(), ps.get_context_parallel_world_size()
    mbs = args.micro_batch_size
    num_micro = args.global_batch_size // (mbs * dp_size)
    device = get_platform().device
    seq_length, rows = data.collator.schedule_shape(mbs, data.max_length or 0)
    # a streamed dataset ends after --max_epochs passes (map-style data: the loop stops in time)
    epochs = max_epochs if data.streaming else None

    def to_device(batch: dict) -> dict:
        return move_batch(split_for_context_parallel(batch, cp_size, cp_rank), device)

    gbs = args.global_batch_size
    # consumed samples = base + (step - base_step) x global batch: a resume continues where the saved
    # run stopped, even if --global_batch_size changed
    state = {"iterator": None, "next_step": None, "base_step": 0, "base_samples": 0}

    def consumed(step: int) -> int:
        return state["base_samples"] + (step - state["base_step"]) * gbs

    def cursor(iteration: int) -> dict:
        return {"consumed_samples": consumed(iteration), "global_batch_size": gbs}

    def resume_from(step: int, saved: dict) -> None:
        samples = int(saved.get("consumed_samples", step * gbs))
        if saved.get("global_batch_size") not in (None, gbs) and torch.distributed.get_rank() == 0:
            logger.warning("resuming with --global_batch_size %d (the checkpoint was trained with %d): the data "
                           "continues after the %d samples already seen; the LR schedule counts iterations",
                           gbs, saved["global_batch_size"], samples)
        state.update(base_step=step, base_samples=samples, next_step=None)

    def produce(step: int) -> list:
        if state["next_step"] != step:  # first call, or a jump (resume): restart at that position
            state["iterator"] = data.train_iterator(mbs, dp_rank, dp_size, consumed_samples=consumed(step),
                                                    max_epochs=epochs)
        state["next_step"] = step + 1
        try:
            return [to_device(next(state["iterator"])) for _ in range(num_micro)]
        except StopIteration:
            state["next_step"] = None
            raise EndOfData(f"the data ended after {max_epochs} epoch(s) (--max_epochs), before step {step + 1}") \
                from None

    batches_for_step = _Prefetcher(produce, prefetch_steps).get if prefetch_steps > 0 else produce

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

    def iters_for_epochs(n: int) -> int:
        return data.train_iters(args.global_batch_size, n, mbs, dp_size)

    template_name = getattr(data.template, "name", None)
    return TrainingData(batches_for_step=batches_for_step, eval_batches=eval_batches, seq_length=seq_length,
                        rows_per_micro_batch=rows, template_name=template_name,
                        num_train_samples=data.num_train_samples, iters_for_epochs=iters_for_epochs,
                        cursor=cursor, resume_from=resume_from,
                        pad_token_id=getattr(data.template, "pad_token_id", None), prepared=data,
                        tokenizer=tokenizer)
