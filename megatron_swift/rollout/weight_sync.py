"""Training weights -> rollout engine: the converters' streaming export into ``update_weights``."""

from __future__ import annotations

from typing import Optional

import torch


def sync_weights(engine, chunks: list, config, settings, dtype: Optional[torch.dtype] = None) -> float:
    """Loads the live mcore model into ``engine``; returns the engine's seconds (0 without one).

    Collective: every training rank calls it at the same point (the export gathers over TP / EP and
    broadcasts over PP). ``engine`` is None on ranks that hold none (``--vllm_mode server``: one rank
    holds the client); they still take part in the gathers. LoRA adapter factors are not exported:
    merge them first (not built yet: the trainer refuses --use_vllm with LoRA).
    """
    from megatron_swift.converters.api import iter_hf_weights

    weights = iter_hf_weights(chunks, config, settings, everywhere=True, dtype=dtype)
    if engine is None:
        for _ in weights:
            pass
        return 0.0
    return engine.update_weights(weights)
