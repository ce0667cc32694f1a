"""The MoE router with router-loss gradients that do not depend on the parallel layout.

megatron-core's ``TopKRouter`` attaches the load-balancing loss (and the z-loss) to the routing
probabilities with a gradient scale. Under ``calculate_per_token_loss`` (our default) every gradient
is later divided by the global number of loss tokens, so megatron multiplies the router losses by
a token count first. In megatron-core 0.16 that count is this rank's *local* token count, while each
tensor/context-parallel rank only holds its share of the micro batch's loss: under TP + sequence
parallelism (the standard MoE layout) the router-loss gradient shrinks by the TP size, under CP by
the CP size, and ``seq_aux_loss`` also by the micro-batch size (Megatron-LM later fixed parts of
this upstream: NVIDIA/Megatron-LM#5047, #5798). And since the scale is "tokens of this micro batch /
loss tokens of the step", the effective coefficient grew with the prompt share of the data.

This router keeps megatron's loss definitions and changes only the scale:

* each rank attaches its *share* of the micro batch's loss (the shares of a TP/CP group sum to the
  loss of the whole micro batch; the z-loss share is normalised by the group's token count), and
* with ``calculate_per_token_loss`` the share is multiplied by ``loss tokens of the step / micro
  batches of the step`` (set by the trainer once per step, see :func:`router_loss_scale`), so after
  megatron divides by the step's loss tokens every micro batch's router loss has weight
  ``1 / (num_micro_batches x DP)``: the same as without per-token loss, the same in every layout,
  and the coefficient means what it means in transformers (relative to a mean token loss).

Padding tokens (THD pad segments, right padding, pipeline fixed shapes) are excluded from the
routing statistics through megatron's ``padding_mask`` (the trainer passes it).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from megatron.core.transformer.moe.moe_utils import (MoEAuxLossAutoScaler, get_tokens_per_expert_and_token_count,
                                                     save_to_aux_losses_tracker, switch_load_balancing_loss_func)
from megatron.core.transformer.moe.router import TopKRouter as _MegatronTopKRouter

_STEP_SCALE: Optional[float] = None


@contextlib.contextmanager
def router_loss_scale(loss_tokens: float, micro_batches: int):
    """While training one step: ``loss_tokens`` = loss tokens of the global batch (all DP ranks),
    ``micro_batches`` = micro batches of the global batch (num_micro_batches x DP)."""
    global _STEP_SCALE
    previous, _STEP_SCALE = _STEP_SCALE, float(loss_tokens) / max(int(micro_batches), 1)
    try:
        yield
    finally:
        _STEP_SCALE = previous


class TopKRouter(_MegatronTopKRouter):
    """megatron-core's router; only the router-loss gradient scale differs (module docstring)."""

    def _per_token_scale(self, group_tokens) -> float | torch.Tensor:
        # Outside a trainer step (no scale set) fall back to the group's token count, which is
        # layout-invariant too.
        return _STEP_SCALE if _STEP_SCALE is not None else group_tokens

    def _attach(self, probs, coeff: float, share: torch.Tensor, name: str, group_tokens):
        num_layers = self.config.num_layers + (self.config.mtp_num_layers or 0)
        save_to_aux_losses_tracker(name, share / coeff, self.layer_number, num_layers, reduce_group=self.tp_cp_group)
        if self.calculate_per_token_loss:
            share = share * self._per_token_scale(group_tokens)
        return MoEAuxLossAutoScaler.apply(probs, share)

    def _apply_expert_bias(self, routing_map: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """The token counts behind the expert-bias update (aux-loss-free balancing), padding left out.
        megatron-core 0.16 masks the ``[tokens, experts]`` routing map with the ``[tokens]``
        padding mask directly, a broadcast error whenever a padding mask is passed (every padded
        or packed batch); the mask belongs on the token dim."""
        if self.enable_expert_bias and torch.is_grad_enabled():
            with torch.no_grad():
                if padding_mask is not None:
                    routing_map = routing_map & ~padding_mask.reshape(-1, 1).bool()
                self.local_tokens_per_expert += routing_map.sum(dim=0)

    def _apply_aux_loss(self, probs, scores_for_aux_loss, routing_map, with_padding_mask: bool = False):
        coeff = self.get_aux_loss_coeff("aux_loss")
        if coeff == 0:
            return probs
        tokens_per_expert, _, group_tokens = get_tokens_per_expert_and_token_count(
            routing_map=routing_map, reduce_group=self.tp_cp_group, topk=self.topk,
            with_padding_mask=with_padding_mask)
        # this rank's probabilities over the whole group's tokens: the shares sum to the loss
        share = switch_load_balancing_loss_func(
            probs=scores_for_aux_loss, tokens_per_expert=tokens_per_expert, total_num_tokens=group_tokens,
            topk=self.topk, num_experts=self.config.num_moe_experts, moe_aux_loss_coeff=coeff,
            fused=self.config.moe_router_fusion)
        return self._attach(probs, coeff, share, "load_balancing_loss", group_tokens)

    def _apply_seq_aux_loss(self, probs, scores_for_aux_loss, routing_map, seq_length: int, bsz: int,
                            with_padding_mask: bool = False):
        coeff = self.get_aux_loss_coeff("seq_aux_loss")
        if coeff == 0:
            return probs
        # one column block per sequence of the micro batch, as megatron defines it
        scores_for_aux_loss = scores_for_aux_loss.reshape(seq_length, -1)
        routing_map = routing_map.reshape(seq_length, -1)
        tokens_per_expert, _, tokens_per_sequence = get_tokens_per_expert_and_token_count(
            routing_map=routing_map, reduce_group=self.tp_cp_group, topk=self.topk * bsz,
            with_padding_mask=with_padding_mask)
        share = switch_load_balancing_loss_func(
            probs=scores_for_aux_loss, tokens_per_expert=tokens_per_expert, total_num_tokens=tokens_per_sequence,
            topk=self.topk, num_experts=self.config.num_moe_experts, moe_aux_loss_coeff=coeff,
            fused=self.config.moe_router_fusion) / bsz
        return self._attach(probs, coeff, share, "seq_load_balancing_loss", tokens_per_sequence * bsz)

    def apply_z_loss(self, logits, padding_mask: Optional[torch.Tensor] = None):
        coeff = self.config.moe_z_loss_coeff
        if coeff is None or not self.training or not torch.is_grad_enabled():
            return logits
        valid = None if padding_mask is None else ~padding_mask
        squares = torch.square(torch.logsumexp(logits, dim=-1))
        local_sum = squares.sum() if valid is None else (squares * valid).sum()
        group_tokens = (torch.tensor(float(logits.shape[0]), device=logits.device) if valid is None
                        else valid.sum().to(torch.float32))
        if self.tp_cp_group.size() > 1:
            torch.distributed.all_reduce(group_tokens, group=self.tp_cp_group)
        share = coeff * local_sum / group_tokens.clamp(min=1.0)
        return self._attach(logits, coeff, share, "z_loss", group_tokens)
