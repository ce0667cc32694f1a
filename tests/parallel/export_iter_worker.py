"""Every rank iterates ``iter_hf_weights(..., everywhere=True)`` of a model loaded from an HF
directory at one parallel layout and records, per rank, how its tensors compare with the files.

    python -m torch.distributed.run --nproc_per_node 2 export_iter_worker.py HF_DIR LAYOUT_JSON OUT_DIR

OUT_DIR/rank<r>.json: {"keys": [...], "mismatched": [...], "first_rank_only": [...]} where
``first_rank_only`` are the keys the default (stage-writer) iteration gave this rank.
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

    hf_dir, layout, out_dir = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    init_distributed()
    init_parallel(layout_of(layout), seed=3)
    hf_config = load_hf_config(hf_dir)
    chunks, config, settings = build_chunks(hf_config, {"perform_initialization": False})
    load_hf_into_mcore(chunks, hf_dir, config, settings)
    want = {}
    for f in sorted(glob.glob(os.path.join(hf_dir, "*.safetensors"))):
        want.update(load_file(f))
    got = dict(iter_hf_weights(chunks, config, settings, everywhere=True, group_bytes=50_000))
    mismatched = [k for k in got if k not in want or not torch.equal(got[k], want[k])]
    writer_keys = [k for k, _ in iter_hf_weights(chunks, config, settings)]
    with open(os.path.join(out_dir, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump({"keys": sorted(got), "mismatched": mismatched, "first_rank_only": writer_keys}, f)
    destroy_parallel()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
