"""HF -> mcore into built model chunks: each rank computes its shards from the HF tensors,
reading only the slices it needs."""

from __future__ import annotations

import logging
from typing import Iterable, Optional

import torch

from .hf_io import HFCheckpoint
from .plan import HFEntry, LocalParam, global_entries, local_params
from .registry import mapping_of
from .transforms import Geometry, geometry, hf_shapes, hf_to_local

logger = logging.getLogger(__name__)


def materialize(lp: LocalParam, reader: HFCheckpoint, geo: Geometry, dtype: Optional[torch.dtype] = None,
                rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """This rank's shard of ``lp`` (or its rows ``[a, b)``) computed from the HF checkpoint; only
    the slices it needs are read."""
    sources = lp.sources
    shapes = hf_shapes(lp.rule, lp.global_shape, geo)

    def read(i: int, index: tuple) -> torch.Tensor:
        return reader.read(sources[i], lp.layer, lp.expert, shapes[i], index)

    tensor = hf_to_local(lp.rule, read, tuple(lp.param.shape), lp.tp_rank, lp.tp_size, geo, rows)
    expected = tuple(lp.param.shape) if rows is None else (rows[1] - rows[0], *lp.param.shape[1:])
    if tuple(tensor.shape) != expected:
        raise ValueError(f"{lp.name}: converted shard has shape {list(tensor.shape)}, the model expects "
                         f"{list(expected)}")
    return tensor.to(dtype or lp.param.dtype)


def family_ignored(reader: HFCheckpoint, config, settings) -> list[str]:
    """The checkpoint's tensors the family knowingly leaves out (logged once)."""
    family = settings.family
    keys = sorted(k for k in reader.tensors if family.ignored(config, k))
    if keys:
        logger.warning("%s: %d tensors not converted (%s ... ): %s", family.name, len(keys), keys[0],
                       family.ignore_reason or "left out by the family")
    return keys


def check_hf_checkpoint(reader: HFCheckpoint, entries: list[HFEntry], ignore_unused: Iterable[str] = ()) -> None:
    """Every tensor the model needs is there with the right shape; nothing in the checkpoint is
    left unused (an unused tensor means the converted model would silently differ) except the
    ``ignore_unused`` ones."""
    used = set()
    for e in entries:
        key, info, stacked = reader.require(e.source, e.layer, e.expert, e.shape)
        used.add(key)
    ignorable = {"lm_head.weight"} if any(not e.written for e in entries) else set()
    ignorable |= set(ignore_unused)
    unused = sorted(k for k in reader.tensors if k not in used and k not in ignorable
                    and not k.endswith("rotary_emb.inv_freq"))
    if unused:
        shown = ", ".join(unused[:8]) + (f" ... ({len(unused)} in all)" if len(unused) > 8 else "")
        raise ValueError(f"the checkpoint in {reader.dir} has tensors the conversion does not use: {shown}; "
                         f"the model config does not describe this checkpoint")


def load_hf_into_mcore(chunks: list, hf_dir: str, config, settings, *, check: bool = True) -> None:
    """Fills this rank's already-built model chunks in place from a Hugging Face safetensors dir.

    Each rank reads only the slices of its own shards. With ``check`` (default) every rank first
    verifies the whole checkpoint against the model (missing tensors, shapes, unused tensors):
    a collective call, so every rank must make it.
    """
    mapping = mapping_of(settings)
    geo = geometry(config, settings)
    reader = HFCheckpoint(hf_dir)
    try:
        lps = local_params(chunks, mapping, settings.share_embeddings_and_output_weights)
        ignored = family_ignored(reader, config, settings)
        if getattr(settings, "num_labels", None) is not None and "score.weight" not in reader.tensors:
            # a reward model started from a causal LM (as transformers' from_pretrained does): the
            # value head keeps its fresh initialisation, the LM head is not used
            lps = [lp for lp in lps if lp.name != "output_layer.weight"]
            ignored = list(ignored) + ["lm_head.weight"]
            logger.warning("%s has no score.weight (a causal LM): the value head starts from random init (std %g)",
                           hf_dir, config.init_method_std)
        if check:
            check_hf_checkpoint(reader, global_entries(lps, geo), ignored)
        with torch.no_grad():
            for lp in lps:
                lp.param.copy_(materialize(lp, reader, geo))
    finally:
        reader.close()
