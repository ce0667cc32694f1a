"""GRPO in the trainer: the rollout that makes each step's micro batches, and the objective that turns
them into a loss. The loop (trainer/loop.py) is the one ``sft`` and DPO use: ``batches_for_step`` is
:meth:`GRPORollout.batches_for_step`, the forward step is :class:`GRPOObjective`'s.

One step (``steps_per_generation = num_iterations = 1``: the generation batch is the global batch):

1. the engine wakes up (``--sleep_level``), weights -> the rollout engine (:func:`sync_weights`; skipped
   before the first step, when the engine already holds the starting weights); after generating it
   sleeps again (its KV cache, and at level 2 its weights, freed while the policy trains)
2. this data-parallel rank's ``generation_batch_size / num_generations / DP`` prompts (encoded by the
   template, generation prompt included) -> ``engine.generate(n=num_generations)``. The prompts are
   split over the ranks of the model-parallel group (TP x PP), each generating its slice, and the
   completions gathered back, so every rank of the group trains on the same completions.
3. rewards (rlhf/rewards.py) on the group's first rank, broadcast; gathered over data-parallel ranks
   for the advantages (rlhf/grpo.py) of the whole generation batch; each rank keeps its slice.
4. completions packed THD (prompt + completion per sequence, labels on the completion only), micro
   batches of ``micro_batch_size`` completions; each carries the per-token gather index that turns the
   packed row's log-probs into ``[completions, max completion length]``.
5. ``GRPOObjective.prepare``: the reference's per-token log-probs (``beta != 0``) from a forward-only
   pass of the frozen reference. Old log-probs are ``sg(logπ)`` on-policy (no extra forward); with
   ``steps_per_generation`` or ``num_iterations`` > 1 one generation feeds several steps, and the
   policy's log-probs right after generating (a forward-only pass) are the old ones.
6. the loss (``forward_step``): logits / temperature -> per-token log-probs (vocab-parallel CE,
   rlhf/logprobs.py) -> ``per_token_loss`` -> ``reduce_loss``'s ``(numerator, denominator)``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable, List, Optional

import torch

from .grpo import (GRPOLossSettings, advantages, high_entropy_mask, mismatch_sums, per_token_loss, reduce_loss,
                   reward_statistics)
from .logprobs import IGNORE_INDEX, token_entropy, token_logps
from .reference import _model_inputs

logger = logging.getLogger("megatron_swift")


# ------------------------------------------------------------------------------------------ micro batches

@dataclass
class Rollout:
    """One completion and what the loss needs of it."""
    prompt_ids: list
    completion_ids: list
    rollout_logps: Optional[list]  # the engine's, at the sampling temperature (None: not given)
    truncated: bool  # hit max_completion_length (finish_reason "length")
    advantage: float = 0.0


def collate_rollouts(rollouts: List[Rollout], collator, overlong_filter: bool = False) -> dict:
    """A THD micro batch of prompt + completion sequences (labels on the completion tokens), plus
    ``token_index``/``completion_mask`` ``[n, T]`` (where each completion token's log-prob sits in the
    packed row), ``advantages [n]``, ``rollout_logps [n, T]`` (when every completion has them),
    ``num_sequences``. ``overlong_filter``: truncated completions get an all-zero mask."""
    items = [{"input_ids": list(r.prompt_ids) + list(r.completion_ids),
              "labels": [IGNORE_INDEX] * len(r.prompt_ids) + list(r.completion_ids)} for r in rollouts]
    batch = collator(items)
    n = len(rollouts)
    cu = batch["packed_seq_params"].cu_seqlens_q.tolist()
    width = max(1, max(len(r.completion_ids) for r in rollouts))
    index = torch.zeros(n, width, dtype=torch.long)
    mask = torch.zeros(n, width, dtype=torch.float32)
    for i, r in enumerate(rollouts):
        c = len(r.completion_ids)
        # labels are shifted: the position before completion token j predicts it
        start = cu[i] + len(r.prompt_ids) - 1
        index[i, :c] = torch.arange(start, start + c)
        if not (overlong_filter and r.truncated):
            mask[i, :c] = 1.0
    batch.update(token_index=index, completion_mask=mask, num_sequences=n,
                 advantages=torch.tensor([r.advantage for r in rollouts], dtype=torch.float32),
                 completion_lengths=torch.tensor([len(r.completion_ids) for r in rollouts], dtype=torch.float32),
                 truncated=torch.tensor([r.truncated for r in rollouts], dtype=torch.bool))
    if all(r.rollout_logps is not None for r in rollouts):
        logps = torch.zeros(n, width, dtype=torch.float32)
        for i, r in enumerate(rollouts):
            logps[i, :len(r.rollout_logps)] = torch.tensor(r.rollout_logps, dtype=torch.float32)
        batch["rollout_logps"] = logps
    return batch


def completion_logps(logits: torch.Tensor, batch: dict, temperature: float, vocab_size: int) -> torch.Tensor:
    """``[n, T]`` log-probs of the completion tokens at ``temperature`` (0 off the mask), gradient-correct
    under TP (megatron's vocab-parallel cross entropy)."""
    flat = token_logps(logits / temperature, batch["labels"], vocab_size).reshape(-1)
    return flat[batch["token_index"]] * batch["completion_mask"]


# ------------------------------------------------------------------------------------------ objective

GRPO_STEP_METRICS = ("kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                     "cispo_clip_ratio", "rollout_correction/is_weight_mean", "rollout_correction/clipped_frac",
                     "off_policy_masked_frac", "rollout/kl", "rollout/k3_kl", "rollout/abs_diff",
                     "rollout/log_ppl_abs_diff", "rollout/chi2_token", "entropy/mean", "entropy/kept_fraction")


def completion_entropy(logits: torch.Tensor, batch: dict, temperature: float, vocab_size: int) -> torch.Tensor:
    """``[n, T]`` entropy of the policy at ``temperature`` where each completion token was predicted."""
    flat = token_entropy(logits / temperature, vocab_size).reshape(-1)
    return flat[batch["token_index"]] * batch["completion_mask"]


def grpo_loss_func(batch: dict, settings: GRPOLossSettings, temperature: float, vocab_size: int,
                   log_mismatch: bool, per_token_contract: bool, entropy: tuple, logits: torch.Tensor):
    log_entropy, top_quantile = entropy
    mask = batch["completion_mask"]
    entropy_mask, sums_entropy = None, {}
    if log_entropy or top_quantile < 1.0:  # before the log-probs: megatron's CE works on its input in place
        ent = completion_entropy(logits, batch, temperature, vocab_size)
        sums_entropy["entropy/mean"] = ((ent * mask).sum(), mask.sum())
        if top_quantile < 1.0:
            entropy_mask = high_entropy_mask(ent, mask, top_quantile)
            sums_entropy["entropy/kept_fraction"] = (entropy_mask.sum(), mask.sum())
    logps = completion_logps(logits, batch, temperature, vocab_size)
    rollout = batch.get("rollout_logps")
    loss, mask, sums = per_token_loss(logps, batch["advantages"], mask, settings, old_logps=batch.get("old_logps"),
                                      ref_logps=batch.get("ref_logps"), rollout_logps=rollout,
                                      entropy_mask=entropy_mask)
    sums.update(sums_entropy)
    if log_mismatch and rollout is not None:  # the trainer at the weights that sampled (π_old) vs the engine
        old = batch.get("old_logps")
        sums.update(mismatch_sums(logps.detach() if old is None else old, rollout, batch["completion_mask"]))
    numerator, denominator = reduce_loss(loss, mask, settings, batch.get("tokens_per_share"))
    value = numerator.detach().double()
    # the logged loss is the objective: megatron's mean of numerator / denominator over micro batches and
    # DP ranks, or (calculate_per_token_loss) the global numerator sum over the global denominator sum
    lm = torch.stack([value, value.new_tensor(float(denominator))]) if per_token_contract else \
        torch.stack([value / max(denominator, 1), value.new_tensor(1.0)])
    report = {"lm loss": lm}
    for name, (s, c) in sums.items():
        report[name] = torch.stack([torch.as_tensor(s).detach().double().to(value.device),
                                    torch.as_tensor(c).detach().double().to(value.device)])
    return numerator, torch.tensor(denominator, dtype=torch.int, device=numerator.device), report


def grpo_forward_step(settings: GRPOLossSettings, temperature: float, vocab_size: int, log_mismatch: bool,
                      entropy: tuple, data_iterator, model):
    batch = next(data_iterator)
    logits = model(batch["input_ids"], batch["position_ids"], **_model_inputs(model, batch))
    from megatron_swift.model import unwrap

    per_token = bool(unwrap(model).config.calculate_per_token_loss)
    return logits, partial(grpo_loss_func, batch, settings, temperature, vocab_size, log_mismatch, per_token,
                           entropy)


def _store_token_logps(batch: dict, key: str, temperature: float, vocab_size: int, logits: torch.Tensor):
    with torch.no_grad():
        batch[key] = completion_logps(logits, batch, temperature, vocab_size).detach()
    return torch.zeros((), device=logits.device), torch.tensor(1, dtype=torch.int), {}


def _token_logps_forward_step(key: str, temperature: float, vocab_size: int, data_iterator, model):
    batch = next(data_iterator)
    logits = model(batch["input_ids"], batch["position_ids"], **_model_inputs(model, batch))
    return logits, partial(_store_token_logps, batch, key, temperature, vocab_size)


def fill_token_logps(chunks: list, microbatches: list, seq_length: int, micro_batch_size: int, key: str,
                     temperature: float, vocab_size: int) -> None:
    """A forward-only pass of ``chunks`` (the frozen reference; or the policy for old log-probs) over the
    step's micro batches, storing ``[n, T]`` per-token log-probs under ``key`` (last pipeline stage)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    iterators = [iter(microbatches) for _ in chunks] if len(chunks) > 1 else iter(microbatches)
    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=partial(_token_logps_forward_step, key, temperature, vocab_size),
            data_iterator=iterators, model=chunks, num_microbatches=len(microbatches), seq_length=seq_length,
            micro_batch_size=micro_batch_size, forward_only=True)


class GRPOObjective:
    """``--rlhf_type grpo``'s forward step; ``reference``: the frozen reference (``beta != 0``) or None."""

    def __init__(self, settings: GRPOLossSettings, temperature: float, vocab_size: int, reference=None,
                 log_mismatch: bool = False, log_entropy: bool = False, top_entropy_quantile: float = 1.0):
        if settings.beta != 0.0 and reference is None:
            raise ValueError("GRPO with beta != 0 needs the reference model")
        self.settings = settings
        self.temperature = temperature
        self.vocab_size = vocab_size
        self.reference = reference
        self.forward_step = partial(grpo_forward_step, settings, temperature, vocab_size, log_mismatch,
                                    (log_entropy, top_entropy_quantile))
        self.metric_names = GRPO_STEP_METRICS
        self.rollout_metrics: dict = {}  # the last rollout's (rewards, lengths), logged with the step

    def prepare(self, microbatches: list, seq_length: int, micro_batch_size: int) -> None:
        if self.reference is not None:
            start = time.time()
            fill_token_logps(self.reference.chunks, microbatches, seq_length, micro_batch_size, "ref_logps",
                             self.temperature, self.vocab_size)
            self.rollout_metrics["timing/reference_seconds"] = time.time() - start

    def step_metrics(self) -> dict:
        return dict(self.rollout_metrics)


# ------------------------------------------------------------------------------------------ rollout

def sync_weights(engine, ddp_chunks: list, export_weights: Callable) -> float:
    """The policy's weights -> the engine: ``export_weights(chunks)`` yields HF-named full tensors (the
    converters' streaming mcore -> HF export; collective). The one call site of ``update_weights``.
    Ranks without an engine (``--vllm_mode server``: one rank holds the client) take part in the gathers."""
    weights = export_weights(ddp_chunks)
    if engine is None:
        for _ in weights:
            pass
        return 0.0
    return engine.update_weights(weights)


def _groups():
    from megatron.core import parallel_state as ps

    return ps.get_model_parallel_group(), ps.get_data_parallel_group(), ps.get_data_parallel_rank(), \
        ps.get_data_parallel_world_size()


def _mp_first_rank(group) -> int:
    return torch.distributed.get_process_group_ranks(group)[0]


@dataclass
class PromptSource:
    """The encoded prompt dataset (``input_ids``, ``messages``, ``extra`` columns) read in the trainer's
    data order: step ``s`` takes prompts ``[s x P, (s + 1) x P)`` of the shuffled order, this DP rank its
    contiguous share."""
    dataset: object
    prompts_per_step: int
    shuffle: bool = True
    seed: int = 42

    def rows(self, step: int, dp_rank: int, dp_size: int, resample_round: int = 0) -> list:
        """``resample_round`` > 0 (dynamic sampling): other prompts for the same step, from another
        shuffled order."""
        from megatron_swift.data.iterators import MicroBatchSampler

        per_rank = self.prompts_per_step // dp_size
        seed = self.seed + 7919 * resample_round
        sampler = MicroBatchSampler(len(self.dataset), per_rank, dp_rank, dp_size,
                                    shuffle=self.shuffle or resample_round > 0, seed=seed,
                                    consumed_samples=step * self.prompts_per_step)
        indices = next(iter(sampler))
        cols = self.dataset[list(indices)]
        return [{k: cols[k][j] for k in cols} for j in range(len(indices))]


def reward_kwargs(rows: list, rollouts: List[Rollout], num_generations: int, step: int) -> dict:
    """The keyword arguments of the reward functions (ms-swift's): the rows' other columns and
    ``messages``, repeated per completion, ``response_token_ids`` and ``trainer_state``."""
    import types

    expanded = [row for row in rows for _ in range(num_generations)]
    extras = [json.loads(row.get("extra") or "{}") for row in expanded]
    kwargs = {key: [e.get(key) for e in extras] for key in sorted({k for e in extras for k in e})}
    kwargs["messages"] = [row["messages"] for row in expanded]
    kwargs["response_token_ids"] = [r.completion_ids for r in rollouts]
    kwargs["trainer_state"] = types.SimpleNamespace(global_step=step)
    return kwargs


class GRPORollout:
    """Makes each step's micro batches by generating (``batches_for_step``, the loop's data source)."""

    def __init__(self, settings, engine, prompts: PromptSource, reward_funcs: list, reward_names: list,
                 collator, micro_batch_size: int, tokenizer, objective: GRPOObjective, ddp_chunks: list,
                 export_weights: Optional[Callable] = None, to_device: Callable = lambda b: b,
                 completions_path: Optional[str] = None, eos_token_ids: tuple = (), seq_length: int = 0,
                 reference=None):
        self.s = settings  # rlhf/settings.py GRPOSettings
        self.engine = engine
        self.prompts = prompts
        self.reward_funcs = reward_funcs
        self.reward_names = reward_names
        self.collator = collator
        self.micro_batch_size = micro_batch_size
        self.tokenizer = tokenizer
        self.objective = objective
        self.ddp_chunks = ddp_chunks
        self.export_weights = export_weights
        self.to_device = to_device
        self.completions_path = completions_path
        self.eos_token_ids = tuple(eos_token_ids)
        self.synced_step: Optional[int] = None
        self.resampled_fraction = 0.0
        self.seq_length = seq_length  # the schedule's (pipeline parallelism: the fixed THD length)
        self._buffer = None  # (generation index, its micro batches)
        self.reference = reference  # --kl_in_reward: the reference's log-probs enter the rewards

    def sampling(self):
        from megatron_swift.rollout.engine import SamplingSettings

        return SamplingSettings(max_tokens=self.s.max_completion_length, temperature=self.s.temperature,
                                top_p=self.s.top_p, top_k=self.s.top_k, repetition_penalty=self.s.repetition_penalty,
                                # no per-request seed: one seed for every request of a batch would give
                                # different prompts the same draws; the engine's own stream (seeded with
                                # --seed + rank when built) samples
                                stop_token_ids=self.eos_token_ids, seed=None)

    def _generate(self, prompt_ids: list, step: int) -> list:
        """Every rank of the model-parallel group generates a contiguous slice of the prompts; the
        completions are gathered back in prompt order (prompt-major, ``num_generations`` each)."""
        mp, _, _, _ = _groups()
        size, rank = torch.distributed.get_world_size(mp), torch.distributed.get_rank(mp)
        per = -(-len(prompt_ids) // size)
        mine = prompt_ids[rank * per:(rank + 1) * per]
        if self.s.vllm.mode == "server":
            out = self._generate_on_server(mine)
        else:
            out = [(c.token_ids, c.logprobs, c.finish_reason)
                   for c in (self.engine.generate(mine, self.sampling(), n=self.s.num_generations) if mine else [])]
        if len(out) != len(mine) * self.s.num_generations:
            raise RuntimeError(f"the rollout engine returned {len(out)} completions for {len(mine)} prompts x "
                               f"{self.s.num_generations}")
        gathered = [None] * size
        torch.distributed.all_gather_object(gathered, out, group=mp)
        return [x for part in gathered for x in part]

    def _generate_on_server(self, mine: list) -> list:
        """``--vllm_mode server``: every rank's prompts go to the client rank, which sends them to
        `megatron rollout` in one request; each rank gets its own completions back (prompt-major)."""
        from .grpo_run import SERVER_CLIENT_RANK

        parts = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, mine)
        result = [None]
        if self.engine is not None:
            flat = [p for part in parts for p in part]
            completions = self.engine.generate(flat, self.sampling(), n=self.s.num_generations) if flat else []
            result = [[(c.token_ids, c.logprobs, c.finish_reason) for c in completions]]
        torch.distributed.broadcast_object_list(result, src=SERVER_CLIENT_RANK)
        start = sum(len(p) for p in parts[:torch.distributed.get_rank()]) * self.s.num_generations
        return result[0][start:start + len(mine) * self.s.num_generations]

    def _rewards(self, rows: list, rollouts: List[Rollout], step: int) -> torch.Tensor:
        """``[n, F]`` on the model-parallel group's first rank, broadcast to the group."""
        from .rewards import call_reward

        mp, _, _, _ = _groups()
        table = [None]
        if torch.distributed.get_rank() == _mp_first_rank(mp):
            texts = self.tokenizer.batch_decode([r.completion_ids for r in rollouts], skip_special_tokens=True)
            kwargs = reward_kwargs(rows, rollouts, self.s.num_generations, step)
            columns = [call_reward(f, texts, kwargs) for f in self.reward_funcs]
            table[0] = (columns, texts)
        torch.distributed.broadcast_object_list(table, src=_mp_first_rank(mp), group=mp)
        columns, texts = table[0]
        self._texts = texts
        return torch.tensor(columns, dtype=torch.float64).T.reshape(len(rollouts), len(self.reward_funcs))

    def _sample(self, rows: list, step: int):
        """Completions of ``rows`` (``num_generations`` each) and their ``[n, F]`` rewards."""
        generated = self._generate([list(r["input_ids"]) for r in rows], step)
        g = self.s.num_generations
        rollouts = [Rollout(prompt_ids=list(rows[i // g]["input_ids"]), completion_ids=list(ids),
                            rollout_logps=list(lp) if lp is not None else None, truncated=reason == "length")
                    for i, (ids, lp, reason) in enumerate(generated)]
        return rollouts, self._rewards(rows, rollouts, step), list(self._texts)

    def _dynamic_sample(self, step: int, rows: list, rollouts: list, rewards: torch.Tensor, texts: list):
        """DAPO's dynamic sampling: groups whose rewards all agree teach nothing; they are replaced by
        groups of newly drawn prompts, up to ``max_resample_times`` rounds, then by the original
        groups. Every data-parallel rank takes part in every round (generation is collective)."""
        from megatron_swift.platform import get_platform

        g = self.s.num_generations
        weights = torch.tensor(self.s.reward_weights, dtype=torch.float64)

        def informative(table):
            total = (table * weights).nansum(dim=1).view(-1, g)
            return ~torch.isclose(total.std(dim=1), torch.zeros(total.shape[0], dtype=total.dtype))

        groups = [(rows[k], rollouts[k * g:(k + 1) * g], rewards[k * g:(k + 1) * g], texts[k * g:(k + 1) * g])
                  for k in range(len(rows))]
        flags = informative(rewards)
        kept = [grp for grp, ok in zip(groups, flags) if ok]
        spare = [grp for grp, ok in zip(groups, flags) if not ok]
        _, dp, dp_rank, dp_size = _groups()
        for round_ in range(1, self.s.max_resample_times + 1):
            short = torch.tensor([float(len(kept) < len(rows))], device=get_platform().device)
            torch.distributed.all_reduce(short, op=torch.distributed.ReduceOp.MAX, group=dp)
            if not short.item():
                break
            more = self.prompts.rows(step, dp_rank, dp_size, resample_round=round_)
            new_rollouts, new_rewards, new_texts = self._sample(more, step)
            for k, ok in enumerate(informative(new_rewards)):
                if ok:
                    kept.append((more[k], new_rollouts[k * g:(k + 1) * g], new_rewards[k * g:(k + 1) * g],
                                 new_texts[k * g:(k + 1) * g]))
        chosen = (kept + spare)[:len(rows)]
        self.resampled_fraction = 1.0 - sum(1 for grp in chosen if any(grp[0] is r for r in rows)) / len(rows)
        rows = [grp[0] for grp in chosen]
        rollouts = [r for grp in chosen for r in grp[1]]
        rewards = torch.cat([grp[2] for grp in chosen])
        texts = [t for grp in chosen for t in grp[3]]
        return rows, rollouts, rewards, texts

    def batches_for_step(self, step: int) -> list:
        """This step's micro batches. A generation makes ``steps_per_generation`` steps' worth of
        completions, trained ``num_iterations`` times; off-policy then (any step but a generation's first
        update), the loss's old log-probs come from a forward-only pass of the policy right after
        generating."""
        spg, iterations = self.s.steps_per_generation, self.s.num_iterations
        generation, within = divmod(step, spg * iterations)
        if self._buffer is None or self._buffer[0] != generation:
            self._buffer = (generation, self._generate_batch(generation, step))
        else:
            self.objective.rollout_metrics = {}  # logged once, with the generation's first step
        micro = self._buffer[1]
        per_step = len(micro) // spg
        part = micro[(within % spg) * per_step:(within % spg + 1) * per_step]
        _, dp, _, dp_size = _groups()
        self._share_tokens(part, dp, dp_size)
        return part

    def _generate_batch(self, generation: int, step: int) -> list:
        from megatron_swift.platform import get_platform

        start = time.time()
        if hasattr(self.engine, "wake_up"):  # --sleep_level: the engine gave its memory back while training
            self.engine.wake_up()
        if self.export_weights is not None and self.synced_step is not None and self.synced_step != step:
            sync_weights(self.engine, self.ddp_chunks, self.export_weights)
        self.synced_step = step
        sync_seconds = time.time() - start
        _, dp, dp_rank, dp_size = _groups()
        rows = self.prompts.rows(generation, dp_rank, dp_size)
        rollouts, local, texts = self._sample(rows, step)
        if self.s.dynamic_sample:
            rows, rollouts, local, texts = self._dynamic_sample(generation, rows, rollouts, local, texts)
        if hasattr(self.engine, "sleep"):
            self.engine.sleep()
        self._texts = texts
        generate_seconds = time.time() - start - sync_seconds
        g = self.s.num_generations
        # the whole generation batch's rewards (equal shares per DP rank), for the advantages
        device = get_platform().device
        everything = [torch.zeros_like(local, device=device) for _ in range(dp_size)]
        torch.distributed.all_gather(everything, local.to(device), group=dp)
        table = torch.cat(everything).cpu()
        weights = torch.tensor(self.s.reward_weights, dtype=torch.float64)
        mine = slice(dp_rank * len(rollouts), (dp_rank + 1) * len(rollouts))
        micro = [self.to_device(collate_rollouts(rollouts[i:i + self.micro_batch_size], self.collator,
                                                 self.s.overlong_filter))
                 for i in range(0, len(rollouts), self.micro_batch_size)]
        off_policy = self.s.steps_per_generation * self.s.num_iterations > 1
        if off_policy or self.s.kl_in_reward:  # π_old: off-policy steps follow, or the KL enters the rewards
            old_start = time.time()
            for chunk in self.ddp_chunks:
                chunk.eval()
            try:
                fill_token_logps(self.ddp_chunks, micro, self.seq_length, 1, "old_logps", self.s.temperature,
                                 self.objective.vocab_size)
            finally:
                for chunk in self.ddp_chunks:
                    chunk.train()
            old_logps_seconds = time.time() - old_start
        else:
            old_logps_seconds = 0.0
        kl_penalty = None
        if self.s.kl_in_reward:
            kl_penalty = self._kl_penalty(micro, dp, dp_size, device)
            if not off_policy:  # on-policy steps take sg(logπ) (the same numbers) without the stored copy
                for mb in micro:
                    mb.pop("old_logps", None)
        adv, total = advantages(table, weights, g, self.s.advantage_estimator, self.s.scale_rewards,
                                kl_penalty=kl_penalty)
        for mb, start in zip(micro, range(0, len(rollouts), self.micro_batch_size)):
            n = mb["num_sequences"]
            mb["advantages"] = adv[mine][start:start + n].to(torch.float32).to(mb["completion_mask"].device)
        for r, a in zip(rollouts, adv[mine].tolist()):
            r.advantage = a
        self._log_step(step, table, total, rollouts, rows, adv[mine], sync_seconds, generate_seconds, dp, device)
        self.objective.rollout_metrics["timing/old_logps_seconds"] = old_logps_seconds
        if kl_penalty is not None:
            self.objective.rollout_metrics["kl_in_reward/kl"] = float(kl_penalty.mean()) / self.s.loss.beta
        return micro

    def _kl_penalty(self, micro: list, dp, dp_size: int, device) -> torch.Tensor:
        """``--kl_in_reward``: ``beta x Σ_t (logπ_old - logπ_ref)`` per completion of the whole generation
        batch. The log-probs live on the last pipeline stage; the sums reach every stage by a sum over
        the pipeline group (zeros elsewhere), then every data-parallel rank's are gathered."""
        from megatron.core import parallel_state as ps

        fill_token_logps(self.reference.chunks, micro, self.seq_length, 1, "ref_logps",
                         self.s.temperature, self.objective.vocab_size)
        parts = []
        for mb in micro:
            if "old_logps" in mb and "ref_logps" in mb:
                parts.append(((mb["old_logps"] - mb["ref_logps"]) * mb["completion_mask"]).sum(-1).double())
            else:
                parts.append(torch.zeros(mb["num_sequences"], dtype=torch.float64, device=device))
        local = torch.cat(parts).to(device)
        torch.distributed.all_reduce(local, group=ps.get_pipeline_model_parallel_group())
        everything = [torch.zeros_like(local) for _ in range(dp_size)]
        torch.distributed.all_gather(everything, local, group=dp)
        return self.s.loss.beta * torch.cat(everything).cpu()

    def _share_tokens(self, micro: list, dp, dp_size: int) -> None:
        """dapo / cispo: the global batch's completion tokens / (micro batches x DP ranks), per micro batch."""
        from megatron_swift.platform import get_platform

        tokens = torch.tensor([sum(float(mb["completion_mask"].sum()) for mb in micro)], dtype=torch.float64,
                              device=get_platform().device)
        torch.distributed.all_reduce(tokens, group=dp)
        share = float(tokens.item()) / (len(micro) * dp_size)
        for mb in micro:
            mb["tokens_per_share"] = share

    def _log_step(self, step, table, total, rollouts, rows, adv, sync_seconds, generate_seconds, dp, device):
        stats = reward_statistics(total, table, self.reward_names, self.s.num_generations)
        lengths = torch.tensor([[len(r.completion_ids), float(r.truncated)] for r in rollouts], dtype=torch.float64,
                               device=device)
        sums = torch.stack([lengths.sum(0), torch.tensor([float(len(rollouts)), 0.0], dtype=torch.float64,
                                                           device=device)])
        torch.distributed.all_reduce(sums, group=dp)
        stats["completions/mean_length"] = float(sums[0, 0] / sums[1, 0])
        stats["completions/clipped_ratio"] = float(sums[0, 1] / sums[1, 0])
        stats["timing/weight_sync_seconds"] = sync_seconds
        stats["timing/generate_seconds"] = generate_seconds
        if self.s.dynamic_sample:
            stats["dynamic_sample/resampled_fraction"] = self.resampled_fraction
        self.objective.rollout_metrics = stats
        if self.s.log_completions and self.completions_path:
            mp, _, _, _ = _groups()
            if torch.distributed.get_rank() == _mp_first_rank(mp):
                path = self.completions_path
                if torch.distributed.get_rank() != 0:
                    path = f"{path[:-len('.jsonl')]}.rank{torch.distributed.get_rank()}.jsonl"
                os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
                g = self.s.num_generations
                start = torch.distributed.get_rank(dp) * len(rollouts)
                with open(path, "a") as f:
                    for i, r in enumerate(rollouts):
                        record = {"step": step + 1, "prompt": rows[i // g]["messages"], "completion": self._texts[i],
                                  "rewards": {n: table[start + i, j].item() for j, n in enumerate(self.reward_names)},
                                  "advantage": float(adv[i]), "truncated": r.truncated}
                        f.write(json.dumps(record, ensure_ascii=False) + "\n")
