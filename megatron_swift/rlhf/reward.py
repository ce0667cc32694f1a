"""Reward models (``megatron rlhf --rlhf_type rm``): a scalar value head, the Bradley-Terry loss.

* The model is a transformers ``*ForSequenceClassification`` with ``num_labels`` 1: the decoder's
  final (normed) hidden states times ``score.weight`` (``[1, hidden]``, no bias), read at the last
  real token of each sequence. :class:`ValueHead` replaces the GPT model's ``output_layer`` on the
  last pipeline stage; under tensor parallelism it is replicated (hidden -> 1 is too small to split):
  with sequence parallelism it all-gathers the hidden states first, with a backward that keeps only
  this rank's slice of the (identical) gradient, so no gradient is counted twice.
* An HF config is a sequence-classification config when an architecture ends in
  ``ForSequenceClassification`` (:func:`seq_cls_num_labels`); the model builder, the converters
  (``output_layer.weight`` <-> ``score.weight``, replicated) and ``export --to_hf`` follow it.
* :func:`sequence_scores`: the score at the last real token of each sequence (padded rows: the last
  non-padding position; THD: the end of each ``cu_seqlens`` segment).
* :func:`reward_loss`: TRL's ``RewardTrainer``: ``-logsigmoid(r_c - r_r - margin)`` and, with
  ``center_rewards_coefficient``, ``+ coef * mean((r_c + r_r)^2)``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

SEQ_CLS_SUFFIX = "ForSequenceClassification"
HEAD_INIT_SEED = 20240601


def seq_cls_num_labels(hf_config) -> Optional[int]:
    """``num_labels`` when ``hf_config`` describes a ``*ForSequenceClassification`` model, else None."""
    archs = getattr(hf_config, "architectures", None) or []
    if not any(str(a).endswith(SEQ_CLS_SUFFIX) for a in archs):
        return None
    return int(getattr(hf_config, "num_labels", 1) or 1)


def make_seq_cls_config(hf_config, num_labels: int = 1, pad_token_id: Optional[int] = None):
    """Turns a (causal LM) HF config into its ``*ForSequenceClassification`` config in place."""
    archs = list(getattr(hf_config, "architectures", None) or [])
    if not any(a.endswith(SEQ_CLS_SUFFIX) for a in archs):
        base = None
        for a in archs:
            for suffix in ("ForCausalLM", "ForConditionalGeneration", "Model"):
                if a.endswith(suffix):
                    base = a[: -len(suffix)]
                    break
            if base:
                break
        if base is None:
            from megatron_swift.model.families import family_for

            family = family_for(hf_config.model_type)
            base = family.architectures[0].replace("ForCausalLM", "") if family.architectures else None
        if base is None:
            raise ValueError(f"cannot name the sequence-classification architecture of {archs}")
        hf_config.architectures = [base + SEQ_CLS_SUFFIX]
    hf_config.num_labels = num_labels
    if getattr(hf_config, "pad_token_id", None) is None and pad_token_id is not None:
        hf_config.pad_token_id = pad_token_id  # transformers needs it to find the last token of padded rows
    return hf_config


class ValueHead(torch.nn.Module):
    """``output_layer`` of a sequence-classification model: ``[s, b, h] -> [s, b, num_labels]``,
    replicated over tensor-parallel ranks. Called like megatron's output layer (``weight`` and
    ``runtime_gather_output`` are ignored) and returns ``(scores, None)``."""

    def __init__(self, config, num_labels: int = 1):
        super().__init__()
        self.config = config
        self.sequence_parallel = bool(config.sequence_parallel)
        self.weight = torch.nn.Parameter(torch.empty(num_labels, config.hidden_size, dtype=config.params_dtype))
        if not self.weight.is_meta:
            # normal(0, init_method_std) like transformers' _init_weights, from a generator of its own
            # so every rank and every parallel layout starts from the same head; always (cheap), since
            # a run that loads HF weights skips megatron's initialisation and a causal LM has no head
            generator = torch.Generator().manual_seed(HEAD_INIT_SEED)
            values = torch.randn(tuple(self.weight.shape), generator=generator) * config.init_method_std
            with torch.no_grad():
                self.weight.copy_(values.to(self.weight.dtype))

    def forward(self, hidden_states, weight=None, runtime_gather_output=None):
        if self.sequence_parallel:
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            # every TP rank computes the same scores from the full sequence: the backward keeps this
            # rank's slice of the gradient instead of summing identical gradients over the ranks
            hidden_states = gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=False)
        return F.linear(hidden_states, self.weight), None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        return make_sharded_tensors_for_checkpoint(self.state_dict(prefix="", keep_vars=True), prefix, {},
                                                   sharded_offsets)


def install_value_head(model, config, num_labels: int) -> None:
    """Replaces the GPT model's ``output_layer`` (last pipeline stage) by a :class:`ValueHead`."""
    if getattr(model, "output_layer", None) is None or not model.post_process:
        return
    model.output_layer = ValueHead(config, num_labels)


def seq_cls_rule():
    """The conversion rule of the value head: ``output_layer.weight`` <-> ``score.weight``, replicated."""
    from megatron_swift.converters.mapping import Rule, src

    return Rule("output_layer.weight", (src("score.weight"),), tp_dim=None)


def sequence_scores(scores: torch.Tensor, batch: dict, num_sequences: int) -> torch.Tensor:
    """``[b, s, 1]`` per-position scores -> ``[num_sequences]`` scores at each sequence's last real
    token, in collation order (padded rows; THD: the ``cu_seqlens`` segments, padding segment left out)."""
    scores = scores[..., 0]
    params = batch.get("packed_seq_params")
    if params is None:
        padding = batch.get("padding_mask")
        if padding is None:
            last = torch.full((scores.shape[0],), scores.shape[1] - 1, device=scores.device, dtype=torch.long)
        else:
            last = (~padding.to(scores.device)).long().sum(-1) - 1
        rows = torch.arange(scores.shape[0], device=scores.device)
        return scores[rows, last][:num_sequences]
    cu = params.cu_seqlens_q.to(device=scores.device, dtype=torch.long)
    return scores[0, cu[1:num_sequences + 1] - 1]


def reward_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: Optional[torch.Tensor] = None,
                center_rewards_coefficient: Optional[float] = None) -> torch.Tensor:
    """Per-pair Bradley-Terry losses (their mean is TRL's ``RewardTrainer`` loss)."""
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin.to(diff)
    losses = -F.logsigmoid(diff)
    if center_rewards_coefficient:
        losses = losses + center_rewards_coefficient * (chosen + rejected) ** 2
    return losses
