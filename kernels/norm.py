"""RMSNorm for megatron-core's local (non-Transformer-Engine) layer spec.

megatron-core's local spec wraps ``torch.nn.RMSNorm`` and refuses sequence parallelism, because
nothing marks the norm's weight for the tensor-parallel gradient all-reduce that SP needs (each
TP rank sees a different slice of the sequence, so each holds a partial weight gradient).
This norm sets ``weight.sequence_parallel`` so ``finalize_model_grads`` sums those partial
gradients, exactly as TE's norms do.

Numerics follow Hugging Face's Llama/Qwen RMSNorm (normalise in fp32, cast back, then scale),
so converted models reproduce transformers' logits; ``reference_rms_norm`` is the plain formula
the tests compare against. The forward runs exactly that formula; the backward is written out
(``_RMSNormFunction``) because autograd's chain through pow / mean / rsqrt / two products costs
about twice the elementwise passes over the activation (measured on CPU: 0.58 vs 0.74 ms fwd+bwd of
a [600, 256] fp32 norm; TE's fused norms replace this module on GPU). Gradients equal autograd's
up to float rounding (~1e-7 relative; tests compare both).
"""

from __future__ import annotations

import torch
from torch import nn


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(dtype)


class _RMSNormFunction(torch.autograd.Function):
    """``reference_rms_norm`` with its backward in closed form. With ``n = x * r``,
    ``r = (mean(x^2) + eps)^-1/2`` and ``y = w * n``: ``dw = sum(g * n)`` and
    ``dx = r * (g*w - n * mean(g*w * n))``, computed in fp32 like the forward."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        normed = x32 * rstd
        ctx.save_for_backward(normed, rstd, weight)
        ctx.dtype = x.dtype
        return weight * normed.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        normed, rstd, weight = ctx.saved_tensors
        grad_x = grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * normed.to(ctx.dtype)).reshape(-1, weight.numel()).sum(0)
        if ctx.needs_input_grad[0]:
            grad_normed = (grad * weight).float()
            projection = (grad_normed * normed).mean(-1, keepdim=True)
            grad_x = torch.addcmul(grad_normed, normed, projection, value=-1).mul_(rstd).to(ctx.dtype)
        return grad_x, grad_weight, None


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
        return _RMSNormFunction.apply(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
