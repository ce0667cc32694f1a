"""GRPORollout's plumbing on 2 data-parallel gloo ranks with a scripted engine (no vLLM): prompts split
over the ranks, rewards from an ms-swift-style plugin, advantages over the whole generation batch,
dynamic sampling, the dapo token shares, one optimizer step through the trainer's train_step.

The engine answers prompt ``p`` with ``num_generations`` completions whose lengths depend on the
prompt's first token and the sample index; the plugin rewards even lengths. Prompts whose first token
is even get completions of one length only (their group's rewards all agree: dynamic
sampling must replace them). Writes OUT/rank<r>.json: the rows, completions, rewards, advantages the
micro batches carry, the loss and the logged metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import types

import torch


class ScriptedEngine:
    def __init__(self):
        self.calls = 0

    def generate(self, prompts, sampling, n=1):
        from megatron_swift.rollout.engine import Completion

        self.calls += 1
        out = []
        for p in prompts:
            for j in range(n):
                length = 2 if p[0] % 2 == 0 else 1 + (p[0] + j) % 4
                ids = [(p[0] + 7 * j + k) % 50 + 10 for k in range(length)]
                out.append(Completion(prompt_ids=p, token_ids=ids, logprobs=[-0.5] * length,
                                      finish_reason="length" if length >= sampling.max_tokens else "stop"))
        return out

    def update_weights(self, weights):
        for _ in weights:
            pass
        return 0.0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--root", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dynamic_sample", action="store_true")
    p.add_argument("--steps_per_generation", type=int, default=1)
    p.add_argument("--kl_in_reward", action="store_true")
    a = p.parse_args()
    from datasets import Dataset
    from transformers import AutoTokenizer

    from megatron_swift.data.batching import Collator
    from megatron_swift.model import build_model, load_hf_config
    from megatron_swift.platform import ParallelLayout, destroy_parallel, init_parallel
    from megatron_swift.plugin import ORM, orms
    from megatron_swift.rlhf.grpo import GRPOLossSettings
    from megatron_swift.rlhf.grpo_step import GRPOObjective, GRPORollout, PromptSource
    from megatron_swift.rlhf.rewards import resolve_reward_funcs
    from megatron_swift.rlhf.settings import GRPOSettings, VLLMSettings
    from megatron_swift.trainer.model_setup import OptimizerSettings, build_optimizer, wrap_ddp
    from megatron_swift.trainer.step import step_loss_tokens, train_step

    class EvenLength(ORM):  # registered as an --external_plugins file would
        def __call__(self, completions, response_token_ids=None, solution=None, **kwargs):
            assert solution is not None and len(solution) == len(completions)  # the rows' extra columns
            return [float(len(ids) % 2 == 0) for ids in response_token_ids]

    orms["even_length"] = EvenLength

    init_parallel(ParallelLayout(), seed=3)
    rank = torch.distributed.get_rank()
    hf = load_hf_config(os.path.join(a.root, "hf"))
    chunks, config, settings = build_model(hf, dict(calculate_per_token_loss=False))
    opt = OptimizerSettings(optimizer="adam", lr=1e-3, weight_decay=0.0, clip_grad=1.0, use_distributed_optimizer=False)
    ddp = wrap_ddp(chunks, config, opt)
    optimizer = build_optimizer(ddp, config, opt)
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(a.root, "hf"))
    prompts = [[3 + i] + [20 + i] * (1 + i % 3) for i in range(16)]  # first tokens 3..18: the even ones agree
    ds = Dataset.from_dict({"input_ids": prompts,
                            "messages": [[{"role": "user", "content": f"q{i}"}] for i in range(16)],
                            "extra": [json.dumps({"solution": str(i)}) for i in range(16)]})
    g, gbs, mbs = 4, 16, 2
    spg = a.steps_per_generation
    beta = 0.5 if a.kl_in_reward else 0.0
    reference = None
    if a.kl_in_reward:  # a reference a little away from the policy
        from megatron_swift.rlhf.reference import build_reference

        reference = build_reference(ddp, hf, dict(calculate_per_token_loss=False), "test")
        with torch.no_grad():
            for chunk in reference.chunks:
                for q in chunk.parameters():
                    q.add_(torch.randn(q.shape, generator=torch.Generator().manual_seed(q.numel())) * 0.05)
    grpo = GRPOSettings(loss=GRPOLossSettings(loss_type="dapo", beta=beta), num_generations=g, kl_in_reward=a.kl_in_reward,
                        generation_batch_size=gbs * spg, steps_per_generation=spg, num_iterations=1, temperature=1.0, max_completion_length=4, top_k=-1, top_p=1.0,
                        repetition_penalty=1.0, reward_funcs=("even_length",), reward_weights=(1.0,),
                        advantage_estimator="grpo", scale_rewards="group", dynamic_sample=a.dynamic_sample,
                        max_resample_times=3, overlong_filter=False, log_completions=True,
                        log_rollout_offpolicy_metrics=True, vllm=VLLMSettings(mode="colocate"))
    objective = GRPOObjective(GRPOLossSettings(loss_type="dapo", beta=0.0), 1.0, settings.vocab_size, None,
                              log_mismatch=True)
    engine = ScriptedEngine()
    rollout = GRPORollout(grpo, engine, PromptSource(ds, gbs * spg // g, shuffle=True, seed=5),
                          resolve_reward_funcs(["even_length"], types.SimpleNamespace()), ["even_length"],
                          Collator(pad_token_id=0), mbs, tokenizer, objective, ddp,
                          completions_path=os.path.join(a.out, "completions.jsonl") if rank == 0 else None,
                          reference=reference)
    steps = []
    for step in range(spg):
        micro = rollout.batches_for_step(step)
        if a.kl_in_reward:  # the policy's log-probs now (= π_old), for the test's own KL
            from megatron_swift.rlhf.grpo_step import fill_token_logps

            fill_token_logps(ddp, micro, 64, 1, "check_logps", 1.0, settings.vocab_size)
        result = train_step(ddp, optimizer, iter(micro), len(micro), 64, 1, loss_tokens=step_loss_tokens(micro),
                            objective=objective)
        steps.append({
            "engine_calls": engine.calls,
            "micro_batches": [{"advantages": mb["advantages"].tolist(), "lengths": mb["completion_lengths"].tolist(),
                               "tokens_per_share": mb["tokens_per_share"], "has_old_logps": "old_logps" in mb,
                               "kl": ((mb["check_logps"] - mb["ref_logps"]) * mb["completion_mask"]).sum(-1).tolist()
                               if "ref_logps" in mb else None,
                               "input_ids": mb["input_ids"].tolist(), "token_index": mb["token_index"].tolist(),
                               "mask": mb["completion_mask"].tolist(), "labels": mb["labels"].tolist()}
                              for mb in micro],
            "loss": result.loss, "grad_norm": result.grad_norm, "metrics": result.metrics,
            "rollout_metrics": objective.step_metrics(),
        })
    record = dict(steps[0], steps=steps)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)
    destroy_parallel()


if __name__ == "__main__":
    main()
