"""``--save_safetensors``: each saved iteration also as a Hugging Face directory (``<iter>/hf/``).

Written from the live model by the converters' streaming exporter (the same code path as
``megatron export --to_hf``), into the checkpoint's temporary directory before it is published, so
the mcore checkpoint and its HF copy appear together, atomically.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

HF_SUBDIR = "hf"


@dataclass
class HFCopy:
    config: object  # TransformerConfig
    gpt_settings: object
    hf_config: object
    source_dir: Optional[str]  # tokenizer, generation config and chat template come from here
    torch_dtype: Optional[object] = None

    def write(self, chunks: list, checkpoint_dir: str) -> str:
        """Collective: every rank calls it with its chunks."""
        from megatron_swift.converters.api import save_mcore_as_hf

        out = os.path.join(checkpoint_dir, HF_SUBDIR)
        return save_mcore_as_hf(chunks, self.config, self.gpt_settings, self.hf_config, out,
                                source_dir=self.source_dir, torch_dtype=self.torch_dtype, exist_ok=True)
