"""RMSNorm for megatron-core's local (non-Transformer-Engine) layer spec.

megatron-core's local spec wraps ``torch.nn.RMSNorm`` and refuses sequence parallelism, because
nothing marks the norm's weight for the tensor-parallel gradient all-reduce that SP needs (each
TP rank sees a different slice of the sequence, so each holds a partial weight gradient).
This norm sets ``weight.sequence_parallel`` so ``finalize_model_grads`` sums those partial
gradients, exactly as TE's norms do.

Numerics follow Hugging Face's Llama/Qwen RMSNorm (normalise in fp32, cast back, then scale),
so converted models reproduce transformers' logits; ``reference_rms_norm`` is the plain formula
the tests compare against.
"""

from __future__ import annotations

import torch
from torch import nn


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(dtype)


class RMSNorm(nn.Module):
    """Drop-in for megatron's norm builder: ``RMSNorm(config, hidden_size, eps)``."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **unused):
        super().__init__()
        if getattr(config, "normalization", "RMSNorm") != "RMSNorm":
            raise ValueError(f"megatron_swift.kernels.norm.RMSNorm got normalization={config.normalization!r}")
        if getattr(config, "layernorm_zero_centered_gamma", False):
            raise ValueError("layernorm_zero_centered_gamma is not supported by the local RMSNorm")
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reference_rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
