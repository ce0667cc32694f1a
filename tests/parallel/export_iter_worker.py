"""Every rank iterates ``iter_hf_weights(..., everywhere=True)`` of a model loaded from an HF
directory, at each of several parallel layouts (megatron's groups re-initialised between them), and
records per rank how its tensors compare with the files.

    python -m torch.distributed.run --nproc_per_node 2 export_iter_worker.py PLAN_JSON OUT_DIR

PLAN_JSON: [{"hf": DIR, "layout": {"tp": 2}}, ...]. OUT_DIR/step<i>_rank<r>.json:
{"keys": [...], "mismatched": [...], "first_rank_only": [...]} where ``first_rank_only`` are the keys
the default (stage-writer) iteration gave this rank.
"""

from __future__ import annotations

import glob
import json
import os
import sys


def main():
    import torch
    import torch.distributed as dist
    from safetensors.torch import load_file

    from convert_worker import layout_of
    from megatron_swift.converters.api import iter_hf_weights, load_hf_into_mcore
    from megatron_swift.converters.mcore_io import build_chunks
    from megatron_swift.model import load_hf_config
    from megatron_swift.platform import destroy_parallel, init_distributed, init_parallel

    with open(sys.argv[1]) as f:
        plan = json.load(f)
    out_dir = sys.argv[2]
    init_distributed()
    for i, step in enumerate(plan):
        init_parallel(layout_of(step["layout"]), seed=3)
        hf_config = load_hf_config(step["hf"])
        chunks, config, settings = build_chunks(hf_config, {"perform_initialization": False})
        load_hf_into_mcore(chunks, step["hf"], config, settings)
        want = {}
        for path in sorted(glob.glob(os.path.join(step["hf"], "*.safetensors"))):
            want.update(load_file(path))
        got = dict(iter_hf_weights(chunks, config, settings, everywhere=True, group_bytes=50_000))
        mismatched = [k for k in got if k not in want or not torch.equal(got[k], want[k])]
        writer_keys = [k for k, _ in iter_hf_weights(chunks, config, settings)]
        with open(os.path.join(out_dir, f"step{i}_rank{dist.get_rank()}.json"), "w") as f:
            json.dump({"keys": sorted(got), "mismatched": mismatched, "first_rank_only": writer_keys}, f)
    destroy_parallel()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
