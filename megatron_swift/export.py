"""``megatron export``: HF <-> Megatron-Core conversion and the precision check.

``run_export(args)`` is what the CLI calls (in each torchrun worker, or the only process) with
the validated ``ExportCommandArguments``; ``export_settings(args)`` reads every argument export
uses, once, typed. Problems with the inputs (a missing shard, a shape that does not match
config.json, an unsupported architecture or layout, an existing output directory) are raised as
ValueError / FileNotFoundError by the converter and printed as ``megatron export: error: <message>``
(exit code 2). Arguments export does not build are refused before workers start (args/support.py).

Cheap checks of the inputs run before torch / megatron are imported, so a typo fails fast.
"""

from __future__ import annotations

import glob
import json
import os
import sys
from dataclasses import dataclass
from typing import Optional

# ms-swift's --attn_impl names -> transformers' attn_implementation
HF_ATTENTION = {None: "eager", "eager": "eager", "sdpa": "sdpa", "flash_attn": "flash_attention_2"}


@dataclass
class ExportSettings:
    to_mcore: bool  # else to_hf (exactly one is true: validated)
    model: str
    model_type: Optional[str]  # must match config.json's when given
    model_dir: Optional[str]  # None for a hub id until it is downloaded
    mcore_model: Optional[str]
    output_dir: str
    layout: dict  # ParallelLayout fields (torch is imported only after the preflight checks)
    overrides: dict  # TransformerConfig fields of the layout
    torch_dtype: Optional[str]  # explicit --torch_dtype (None: the source's)
    thread_count: Optional[int]
    max_shard_size: str
    exist_ok: bool
    test_convert_precision: bool
    hf_attn_implementation: str
    trust_remote_code: bool
    seed: int
    timeout_seconds: int
    distributed_backend: Optional[str]
    use_hf: bool
    hub_token: Optional[str]
    model_revision: Optional[str]
    mcore_adapters: tuple = ()  # LoRA adapter checkpoints (one is built): exported as PEFT or merged
    merge_lora: bool = False
    num_labels: Optional[int] = None  # --task_type seq_cls: a *ForSequenceClassification (reward model)


def _overrides(args) -> dict:
    out = {}
    if args.decoder_first_pipeline_num_layers is not None:
        out["num_layers_in_first_pipeline_stage"] = args.decoder_first_pipeline_num_layers
    if args.decoder_last_pipeline_num_layers is not None:
        out["num_layers_in_last_pipeline_stage"] = args.decoder_last_pipeline_num_layers
    if args.expert_tensor_parallel_size is not None:
        out["expert_tensor_parallel_size"] = args.expert_tensor_parallel_size
    return out


LAYOUT_FIELDS = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size",
                 "context_parallel_size", "expert_model_parallel_size", "expert_tensor_parallel_size")


def export_settings(args) -> ExportSettings:
    explicit = "torch_dtype" in (getattr(args, "explicit_args", None) or [])
    assert args.to_mcore != args.to_hf
    return ExportSettings(
        to_mcore=args.to_mcore, model=args.model, model_type=args.model_type, model_dir=args.model_dir,
        mcore_model=args.mcore_model,
        output_dir=args.output_dir, layout={name: getattr(args, name) for name in LAYOUT_FIELDS},
        overrides=_overrides(args),
        # to_hf: the dtype the checkpoint was converted with (args.json) unless given
        torch_dtype=args.torch_dtype if (explicit or args.to_mcore) else None, thread_count=args.thread_count,
        max_shard_size=args.max_shard_size, exist_ok=args.exist_ok, test_convert_precision=args.test_convert_precision,
        hf_attn_implementation=HF_ATTENTION[args.attn_impl], trust_remote_code=args.trust_remote_code,
        seed=args.seed, timeout_seconds=args.ddp_timeout, distributed_backend=args.distributed_backend,
        use_hf=args.use_hf, hub_token=args.hub_token, model_revision=args.model_revision,
        mcore_adapters=tuple(args.mcore_adapters), merge_lora=args.merge_lora,
        num_labels=(args.num_labels or 1) if args.task_type == "seq_cls" else None,
    )


