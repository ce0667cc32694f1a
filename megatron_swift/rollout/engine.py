"""The contract between the GRPO trainer and a rollout engine (vLLM colocate or a `megatron rollout` server).

The trainer hands token ids (prompts already encoded by its template) and gets token ids back, with
the engine's log-probabilities of the sampled tokens at the sampling temperature ("processed"
log-probs), so the trainer can measure and correct the rollout/trainer mismatch. Weights travel as
Hugging Face-named full tensors, produced by the converters' streaming mcore -> HF export.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional, Protocol

import torch


@dataclass(frozen=True)
class SamplingSettings:
    max_tokens: int  # --max_completion_length
    temperature: float = 0.9
    top_p: float = 1.0
    top_k: int = -1  # -1: off (vLLM's convention)
    repetition_penalty: float = 1.0
    stop_token_ids: tuple = ()
    seed: Optional[int] = None


@dataclass
class Completion:
    prompt_ids: list  # list[int], as given
    token_ids: list  # list[int], the sampled completion (ends with EOS unless truncated)
    logprobs: list  # list[float], engine log-prob of each sampled token at the sampling temperature
    finish_reason: str  # "stop" | "length"
    text: Optional[str] = None
    extra: dict = field(default_factory=dict)


class RolloutEngine(Protocol):
    def generate(self, prompts: list, sampling: SamplingSettings, n: int = 1) -> list:
        """``prompts``: list of token-id lists. Returns ``len(prompts) * n`` ``Completion``s, the ``n``
        of each prompt consecutive (prompt-major)."""

    def update_weights(self, weights: Iterable[tuple]) -> float:
        """Loads HF-named full tensors ``(name, torch.Tensor)`` into the engine (all of the model's
        weights, possibly in several calls' worth of buckets), so the next ``generate`` uses them.
        Returns seconds spent."""

    def close(self) -> None: ...


def flat_logprob_tensor(completions: list) -> torch.Tensor:
    """The engine log-probs of every completion token, concatenated in order (fp32)."""
    return torch.tensor([lp for c in completions for lp in c.logprobs], dtype=torch.float32)
