"""The reference policy of DPO: one interface, ``Reference.fill_logps(microbatches, ...)``, which
stores each micro batch's per-sequence reference log-probs under ``ref_logps`` (on the last pipeline
stage, where the loss runs) before the policy step.

:class:`FrozenModelReference` is a separate frozen model in the policy's layout (same TP/PP/VPP/EP
chunks); under LoRA, :class:`DisabledAdapterReference` is the policy's own chunks with the adapters
off (the base model, no second copy of the weights). Both run megatron-core's own forward-only
pipeline schedule with the step's micro batches, so they work with PP and VPP at fixed sequence
lengths.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Protocol

import torch

from .logprobs import sequence_sums, token_logps

logger = logging.getLogger("megatron_swift")


class Reference(Protocol):
    def fill_logps(self, microbatches: list, seq_length: int, micro_batch_size: int) -> None: ...


def _model_inputs(model, batch: dict) -> dict:
    from megatron_swift.trainer.step import _moe_padding_mask

    return dict(attention_mask=None, labels=None, packed_seq_params=batch.get("packed_seq_params"),
                **_moe_padding_mask(model, batch.get("padding_mask")))


def _store_reference_logps(batch: dict, vocab_size: int, logits: torch.Tensor):
    with torch.no_grad():
        n = batch["num_sequences"]
        batch["ref_logps"] = sequence_sums(token_logps(logits, batch["labels"], vocab_size), batch, n).detach()
    zero = torch.zeros((), device=logits.device)
    return zero, torch.tensor(1, dtype=torch.int), {}


def reference_forward_step(vocab_size: int, data_iterator, model):
    batch = next(data_iterator)
    logits = model(batch["input_ids"], batch["position_ids"], **_model_inputs(model, batch))
    return logits, partial(_store_reference_logps, batch, vocab_size)


class FrozenModelReference:
    """A frozen copy of the policy's starting weights (or ``--ref_model`` / ``--ref_load``) in the
    policy's layout; ``eval()`` mode, no gradients, no optimizer state."""

    def __init__(self, chunks: list, vocab_size: int):
        self.chunks = chunks
        self.vocab_size = vocab_size
        for chunk in chunks:
            chunk.eval()
            for p in chunk.parameters():
                p.requires_grad_(False)

    def bytes_per_rank(self) -> int:
        return sum(p.numel() * p.element_size() for c in self.chunks for p in c.parameters())

    def fill_logps(self, microbatches: list, seq_length: int, micro_batch_size: int) -> None:
        _forward_only_logps(self.chunks, self.vocab_size, microbatches, seq_length, micro_batch_size)


class DisabledAdapterReference:
    """LoRA: the reference is the base model, i.e. the policy with its adapters off (what ms-swift and
    TRL use with PEFT), run in eval mode (no dropout) on the policy's own chunks."""

    def __init__(self, chunks: list, vocab_size: int):
        self.chunks = chunks
        self.vocab_size = vocab_size

    def fill_logps(self, microbatches: list, seq_length: int, micro_batch_size: int) -> None:
        from megatron_swift.tuners.lora import adapters_disabled

        modes = [chunk.training for chunk in self.chunks]
        for chunk in self.chunks:
            chunk.eval()
        try:
            with adapters_disabled(self.chunks):
                _forward_only_logps(self.chunks, self.vocab_size, microbatches, seq_length, micro_batch_size)
        finally:
            for chunk, mode in zip(self.chunks, modes):
                chunk.train(mode)


def _forward_only_logps(chunks: list, vocab_size: int, microbatches: list, seq_length: int,
                        micro_batch_size: int) -> None:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    iterators = [iter(microbatches) for _ in chunks] if len(chunks) > 1 else iter(microbatches)
    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=partial(reference_forward_step, vocab_size), data_iterator=iterators,
            model=chunks, num_microbatches=len(microbatches), seq_length=seq_length,
            micro_batch_size=micro_batch_size, forward_only=True)


def build_reference(policy_chunks: list, hf_config, overrides: dict, where: str, *, ref_model_dir=None,
                    ref_load=None, policy_is_start: bool = True, model_dir=None) -> FrozenModelReference:
    """The reference model in the policy's layout. Weights, first that applies: ``--ref_model``'s
    safetensors, ``--ref_load``'s mcore checkpoint, the policy's current weights when they are its
    starting weights (a fresh run, or DPO starting from an SFT checkpoint), else ``--model``'s
    safetensors (a resumed DPO run)."""
    import glob
    import os

    from megatron_swift.model import build_model, unwrap

    chunks, config, gpt_settings = build_model(hf_config, dict(overrides), where=where)
    if config.bf16 or config.fp16:
        from megatron.core.transformer.module import Float16Module

        chunks = [Float16Module(config, chunk) for chunk in chunks]
    if ref_model_dir:
        from megatron_swift.converters.api import load_hf_into_mcore

        load_hf_into_mcore(chunks, ref_model_dir, config, gpt_settings)
        source = f"--ref_model {ref_model_dir}"
    elif ref_load:
        from megatron_swift.trainer.checkpoint import load_checkpoint

        loaded = load_checkpoint(ref_load, chunks, None, None, finetune=True, load_optim=False, load_rng=False)
        source = f"--ref_load {loaded.directory}"
    elif policy_is_start:
        with torch.no_grad():
            for ref, pol in zip(chunks, policy_chunks):
                unwrap(ref).load_state_dict(unwrap(pol).state_dict(), strict=True)
        source = "the policy's starting weights"
    elif model_dir and glob.glob(os.path.join(model_dir, "*.safetensors")):
        from megatron_swift.converters.api import load_hf_into_mcore

        load_hf_into_mcore(chunks, model_dir, config, gpt_settings)
        source = f"--model {model_dir} (this run resumes: the policy is no longer its starting weights)"
    else:
        raise ValueError("a resumed DPO run needs the reference weights: give --ref_model (HF) or --ref_load "
                         "(mcore checkpoint) of the starting model")
    reference = FrozenModelReference(chunks, gpt_settings.vocab_size)
    logger.info("reference model from %s: %.1f MiB of weights on this rank", source,
                reference.bytes_per_rank() / 2**20)
    return reference