def _preflight(s: ExportSettings) -> None:
    if s.layout["context_parallel_size"] != 1:
        raise ValueError("--context_parallel_size > 1 is not supported for conversion (it does not change "
                         "the weights: convert with context_parallel_size 1)")
    if s.to_mcore:
        if not s.model_dir:
            return  # a hub id: downloaded (and its files checked) by the workers
        index = os.path.join(s.model_dir, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                files = sorted(set((json.load(f).get("weight_map") or {}).values()))
            missing = [n for n in files if not os.path.isfile(os.path.join(s.model_dir, n))]
            if missing:
                raise FileNotFoundError(f"{index} lists {len(missing)} shard file(s) that do not exist: "
                                        f"{', '.join(missing)}")
        elif not glob.glob(os.path.join(s.model_dir, "*.safetensors")):
            raise FileNotFoundError(f"no safetensors weights in {s.model_dir} (expected model.safetensors, "
                                    f"model.safetensors.index.json or *.safetensors)")
    elif s.mcore_model is not None:
        if not os.path.isdir(os.path.expanduser(s.mcore_model)):
            raise FileNotFoundError(f"--mcore_model {s.mcore_model}: directory does not exist")


def export(args):
    """Runs the conversion; raises ValueError / FileNotFoundError on bad inputs."""
    s = export_settings(args)
    _preflight(s)
    from megatron_swift.converters.convert import convert_hf_to_mcore, convert_mcore_to_hf
    from megatron_swift.platform import ParallelLayout, destroy_parallel, init_parallel

    init_parallel(ParallelLayout(**s.layout), seed=s.seed, timeout_seconds=s.timeout_seconds, backend=s.distributed_backend)
    try:
        if s.model_dir is None:  # a hub id: each node's first rank fetches it into the cache first
            from megatron_swift.data.pipeline import main_process_first
            from megatron_swift.model.hub import resolve_model_dir

            with main_process_first():
                s.model_dir = resolve_model_dir(s.model, s.use_hf, s.hub_token, s.model_revision)
            _preflight(s)
        if s.mcore_adapters:
            from megatron_swift.tuners.export_lora import export_lora

            result = export_lora(s.mcore_adapters[0], s.output_dir, merge=s.merge_lora,
                                 model_dir=s.model_dir if s.model else None, mcore_model=s.mcore_model,
                                 overrides=s.overrides, torch_dtype=s.torch_dtype, max_shard_size=s.max_shard_size,
                                 exist_ok=s.exist_ok)
        elif s.to_mcore:
            from megatron_swift.model import load_hf_config

            hf_config = load_hf_config(s.model_dir, trust_remote_code=s.trust_remote_code)
            if s.model_type and s.model_type != hf_config.model_type:
                raise ValueError(f"--model_type {s.model_type}: {s.model} is a {hf_config.model_type!r} model "
                                 f"(config.json); leave --model_type unset")
            if s.num_labels is not None:
                from megatron_swift.rlhf.reward import make_seq_cls_config

                make_seq_cls_config(hf_config, s.num_labels)
            result = convert_hf_to_mcore(
                s.model_dir, s.output_dir, hf_config=hf_config, overrides=s.overrides, torch_dtype=s.torch_dtype,
                thread_count=s.thread_count, exist_ok=s.exist_ok, test_convert_precision=s.test_convert_precision,
                model_id=s.model, hf_attn_implementation=s.hf_attn_implementation)
        else:
            result = convert_mcore_to_hf(
                s.mcore_model, s.output_dir, source_dir=s.model_dir, overrides=s.overrides, torch_dtype=s.torch_dtype,
                max_shard_size=s.max_shard_size, thread_count=s.thread_count, exist_ok=s.exist_ok,
                test_convert_precision=s.test_convert_precision, hf_attn_implementation=s.hf_attn_implementation,
                num_labels=s.num_labels)
    finally:
        destroy_parallel()
    return result


def run_export(args) -> int:
    """CLI entry: 0 on success, 2 with ``megatron export: error: ...`` on bad inputs."""
    try:
        export(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"megatron export: error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0
