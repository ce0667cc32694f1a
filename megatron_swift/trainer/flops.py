"""Model FLOPs of a training step, for ``--log_throughput`` (TFLOP/s per device) and the GPU benchmark.

Counted from the real sequences of the step (padding excluded): per token, 2 x the weights it
multiplies in the forward pass (QKV and output projections with the real head_dim, which need not
be hidden / heads; the SwiGLU MLP, or for MoE layers the router, top-k experts and shared experts;
the output layer), and per sequence of length L the attention scores and weighted sum, 2 x 2 x L^2
x heads x head_dim per layer, halved for causal attention. Training is 3 x the forward (backward =
2 x forward). Recomputation is not counted (model FLOPs, not hardware FLOPs).
"""

from __future__ import annotations

from typing import Iterable, Sequence


def _moe_layers(config) -> int:
    if not config.num_moe_experts:
        return 0
    freq = config.moe_layer_freq
    if isinstance(freq, int):
        return len(range(0, config.num_layers, freq))
    return sum(freq)


def forward_flops(config, vocab_size: int, lengths: Sequence[int]) -> float:
    """Forward FLOPs of sequences of the given lengths (causal attention)."""
    h, layers = config.hidden_size, config.num_layers
    q_dim = config.num_attention_heads * config.kv_channels
    kv_dim = (config.num_query_groups or config.num_attention_heads) * config.kv_channels
    attention_weights = h * (q_dim + 2 * kv_dim) + q_dim * h
    moe_layers = _moe_layers(config)
    dense_mlp = 3 * h * config.ffn_hidden_size
    moe_mlp = 0
    if moe_layers:
        moe_mlp = h * config.num_moe_experts + config.moe_router_topk * 3 * h * (config.moe_ffn_hidden_size or
                                                                                config.ffn_hidden_size)
        moe_mlp += 3 * h * (config.moe_shared_expert_intermediate_size or 0)
    per_token = (layers * attention_weights + (layers - moe_layers) * dense_mlp + moe_layers * moe_mlp
                 + h * vocab_size)
    tokens = sum(lengths)
    attention = sum(2 * 2 * L * L * q_dim * layers * 0.5 for L in lengths)
    return 2.0 * per_token * tokens + attention


def training_flops(config, vocab_size: int, lengths: Iterable[int]) -> float:
    return 3.0 * forward_flops(config, vocab_size, list(lengths))


def sequence_lengths(microbatch: dict) -> list[int]:
    """Real (non-padding) sequence lengths of a micro batch in the trainer's format."""
    params = microbatch.get("packed_seq_params")
    pad = microbatch.get("padding_mask")
    if params is not None:
        cu = params.cu_seqlens_q.tolist()
        lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
        if pad is not None and bool(pad[0, -1]):  # the padding segment
            lengths = lengths[:-1]
        return lengths
    if pad is not None:
        return (~pad).sum(dim=1).tolist()
    return [microbatch["input_ids"].shape[1]] * microbatch["input_ids"].shape[0]


class StepFlops:
    """Global (all data-parallel replicas) training FLOPs of one step's micro batches."""

    def __init__(self, config, vocab_size: int):
        self.config, self.vocab_size = config, vocab_size

    def of(self, microbatches: list) -> float:
        import torch
        from megatron.core import parallel_state as ps

        from megatron_swift.platform import get_platform

        local = sum(training_flops(self.config, self.vocab_size, sequence_lengths(mb)) for mb in microbatches)
        total = torch.tensor([local], dtype=torch.float64, device=get_platform().device)
        torch.distributed.all_reduce(total, group=ps.get_data_parallel_group(with_context_parallel=True))
        return float(total.item())
