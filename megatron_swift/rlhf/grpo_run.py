"""``megatron rlhf --rlhf_type grpo``: what the trainer's run builds besides the policy (trainer/run.py):
the reward functions, the rollout engine and its weight export, the objective and the rollout that feeds
the loop (rlhf/grpo_step.py).

The rollout engine (megatron_swift/rollout, vLLM colocated or a server) is reached through
:func:`build_rollout_engine` only; :func:`engine_available` says, before any worker starts, whether
this install has the one ``--vllm_mode`` asks for.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
from typing import Optional

logger = logging.getLogger("megatron_swift")

ENGINE_MODULES = {"colocate": "megatron_swift.rollout.vllm_colocate", "server": "megatron_swift.rollout.server_client"}
SERVER_CLIENT_RANK = 0  # --vllm_mode server: the one rank that talks to `megatron rollout`


def engine_available(mode: str) -> Optional[str]:
    """None when ``--vllm_mode mode`` can run here, else why not."""
    module = ENGINE_MODULES.get(mode)
    if module is None or importlib.util.find_spec(module) is None:
        return (f"argument --vllm_mode {mode}: the {mode} rollout engine is not wired into this build of "
                f"megatron-swift yet (the GRPO math, rewards and trainer step are; see docs/rlhf.md)")
    if mode == "colocate" and importlib.util.find_spec("vllm") is None:
        return "argument --vllm_mode colocate: vLLM is not installed in this environment (pip install vllm)"
    return None


def check_grpo_before_workers(args) -> None:
    """After the --external_plugins files are imported (cli/main.py): the reward functions resolve,
    and the rollout engine exists. Raises ValueError naming the argument."""
    from .rewards import resolve_reward_funcs

    resolve_reward_funcs(list(args.reward_funcs), args)
    problem = engine_available(args.vllm_mode)
    if problem:
        raise ValueError(problem)
    if args.vllm_mode == "server":
        servers = max(len(args.vllm_server_base_url or ()), len(args.vllm_server_host or ()))
        if servers == 0:
            raise ValueError("argument --vllm_mode server: give --vllm_server_host (and --vllm_server_port) or "
                             "--vllm_server_base_url of a running `megatron rollout`")
        if servers > 1 or len(args.vllm_server_port or ()) > 1:
            raise ValueError("argument --vllm_server_host/--vllm_server_base_url: one rollout server is supported "
                             "(several, with requests split over them, are not built)")
        if args.vllm_server_group_port:
            raise ValueError("argument --vllm_server_group_port: weights reach `megatron rollout` over HTTP "
                             "(safetensors buckets); the NCCL weight-sync group is not built")


def build_rollout_engine(vllm, model_dir: str, seed: int, max_model_len: int):
    """The one place the trainer builds a rollout engine (``vllm``: rlhf/settings.py VLLMSettings)."""
    problem = engine_available(vllm.mode)
    if problem:
        raise ValueError(problem)
    if vllm.mode == "colocate":
        from megatron_swift.rollout.vllm_colocate import VLLMColocateEngine

        kwargs = dict(max_model_len=vllm.max_model_len or max_model_len,
                      gpu_memory_utilization=vllm.gpu_memory_utilization,
                      tensor_parallel_size=vllm.tensor_parallel_size, enforce_eager=vllm.enforce_eager,
                      sleep_level=vllm.sleep_level, seed=seed, enable_prefix_caching=vllm.enable_prefix_caching)
        if vllm.max_num_seqs:
            kwargs["max_num_seqs"] = vllm.max_num_seqs
        return VLLMColocateEngine(model_dir, **kwargs)
    if vllm.mode == "server":  # one client, on one rank; the others reach it through the trainer's groups
        import torch

        if torch.distributed.get_rank() != SERVER_CLIENT_RANK:
            return None
        from megatron_swift.rollout.server_client import VLLMServerEngine

        base_url = vllm.server_base_url[0] if vllm.server_base_url else None
        host = vllm.server_host[0] if vllm.server_host else None
        return VLLMServerEngine(host=host, port=vllm.server_port[0], base_url=base_url, timeout=vllm.server_timeout)
    raise ValueError(f"argument --vllm_mode {vllm.mode}: not wired")  # engine_available said otherwise


def weight_exporter(config, gpt_settings):
    """``chunks -> iter of (HF name, full tensor)`` on every rank (colocated engines load the whole
    model): the converters' streaming mcore -> HF export."""
    from megatron_swift.converters import api

    if not hasattr(api, "iter_hf_weights"):
        return None

    def export(chunks):
        return api.iter_hf_weights(chunks, config, gpt_settings, everywhere=True)

    return export


