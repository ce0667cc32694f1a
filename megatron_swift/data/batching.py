"""Micro batches in the trainer's format (``megatron_swift/trainer/step.py``).

A micro batch is a dict of ``[rows, seq]`` tensors:

* ``input_ids``    token ids
* ``labels``       *shifted*: ``labels[t]`` is the target of position ``t``; -100 = no loss. The last
                   label of every sequence is -100, so nothing is predicted across a boundary.
* ``position_ids`` 0..len-1 per sequence
* ``padding_mask`` True where a token is padding (right padding, the THD padding segment): MoE
                   routers leave those tokens out of their load statistics
* ``packed_seq_params`` (THD only) ``PackedSeqParams(qkv_format="thd", cu_seqlens_q/kv, max_seqlen_q/kv)``

Layouts:

* padded        ``[micro_batch, L]``; right padding (the trainer passes ``attention_mask=None``, i.e.
                causal only, so left padding would let tokens attend to pads); ``L`` = the longest
                sequence rounded up to ``pad_to_multiple_of``, or ``fixed_length``.
* padding-free  one THD row ``[1, T]``: the micro batch's sequences back to back, ``cu_seqlens`` at the
                boundaries. When ``T`` must be a multiple of something (sequence parallelism: TP) or a
                fixed size (pipeline parallelism without variable shapes), a padding *segment* is appended:
                its own cu_seqlens entry, positions from 0, labels -100, so it touches nothing real.
* packed        a packed sample (a list of sequences, see ``packing.py``) is laid out like padding-free.

Samples are the encoded rows: ``{"input_ids", "labels"}`` with *unshifted* labels (template output),
a list of those (a pack), or a preference pair (``chosen_*``/``rejected_*``: all chosen sequences of
the micro batch first, then all rejected ones, in the same order).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch

IGNORE_INDEX = -100


def shift_labels(labels: Sequence[int]) -> List[int]:
    """Unshifted template labels -> trainer labels (target of each position; last = -100)."""
    labels = list(labels)
    return labels[1:] + [IGNORE_INDEX]


def _sequences(items: Sequence[Any]) -> tuple:
    """Flattens samples into (input_ids, labels) sequences (+ KTO labels when present)."""
    seqs: List[tuple] = []
    rejected: List[tuple] = []
    kto: List[bool] = []
    for item in items:
        if isinstance(item, (list, tuple)):  # a pack
            seqs.extend((s["input_ids"], s["labels"]) for s in item)
        elif "chosen_input_ids" in item:
            seqs.append((item["chosen_input_ids"], item["chosen_labels"]))
            rejected.append((item["rejected_input_ids"], item["rejected_labels"]))
        else:
            seqs.append((item["input_ids"], item["labels"]))
            if "label" in item and item["label"] is not None:
                kto.append(bool(item["label"]))
    return seqs + rejected, kto


def kl_sequences(seqs: List[tuple]) -> List[tuple]:
    """KTO's KL sequences: sample i's prompt with sample (i-1)'s completion (tokens; the completion
    starts at the first label), cut to the longest sample so the micro batch keeps its shape."""
    if len(seqs) < 2:
        raise ValueError("KTO's KL term needs at least 2 samples per micro batch (--micro_batch_size >= 2)")
    parts = []
    for ids, lab in seqs:
        start = next((i for i, t in enumerate(lab) if t != IGNORE_INDEX), len(lab))
        parts.append((list(ids[:start]), list(ids[start:]), list(lab[start:])))
    longest = max(len(ids) for ids, _ in seqs)
    out = []
    for i, (prompt, _, _) in enumerate(parts):
        _, c_ids, c_lab = parts[i - 1]
        ids = (prompt + c_ids)[:longest]
        lab = ([IGNORE_INDEX] * len(prompt) + c_lab)[:longest]
        out.append((ids, lab))
    return out


def _round_up(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple) if multiple > 1 else n


@dataclass
class Collator:
    """Builds micro-batch dicts from samples.

    ``padding_free``: THD (also what packed samples always use). ``pad_to_multiple_of``: the padded
    length / THD total is a multiple of this (TP size with sequence parallelism).
    ``fixed_length``: every micro batch has exactly this length (padded) / total tokens (THD), e.g.
    for pipeline parallelism (the schedule's ``seq_length``).
    """

    pad_token_id: int
    padding_free: bool = True
    pad_to_multiple_of: int = 1
    fixed_length: Optional[int] = None
    # context parallelism: THD sequences are each padded to a multiple of 2 x CP (data/context_parallel.py)
    context_parallel_size: int = 1
    # sequences per sample: 2 for preference pairs (chosen + rejected) and KTO with its KL term, for
    # the schedule's shapes
    sequences_per_sample: int = 1
    # KTO's KL term: after the micro batch's samples come mismatched (prompt_i, completion_{i-1})
    # sequences (the micro batch's completions rotated by one, as TRL does within its batch)
    kto_kl: bool = False

    def __call__(self, items: Sequence[Any]) -> Dict[str, Any]:
        seqs, kto = _sequences(items)
        if not seqs:
            raise ValueError("empty micro batch")
        num_samples = len(seqs)
        if kto and self.kto_kl:
            seqs = seqs + kl_sequences(seqs)
        thd = self.padding_free or any(isinstance(i, (list, tuple)) for i in items)
        batch = self._thd(seqs) if thd else self._padded(seqs)
        if kto:
            batch["kto_label"] = torch.tensor(kto, dtype=torch.bool)
        pairs = sum(1 for i in items if isinstance(i, dict) and "chosen_input_ids" in i)
        if pairs:
            batch["num_pairs"] = pairs  # sequences [0, pairs) chosen, [pairs, 2 x pairs) rejected
            margins = [i.get("margin") for i in items if isinstance(i, dict) and "chosen_input_ids" in i]
            if any(m is not None for m in margins):  # the reward model's margin column (0 where a row has none)
                batch["margin"] = torch.tensor([0.0 if m is None else float(m) for m in margins], dtype=torch.float32)
        if kto:
            batch["num_samples"] = num_samples  # KTO: [0, n) the samples, [n, 2n) their KL sequences
        if pairs or kto:  # preference batches: real sequences in collation order (THD: padding segment after)
            batch["num_sequences"] = len(seqs)
        return batch

    def schedule_shape(self, micro_batch_size: int, seq_length: int) -> tuple:
        """``(seq_length, micro_batch_size)`` to hand megatron's pipeline schedule: a THD micro batch
        is one row of ``fixed_length`` tokens."""
        rows = micro_batch_size * self.sequences_per_sample
        if self.padding_free:
            return (self.fixed_length or seq_length * rows), 1
        return (self.fixed_length or seq_length), rows

    # ------------------------------------------------------------------ layouts
    def _padded(self, seqs) -> Dict[str, Any]:
        longest = max(len(ids) for ids, _ in seqs)
        length = self.fixed_length or _round_up(longest, self.pad_to_multiple_of)
        if longest > length:
            raise ValueError(f"a sequence of {longest} tokens does not fit fixed_length {length}")
        n = len(seqs)
        input_ids = torch.full((n, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
        for row, (ids, lab) in enumerate(seqs):
            input_ids[row, :len(ids)] = torch.as_tensor(ids, dtype=torch.long)
            labels[row, :len(ids)] = torch.as_tensor(shift_labels(lab), dtype=torch.long)
        position_ids = torch.arange(length, dtype=torch.long).unsqueeze(0).expand(n, -1).contiguous()
        lengths = torch.tensor([len(ids) for ids, _ in seqs]).unsqueeze(1)
        padding_mask = torch.arange(length).unsqueeze(0) >= lengths
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "padding_mask": padding_mask}

    def _thd(self, seqs) -> Dict[str, Any]:
        from megatron.core.packed_seq_params import PackedSeqParams

        lengths = [len(ids) for ids, _ in seqs]
        cp_multiple = 2 * self.context_parallel_size if self.context_parallel_size > 1 else 1
        slots = [_round_up(n, cp_multiple) for n in lengths]  # each sequence's room in the row
        total = sum(slots)
        target = self.fixed_length or _round_up(total, self.pad_to_multiple_of)
        if total > target:
            raise ValueError(f"a micro batch of {total} tokens does not fit fixed_length {target}")
        input_ids: List[int] = []
        labels: List[int] = []
        positions: List[int] = []
        pad_flags: List[bool] = []
        for (ids, lab), room in zip(seqs, slots):
            extra = room - len(ids)
            input_ids.extend(list(ids) + [self.pad_token_id] * extra)
            labels.extend(shift_labels(lab) + [IGNORE_INDEX] * extra)
            positions.extend(range(room))
            pad_flags.extend([False] * len(ids) + [True] * extra)
        pad = target - total
        if pad:
            input_ids.extend([self.pad_token_id] * pad)
            labels.extend([IGNORE_INDEX] * pad)
            positions.extend(range(pad))
            pad_flags.extend([True] * pad)
            lengths.append(pad)
            slots.append(pad)

        def cumulative(values):
            cu = torch.zeros(len(values) + 1, dtype=torch.int32)
            cu[1:] = torch.cumsum(torch.tensor(values, dtype=torch.int32), 0)
            return cu

        cu = cumulative(lengths)
        max_len = int(max(slots))
        params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                 max_seqlen_q=max_len, max_seqlen_kv=max_len)
        if cp_multiple > 1:  # sequences sit at padded offsets (Transformer Engine's THD + CP layout)
            padded = cumulative(slots)
            params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=padded,
                                     cu_seqlens_kv_padded=padded, max_seqlen_q=max_len, max_seqlen_kv=max_len)
        padding_mask = torch.tensor([pad_flags], dtype=torch.bool)
        return {
            "input_ids": torch.tensor([input_ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
            "padding_mask": padding_mask,
            "packed_seq_params": params,
        }


def move_batch(batch: Dict[str, Any], device) -> Dict[str, Any]:
    """Moves a micro batch (tensors and the cu_seqlens of ``packed_seq_params``) to ``device``."""
    import dataclasses

    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.to(device, non_blocking=True)
        elif dataclasses.is_dataclass(v):
            changes = {f.name: getattr(v, f.name).to(device, non_blocking=True)
                       for f in dataclasses.fields(v) if isinstance(getattr(v, f.name), torch.Tensor)}
            out[k] = dataclasses.replace(v, **changes)
        else:
            out[k] = v
    return out


def sequence_boundaries(batch: Dict[str, Any], num_sequences: Optional[int] = None) -> List[tuple]:
    """``(row, start, end)`` of the sequences of a micro batch, in collation order (for per-sequence
    sums, e.g. DPO log-probs): the rows of a padded batch, the cu_seqlens segments of a THD row.
    ``num_sequences`` drops what follows (the padding segment of a THD row)."""
    params = batch.get("packed_seq_params")
    if params is None:
        rows, length = batch["labels"].shape
        bounds = [(r, 0, length) for r in range(rows)]
    else:
        cu = params.cu_seqlens_q.tolist()
        bounds = [(0, a, b) for a, b in zip(cu[:-1], cu[1:])]
    return bounds if num_sequences is None else bounds[:num_sequences]
