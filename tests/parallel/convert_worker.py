"""Runs a list of conversion steps in one (torchrun or single) process group; the tests compare
what they write against transformers' own files and logits.

    python -m torch.distributed.run --nproc_per_node 2 convert_worker.py PLAN.json RESULT.json

PLAN.json is a list of steps, each run at its own parallel layout (megatron's groups are
re-initialised between steps; the process group stays):

  {"op": "to_mcore", "hf": DIR, "out": DIR, "layout": {"tp": 2}, "precision": true, "dtype": null}
  {"op": "to_hf", "mcore": DIR, "out": DIR, "source": DIR, "layout": {"pp": 2}, "precision": false,
   "max_shard_size": "200KB"}
  {"op": "api", "hf": DIR, "out": DIR, "layout": {...}}   the trainer's API: build real chunks,
      load_hf_into_mcore, save_mcore_as_hf

A step may carry "expect_error": the step must raise and RESULT.json records the message.
RESULT.json (rank 0): one entry per step, {"precision": {...}} or {"error": "..."}.
"""

from __future__ import annotations

import json
import sys
import traceback


def layout_of(spec: dict):
    from megatron_swift.platform import ParallelLayout

    return ParallelLayout(
        tensor_model_parallel_size=spec.get("tp", 1),
        pipeline_model_parallel_size=spec.get("pp", 1),
        virtual_pipeline_model_parallel_size=spec.get("vpp"),
        expert_model_parallel_size=spec.get("ep", 1),
    )


def run_step(step: dict):
    from megatron_swift.converters.api import convert_hf_to_mcore, convert_mcore_to_hf, load_hf_into_mcore, save_mcore_as_hf
    from megatron_swift.converters.mcore_io import build_chunks
    from megatron_swift.model import load_hf_config
    from megatron_swift.platform import init_parallel

    init_parallel(layout_of(step.get("layout", {})), seed=3)
    op = step["op"]
    if op == "to_mcore":
        return convert_hf_to_mcore(step["hf"], step["out"], torch_dtype=step.get("dtype"),
                                   test_convert_precision=step.get("precision", False),
                                   thread_count=step.get("threads"), exist_ok=step.get("exist_ok", False))
    if op == "to_hf":
        return convert_mcore_to_hf(step["mcore"], step["out"], source_dir=step.get("source"),
                                   torch_dtype=step.get("dtype"), max_shard_size=step.get("max_shard_size", "5GB"),
                                   thread_count=step.get("threads"), exist_ok=step.get("exist_ok", False),
                                   test_convert_precision=step.get("precision", False))
    if op == "api":
        hf_config = load_hf_config(step["hf"])
        chunks, config, settings = build_chunks(hf_config, {"perform_initialization": False})
        load_hf_into_mcore(chunks, step["hf"], config, settings)
        save_mcore_as_hf(chunks, config, settings, hf_config, step["out"], source_dir=step["hf"],
                         max_shard_size=step.get("max_shard_size", "5GB"), thread_count=2)
        return None
    raise ValueError(f"unknown op {op}")


def main():
    import torch.distributed as dist

    from megatron_swift.platform import destroy_parallel, init_distributed

    plan_file, result_file = sys.argv[1], sys.argv[2]
    with open(plan_file) as f:
        plan = json.load(f)
    init_distributed()
    results = []
    for step in plan:
        try:
            out = run_step(step)
            if "expect_error" in step:
                raise AssertionError(f"step {step} did not raise")
            results.append({"precision": out})
        except (ValueError, FileNotFoundError) as e:
            if "expect_error" not in step:
                traceback.print_exc()
                raise
            results.append({"error": str(e)})
    if dist.get_rank() == 0:
        with open(result_file, "w") as f:
            json.dump(results, f, indent=2)
    destroy_parallel()


if __name__ == "__main__":  # dist-checkpointing's writer may spawn processes that re-import __main__
    main()
