"""What this machine can run, found without importing torch (stdlib only).

The validator refuses GPU-only features here, before any worker starts, with the reason; the
platform (``megatron_swift.platform``) makes the same decisions again inside the workers, where it
can ask torch. Tests build a ``Capabilities`` by hand to play a GPU host on a CPU machine.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import re
from dataclasses import dataclass
from typing import Mapping, Optional


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _has_gpu(env: Mapping[str, str]) -> bool:
    if env.get("MEGATRON_SWIFT_DEVICE", "").lower() == "cpu":
        return False
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return any(v.strip() and v.strip() != "-1" for v in visible.split(","))
    return any(re.fullmatch(r"/dev/nvidia\d+", p) for p in glob.glob("/dev/nvidia*"))


@dataclass(frozen=True)
class Capabilities:
    gpu: bool
    transformer_engine: bool  # importable (and a GPU to run it on)
    apex_gradient_accumulation: bool  # NVIDIA apex's fused_weight_gradient_mlp_cuda extension
    deep_ep: bool
    wandb: bool
    swanlab: bool

    @classmethod
    def detect(cls, env: Optional[Mapping[str, str]] = None) -> "Capabilities":
        env = os.environ if env is None else env
        gpu = _has_gpu(env)
        return cls(gpu=gpu, transformer_engine=gpu and _importable("transformer_engine"),
                   apex_gradient_accumulation=gpu and _importable("fused_weight_gradient_mlp_cuda"),
                   deep_ep=gpu and _importable("deep_ep"), wandb=_importable("wandb"),
                   swanlab=_importable("swanlab"))

    @property
    def fused_kernels(self) -> bool:
        """megatron's fused rope / softmax / bias kernels come with Transformer Engine (or apex)."""
        return self.transformer_engine

    def describe(self) -> str:
        if not self.gpu:
            return "this machine has no GPU"
        return "Transformer Engine is not installed" if not self.transformer_engine else "this machine"
