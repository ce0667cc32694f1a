"""``megatron export``: HF <-> Megatron-Core conversion and the precision check.

``run_export(args)`` is what the CLI calls (in each torchrun worker, or the only process) with
the validated ``ExportCommandArguments``. Problems with the inputs (a missing shard, a shape
that does not match config.json, an unsupported architecture or layout, an existing output
directory) are raised as ValueError / FileNotFoundError by the converter and printed as
``megatron export: error: <message>`` (exit code 2).

Cheap checks of the inputs run before torch / megatron are imported, so a typo fails fast.
"""

from __future__ import annotations

import glob
import json
import os
import sys

UNSUPPORTED = (
    ("merge_lora", "--merge_lora"),
    ("mcore_adapters", "--mcore_adapters"),
    ("push_to_hub", "--push_to_hub"),
)


def _preflight(args) -> None:
    for name, flag in UNSUPPORTED:
        if getattr(args, name, None):
            raise ValueError(f"{flag} is not supported by this version of megatron export yet")
    if not args.safe_serialization:
        raise ValueError("--safe_serialization false (torch .bin output) is not supported; HF weights are "
                         "written as safetensors")
    if args.context_parallel_size != 1:
        raise ValueError("--context_parallel_size > 1 is not supported for conversion (it does not change "
                         "the weights: convert with context_parallel_size 1)")
    if args.to_mcore:
        if not args.model_dir:
            raise ValueError(f"--model {args.model!r}: conversion needs a local Hugging Face model directory "
                             f"(hub downloads are not supported here)")
        index = os.path.join(args.model_dir, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                files = sorted(set((json.load(f).get("weight_map") or {}).values()))
            missing = [n for n in files if not os.path.isfile(os.path.join(args.model_dir, n))]
            if missing:
                raise FileNotFoundError(f"{index} lists {len(missing)} shard file(s) that do not exist: "
                                        f"{', '.join(missing)}")
        elif not glob.glob(os.path.join(args.model_dir, "*.safetensors")):
            raise FileNotFoundError(f"no safetensors weights in {args.model_dir} (expected model.safetensors, "
                                    f"model.safetensors.index.json or *.safetensors)")
    else:
        if not os.path.isdir(os.path.expanduser(args.mcore_model)):
            raise FileNotFoundError(f"--mcore_model {args.mcore_model}: directory does not exist")


def _layout(args):
    from megatron_swift.platform import ParallelLayout

    return ParallelLayout.from_args(args)


def _overrides(args) -> dict:
    out = {}
    if args.decoder_first_pipeline_num_layers is not None:
        out["num_layers_in_first_pipeline_stage"] = args.decoder_first_pipeline_num_layers
    if args.decoder_last_pipeline_num_layers is not None:
        out["num_layers_in_last_pipeline_stage"] = args.decoder_last_pipeline_num_layers
    if args.expert_tensor_parallel_size is not None:
        out["expert_tensor_parallel_size"] = args.expert_tensor_parallel_size
    return out


def export(args):
    """Runs the conversion; raises ValueError / FileNotFoundError on bad inputs."""
    _preflight(args)
    from megatron_swift.converters.convert import convert_hf_to_mcore, convert_mcore_to_hf
    from megatron_swift.platform import destroy_parallel, init_parallel

    init_parallel(_layout(args), seed=getattr(args, "seed", 42) or 42)
    try:
        if args.to_mcore:
            from megatron_swift.model import load_hf_config

            hf_config = load_hf_config(args.model_dir, trust_remote_code=args.trust_remote_code)
            result = convert_hf_to_mcore(
                args.model_dir, args.output_dir, hf_config=hf_config, overrides=_overrides(args),
                torch_dtype=args.torch_dtype, thread_count=args.thread_count, exist_ok=args.exist_ok,
                test_convert_precision=args.test_convert_precision, model_id=args.model)
        else:
            # default: the dtype the checkpoint was converted with (args.json), not the source config's
            explicit = "torch_dtype" in (getattr(args, "explicit_args", None) or [])
            result = convert_mcore_to_hf(
                args.mcore_model, args.output_dir, source_dir=args.model_dir, overrides=_overrides(args),
                torch_dtype=args.torch_dtype if explicit else None, max_shard_size=args.max_shard_size,
                thread_count=args.thread_count, exist_ok=args.exist_ok,
                test_convert_precision=args.test_convert_precision)
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
