"""Whole-model conversions (what ``megatron export`` runs); every rank of the job calls them."""

from __future__ import annotations

import gc
import logging
import math
import os
from typing import Optional

import torch
import torch.distributed as dist

from .hf_dir import save_mcore_as_hf, torch_dtype_of
from .load import check_hf_checkpoint, family_ignored, materialize
from .plan import global_entries, local_params
from .registry import mapping_of
from .hf_io import HFCheckpoint
from .mcore_io import (RELEASE, CheckpointParams, build_chunks, read_args_json, save_lazily, write_layout)
from .outdir import atomic_output_dir
from .transforms import geometry

logger = logging.getLogger(__name__)


def default_thread_count(total_bytes: int) -> int:
    """Writer threads per rank: one per 10 GB of weights, 2 to 8 (two already overlap reading
    the next tensor with writing the last one)."""
    return max(2, min(8, math.ceil(total_bytes / 10e9)))


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def hf_config_from_dict(cfg: dict):
    from transformers import CONFIG_MAPPING

    model_type = cfg.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"args.json: unknown model_type {model_type!r}")
    return CONFIG_MAPPING[model_type].from_dict(dict(cfg))


def _config_dict(hf_config) -> dict:
    d = hf_config.to_dict()
    for k, v in list(d.items()):
        if isinstance(v, torch.dtype):
            d[k] = str(v).replace("torch.", "")
    return d


def convert_hf_to_mcore(model_dir: str, out_dir: str, *, hf_config=None, overrides: Optional[dict] = None,
                        torch_dtype=None, thread_count: Optional[int] = None, exist_ok: bool = False,
                        test_convert_precision: bool = False, model_id: Optional[str] = None,
                        hf_attn_implementation: str = "eager") -> Optional[dict]:
    """HF safetensors dir -> Megatron-Core dist checkpoint (``out_dir/release`` + tracker + args.json).

    Needs ``init_parallel`` at the layout to convert with. The model is built on the meta device;
    each tensor is computed from the HF slices this rank needs when the checkpoint writer reaches
    it. Returns the precision numbers when ``test_convert_precision``.
    """
    from megatron_swift.model import load_hf_config

    hf_config = hf_config or load_hf_config(model_dir)
    dtype = torch_dtype_of(torch_dtype) or torch_dtype_of(getattr(hf_config, "dtype", None)) or torch.float32
    overrides = dict(overrides or {})
    chunks, config, settings = build_chunks(hf_config, dict(overrides, params_dtype=dtype), meta=True)
    geo = geometry(config, settings)
    lps = local_params(chunks, mapping_of(settings), settings.share_embeddings_and_output_weights)
    reader = HFCheckpoint(model_dir)
    try:
        check_hf_checkpoint(reader, global_entries(lps, geo), family_ignored(reader, config, settings))
        threads = thread_count or default_thread_count(reader.total_bytes)
        info = {
            "model": model_id or os.path.abspath(model_dir),
            "model_dir": os.path.abspath(model_dir),
            "model_type": hf_config.model_type,
            "hf_config": _config_dict(hf_config),
            "template": None,
            "torch_dtype": str(dtype).replace("torch.", ""),
            "ckpt_format": "torch_dist",
            "iteration": RELEASE,
            "converted_at_layout": {k: getattr(config, k) for k in (
                "tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size")},
        }
        with atomic_output_dir(out_dir, exist_ok) as tmp:
            save_lazily(chunks, lps, lambda lp, rows=None: materialize(lp, reader, geo, rows=rows),
                        os.path.join(tmp, RELEASE), threads)
            if _rank0():
                write_layout(tmp, info)
    finally:
        reader.close()
    del chunks, lps
    if test_convert_precision:
        gc.collect()
        from .precision import check_precision

        return check_precision(out_dir, model_dir, hf_config, overrides, result_dir=out_dir,
                               hf_attn_implementation=hf_attn_implementation)
    return None


def convert_mcore_to_hf(mcore_dir: str, out_dir: str, *, hf_config=None, source_dir: Optional[str] = None,
                        overrides: Optional[dict] = None, torch_dtype=None, max_shard_size="5GB",
                        thread_count: Optional[int] = None, exist_ok: bool = False,
                        test_convert_precision: bool = False, hf_attn_implementation: str = "eager",
                        num_labels: Optional[int] = None) -> Optional[dict]:
    """Megatron-Core dist checkpoint -> HF dir (sharded safetensors, config, tokenizer files).

    The HF config comes from ``hf_config``, else the checkpoint's ``args.json``, else
    ``source_dir``. Parameters are loaded a layer at a time and gathered tensor by tensor.
    """
    from megatron_swift.model import load_hf_config

    recorded = read_args_json(mcore_dir)
    base = os.path.basename(os.path.normpath(os.path.expanduser(mcore_dir)))
    if not recorded and (base.startswith("iter_") or base == RELEASE):  # an iteration directory: its run's args.json
        recorded = read_args_json(os.path.dirname(os.path.normpath(os.path.expanduser(mcore_dir))))
    if hf_config is None:
        if recorded.get("hf_config"):
            hf_config = hf_config_from_dict(recorded["hf_config"])
        elif source_dir:
            hf_config = load_hf_config(source_dir)
        else:
            raise ValueError(f"no HF config for {mcore_dir}: it has no args.json with hf_config; pass --model")
    if num_labels is not None:  # --task_type seq_cls: a reward / classification model
        from megatron_swift.rlhf.reward import make_seq_cls_config

        make_seq_cls_config(hf_config, num_labels)
    if source_dir is None and recorded.get("model_dir") and os.path.isdir(recorded["model_dir"]):
        source_dir = recorded["model_dir"]
    dtype = (torch_dtype_of(torch_dtype) or torch_dtype_of(recorded.get("torch_dtype")) or torch_dtype_of(getattr(hf_config, "dtype", None))
             or torch.float32)
    overrides = dict(overrides or {})
    chunks, config, settings = build_chunks(hf_config, dict(overrides, params_dtype=dtype), meta=True)
    params = CheckpointParams(chunks, mcore_dir)
    if thread_count is None:
        numel = sum(p.numel() for c in chunks for p in c.parameters())
        thread_count = default_thread_count(numel * torch.empty((), dtype=dtype).element_size())
    save_mcore_as_hf(chunks, config, settings, hf_config, out_dir, source_dir=source_dir, torch_dtype=dtype,
                     max_shard_size=max_shard_size, thread_count=thread_count, exist_ok=exist_ok, params=params)
    del chunks, params
    if test_convert_precision:
        gc.collect()
        from .precision import check_precision

        return check_precision(mcore_dir, out_dir, hf_config, overrides, result_dir=out_dir,
                               hf_attn_implementation=hf_attn_implementation)
    return None
