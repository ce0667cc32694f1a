"""``--test_convert_precision``: transformers' logits vs ours on the same tokens.

The mcore model (float32, any layout) is built and loaded from the mcore checkpoint, runs one
forward pass through megatron's own pipeline schedule (``forward_only``, logits collected as
non-loss data on the last stage, gathered over TP, padded vocab rows dropped) and is freed; then
rank 0 runs ``AutoModelForCausalLM`` (float32, eager attention) from the HF directory. The two
never share memory.
"""

from __future__ import annotations

import gc
import json
import logging
import os
from typing import Optional

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

RESULT_FILE = "convert_precision.json"


def fixed_tokens(vocab_size: int, batch: int = 1, seq_len: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq_len), generator=g)


def mcore_logits(chunks: list, config, settings, tokens: torch.Tensor) -> Optional[torch.Tensor]:
    """Full-vocab logits ``[batch, seq, vocab]`` on global rank 0 (None elsewhere); collective."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_swift.platform import get_platform

    from . import comm

    batch, seq = tokens.shape
    device = get_platform().device
    micro = {"input_ids": tokens.to(device),
             "position_ids": torch.arange(seq, device=device).unsqueeze(0).expand(batch, -1).contiguous()}

    def forward_step(data_iterator, model):
        data = next(data_iterator)
        output = model(data["input_ids"], data["position_ids"], attention_mask=None)

        def collect(output_tensor, non_loss_data=False):
            return output_tensor.detach()

        return output, collect

    for chunk in chunks:
        chunk.eval()
    # the interleaved (virtual pipeline) schedule wants at least PP microbatches: repeat the batch
    n = ps.get_pipeline_model_parallel_world_size() if len(chunks) > 1 else 1
    iterators = [iter([micro] * n) for _ in chunks] if len(chunks) > 1 else iter([micro])
    with torch.no_grad():
        collected = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iterators, model=chunks, num_microbatches=n,
            seq_length=seq, micro_batch_size=batch, forward_only=True, collect_non_loss_data=True,
        )
    last = ps.is_pipeline_last_stage(ignore_virtual=True)
    tp_rank, tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    full = None
    if last:
        local = collected[0].float().contiguous().cpu()
        if tp_size > 1:
            local = comm.all_gather_cat(local, ps.get_tensor_model_parallel_group(), dim=-1)
        full = local[..., : settings.vocab_size].contiguous()
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return full
    # the first last-stage rank of rank 0's replica sends them to rank 0
    is_src = last and tp_rank == 0 and ps.get_data_parallel_rank(with_context_parallel=True) == 0
    src = comm.min_int(dist.get_rank() if is_src else dist.get_world_size())
    out = comm.broadcast(full if dist.get_rank() == src else None, src, (batch, seq, settings.vocab_size),
                         torch.float32)
    return out if dist.get_rank() == 0 else None


def hf_logits(hf_dir: str, tokens: torch.Tensor, attn_implementation: str = "eager") -> torch.Tensor:
    import transformers
    from packaging.version import Version
    from transformers import AutoModelForCausalLM

    # transformers >= 4.56 calls it ``dtype`` (``torch_dtype`` before)
    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    model = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation=attn_implementation,
                                                 **{key: torch.float32})
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=tokens).logits.float()
    del model
    gc.collect()
    return logits


def compare(hf: torch.Tensor, mc: torch.Tensor) -> dict:
    diff = (hf - mc).abs()
    with_loss = diff[:, :-1]
    return {
        "mean_diff": float(diff.mean()),
        "max_diff": float(diff.max()),
        "mean_diff_with_loss": float(with_loss.mean()),
        "max_diff_with_loss": float(with_loss.max()),
        "token_diff": int((hf.argmax(-1) != mc.argmax(-1)).sum()),
    }


def check_precision(mcore_dir: str, hf_dir: str, hf_config, overrides: Optional[dict] = None,
                    result_dir: Optional[str] = None, seq_len: int = 64, batch: int = 1,
                    hf_attn_implementation: str = "eager") -> dict:
    """Compares an mcore checkpoint with an HF model directory (collective); prints and returns
    the numbers, and writes ``result_dir/convert_precision.json`` (rank 0). ``hf_attn_implementation``:
    transformers' attention for the HF side (eager, the plain formula, unless ``--attn_impl`` says)."""
    from .mcore_io import build_chunks, load_checkpoint

    overrides = dict(overrides or {})
    overrides.update(params_dtype=torch.float32, bf16=False, fp16=False, pipeline_dtype=torch.float32,
                     perform_initialization=False)
    chunks, config, settings = build_chunks(hf_config, overrides)
    load_checkpoint(chunks, mcore_dir)
    tokens = fixed_tokens(settings.vocab_size, batch, seq_len)
    mc = mcore_logits(chunks, config, settings, tokens)
    del chunks
    gc.collect()
    rank = dist.get_rank() if dist.is_initialized() else 0
    result = None
    if rank == 0:
        hf = hf_logits(hf_dir, tokens, hf_attn_implementation)
        result = compare(hf, mc)
        result["dtype"] = "float32"
        result["tokens"] = list(tokens.shape)
        print(f"[convert precision] mean_diff: {result['mean_diff']:.3e}, max_diff: {result['max_diff']:.3e}",
              flush=True)
        print(f"[convert precision] mean_diff (with loss): {result['mean_diff_with_loss']:.3e}, "
              f"max_diff (with loss): {result['max_diff_with_loss']:.3e}", flush=True)
        print(f"[convert precision] token_diff: {result['token_diff']} of {tokens.numel()} positions", flush=True)
        if result_dir is not None:
            with open(os.path.join(result_dir, RESULT_FILE), "w") as f:
                json.dump(result, f, indent=2)
                f.write("\n")
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [result]
        dist.broadcast_object_list(box, src=0)
        result = box[0]
    return result
