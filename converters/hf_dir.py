"""A Hugging Face model directory from an mcore model: the weights (write_hf.py), ``config.json``
with the saved dtype and the source's small files, appearing atomically."""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import torch
import torch.distributed as dist

from .hf_io import INDEX_FILE
from .write_hf import write_hf_weights

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
NOT_COPIED = {"config.json", INDEX_FILE, "pytorch_model.bin.index.json", "args.json"}


def write_hf_config(hf_config, out_dir: str, dtype: torch.dtype, source_dir: Optional[str] = None) -> None:
    """``config.json`` (the source's, with the saved dtype) and the source's other small files
    (generation_config.json, tokenizer files, chat template, remote code)."""
    name = str(dtype).replace("torch.", "")
    cfg = None
    if source_dir and os.path.isfile(os.path.join(source_dir, "config.json")):
        with open(os.path.join(source_dir, "config.json")) as f:
            cfg = json.load(f)
    if cfg is None:
        cfg = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
    _seq_cls_fields(cfg, hf_config)
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else None
    for d in (cfg, text):
        if d is None:
            continue
        if "dtype" in d or "torch_dtype" not in d:
            d["dtype"] = name
        if "torch_dtype" in d:
            d["torch_dtype"] = name
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    if source_dir and os.path.isdir(source_dir):
        for entry in sorted(os.listdir(source_dir)):
            path = os.path.join(source_dir, entry)
            if (not os.path.isfile(path) or entry in NOT_COPIED or entry.endswith(WEIGHT_SUFFIXES)
                    or entry.startswith(".")):
                continue
            shutil.copy2(path, os.path.join(out_dir, entry))


def _seq_cls_fields(cfg: dict, hf_config) -> None:
    """A reward / sequence-classification model (``hf_config`` says so) written from a causal LM's
    source directory: its config.json gets the classification architecture, labels and pad id."""
    from megatron_swift.rlhf.reward import seq_cls_num_labels

    if hf_config is None or not hasattr(hf_config, "to_dict") or seq_cls_num_labels(hf_config) is None:
        return
    d = hf_config.to_dict()
    for key in ("architectures", "id2label", "label2id", "pad_token_id", "problem_type"):
        if d.get(key) is not None:
            cfg[key] = d[key]
    cfg.pop("num_labels", None)  # transformers derives it from id2label


def save_mcore_as_hf(chunks: list, config, settings, hf_config, out_dir: str, *, source_dir: Optional[str] = None,
                     torch_dtype=None, max_shard_size="5GB", thread_count: int = 1, exist_ok: bool = False,
                     params=None) -> str:
    """Saves this model (every rank's chunks; collective) as a Hugging Face model directory.

    Weights stream tensor by tensor to the first rank of each pipeline stage, which writes them
    into pre-planned safetensors shards; ``config.json`` comes from ``source_dir`` (or
    ``hf_config``) with the saved dtype, plus the source's tokenizer / generation config files.
    The directory appears atomically (written next to ``out_dir`` and renamed).
    """
    from .outdir import atomic_output_dir

    dtype = torch_dtype_of(torch_dtype) or torch_dtype_of(getattr(hf_config, "dtype", None)) or torch.float32
    with atomic_output_dir(out_dir, exist_ok) as tmp:
        write_hf_weights(chunks, config, settings, tmp, dtype=dtype, max_shard_size=max_shard_size,
                         thread_count=thread_count, params=params)
        if not dist.is_initialized() or dist.get_rank() == 0:
            write_hf_config(hf_config, tmp, dtype, source_dir)
    return out_dir


def torch_dtype_of(value) -> Optional[torch.dtype]:
    if value is None:
        return None
    if isinstance(value, torch.dtype):
        return value
    name = str(value).replace("torch.", "")
    if name not in DTYPES:
        raise ValueError(f"unsupported torch_dtype {value!r} (choose from {', '.join(DTYPES)})")
    return DTYPES[name]
