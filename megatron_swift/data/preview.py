"""Dry-run view of encoded samples: what the model reads and which tokens it is trained on."""

from __future__ import annotations

from typing import Any, Iterable, List

IGNORE_INDEX = -100


def _samples(dataset, n: int) -> List[dict]:
    out: List[dict] = []
    if isinstance(dataset, (list, tuple)):
        items: Iterable[Any] = dataset
    elif hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        items = (dataset[i] for i in range(len(dataset)))
    else:  # IterableDataset
        items = iter(dataset)
    for item in items:
        seqs = item if isinstance(item, (list, tuple)) else [item]
        for s in seqs:
            if "chosen_input_ids" in s:
                out.append({"input_ids": s["chosen_input_ids"], "labels": s["chosen_labels"], "tag": "chosen"})
                out.append({"input_ids": s["rejected_input_ids"], "labels": s["rejected_labels"], "tag": "rejected"})
            else:
                out.append(s)
            if len(out) >= n:
                return out[:n]
    return out


def format_labels(labels, tokenizer) -> str:
    """Loss tokens decoded, each run of masked tokens shown as ``[-100 * N]`` (ms-swift's style)."""
    parts, run, masked = [], [], 0
    for t in list(labels) + [None]:
        if t is not None and t != IGNORE_INDEX:
            if masked:
                parts.append(f"[-100 * {masked}]")
                masked = 0
            run.append(t)
            continue
        if run:
            parts.append(tokenizer.decode(run, skip_special_tokens=False))
            run = []
        if t is not None:
            masked += 1
    if masked:
        parts.append(f"[-100 * {masked}]")
    return "".join(parts)


def preview_samples(dataset, tokenizer, n: int = 3) -> str:
    """Text for ``--dataset_preview N``: the first ``n`` encoded samples (unshifted template labels),
    each with its decoded input and its labels (loss spans decoded, masked spans as ``[-100 * N]``)."""
    blocks = []
    for i, s in enumerate(_samples(dataset, n)):
        ids, labels = list(s["input_ids"]), list(s["labels"])
        n_loss = sum(1 for t in labels if t != IGNORE_INDEX)
        tag = f" ({s['tag']})" if "tag" in s else ""
        blocks.append(
            f"[sample {i}]{tag} {len(ids)} tokens, {n_loss} with loss\n"
            f"--- input ---\n{tokenizer.decode(ids, skip_special_tokens=False)}\n"
            f"--- labels ---\n{format_labels(labels, tokenizer)}"
        )
    return "\n\n".join(blocks) if blocks else "(no samples)"