def grpo_collator(args, pad_token_id: int):
    """THD micro batches of ``micro_batch_size`` completions (prompt + completion each); fixed shapes
    under pipeline parallelism: ``micro_batch_size x (max_length + max_completion_length)`` tokens."""
    from megatron_swift.data.batching import Collator

    tp = args.tensor_model_parallel_size
    multiple = tp if args.sequence_parallel and tp > 1 else 1
    fixed = None
    if args.pipeline_model_parallel_size > 1:
        if args.max_length is None:
            raise ValueError("pipeline parallelism needs fixed micro-batch shapes: set --max_length (the prompt's)")
        fixed = args.micro_batch_size * (args.max_length + args.max_completion_length)
        fixed = -(-fixed // multiple) * multiple
    return Collator(pad_token_id=pad_token_id, padding_free=True, pad_to_multiple_of=multiple, fixed_length=fixed)


def build_grpo(args, settings, ddp_chunks: list, config, gpt_settings, hf_config, overrides: dict, where: str,
               data, model_dir: str, save_dir: Optional[str], resumed: bool):
    """``(objective, batches_for_step, seq_length, engine)`` of a GRPO run (``engine.close()`` when done,
    before the process groups go)."""
    from megatron_swift.data.batching import move_batch
    from megatron_swift.platform import get_platform

    from .grpo_step import GRPOObjective, GRPORollout, PromptSource
    from .rewards import resolve_reward_funcs

    grpo = settings.grpo
    reference = None
    if grpo.needs_reference:
        from .settings import reference_for

        reference = reference_for(settings, ddp_chunks, hf_config, overrides, where, model_dir=model_dir,
                                  policy_is_start=not resumed)
    # --kl_in_reward: the KL goes into the rewards (the rollout fills the reference's log-probs), not the loss
    loss = dataclasses.replace(grpo.loss, beta=0.0) if grpo.kl_in_reward else grpo.loss
    objective = GRPOObjective(loss, grpo.temperature, gpt_settings.vocab_size,
                              None if grpo.kl_in_reward else reference, log_mismatch=grpo.rollout_logps_used,
                              log_entropy=grpo.log_entropy, top_entropy_quantile=grpo.top_entropy_quantile)
    prepared, tokenizer = data.prepared, data.tokenizer
    prompts_per_step = grpo.generation_batch_size // grpo.num_generations
    source = PromptSource(prepared.train, prompts_per_step, shuffle=prepared.shuffle, seed=prepared.seed)
    names = list(grpo.reward_funcs)
    funcs = resolve_reward_funcs(names, args)
    max_len = (args.max_length or 0) + grpo.max_completion_length
    engine = build_rollout_engine(grpo.vllm, model_dir, seed=grpo.seed, max_model_len=max_len or 2048)
    # the template's end of turn (<|im_end|>...) and the tokenizer's EOS end a completion
    end_of_turn = tokenizer.convert_tokens_to_ids(prepared.template.meta.eos_token) if prepared.template.meta.eos_token \
        else None
    eos = tuple(sorted(t for t in {tokenizer.eos_token_id, end_of_turn} if isinstance(t, int) and t >= 0))
    collator = grpo_collator(args, prepared.template.pad_token_id)
    device = get_platform().device
    rollout = GRPORollout(grpo, engine, source, funcs, names, collator, args.micro_batch_size, tokenizer, objective,
                          ddp_chunks, export_weights=weight_exporter(config, gpt_settings),
                          to_device=lambda b: move_batch(b, device),
                          completions_path=os.path.join(save_dir, "completions.jsonl") if save_dir else None,
                          eos_token_ids=eos, reference=reference)
    seq_length = collator.fixed_length or (args.max_length or 0) + grpo.max_completion_length
    rollout.seq_length = seq_length
    if resumed:  # the engine holds --model's weights; the policy resumed from a checkpoint
        rollout.synced_step = -1
    return objective, rollout.batches_for_step, seq_length, engine
