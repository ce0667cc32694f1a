"""Weight-gradient GEMM accumulated into megatron's main-grad buffer, with torch's ``addmm_``.

megatron's linears, under ``gradient_accumulation_fusion``, call NVIDIA apex's CUDA extension
``fused_weight_gradient_mlp_cuda``: ``main_grad += grad_output^T @ input`` in one GEMM. Without it
each weight gradient is a new tensor that DDP's hook then adds into the buffer: one allocation and
one more pass over every weight gradient per layer and micro batch (on the CPU benchmark's tiny
Qwen3 ~10% of a step). This module has the extension's two functions with the same arguments, so
megatron's own code path runs where apex cannot be installed; ``reference_wgrad`` is the unfused
formula the tests compare against.
"""

from __future__ import annotations

import torch


def reference_wgrad(input: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """What megatron computes without the fusion (``grad_output.t().matmul(total_input)``)."""
    return grad_output.t().matmul(input)


def wgrad_gemm_accum_fp32(input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """``main_grad`` (fp32, [out, in]) += ``grad_output`` [tokens, out]^T @ ``input`` [tokens, in]."""
    if input.dtype == grad_output.dtype == main_grad.dtype:
        main_grad.addmm_(grad_output.t(), input)
    else:  # a 16-bit GEMM into an fp32 buffer: torch's addmm needs one dtype, so add as the hook would
        main_grad.add_(reference_wgrad(input, grad_output))


# megatron calls this one when the buffer is fp16/bf16; with torch's addmm it is the same function
wgrad_gemm_accum_fp16 = wgrad_gemm_accum_fp32
