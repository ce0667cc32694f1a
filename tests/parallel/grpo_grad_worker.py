"""The GRPO gradient with fixed completions (no generation), against transformers' autograd.

``--oracle ROOT``: a tiny HF Qwen3 (ROOT/hf) and a perturbed copy as the reference (ROOT/ref); fixed
prompts + completions of varied lengths with advantages (ROOT/rollouts.json); for each case the
surrogate written from the GRPO papers on transformers' forward at temperature T (on-policy:
ρ = exp(logπ - sg(logπ)); k3 KL to the reference) -> its value and every weight's gradient
(ROOT/oracle.pt).
Otherwise (torchrun at a layout): the mcore policy loads ROOT/hf, the frozen reference ROOT/ref
(rlhf/reference.py), the completions are packed THD (rlhf/grpo_step.collate_rollouts), the reference's
per-token log-probs filled by a forward-only pass (GRPOObjective.prepare) and one forward/backward runs
through megatron's schedule with GRPOObjective; the finalized gradients are written in HF layout by the
converters' exporter (OUT/<case>/) and the loss to OUT/result.json.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

T = 0.7
G = 2
CASES = {
    "grpo_beta": dict(loss_type="grpo", beta=0.04),
    "bnpo_sequence": dict(loss_type="bnpo", beta=0.0, importance_sampling_level="sequence"),
    "dapo_beta": dict(loss_type="dapo", beta=0.04, epsilon_high=0.28),
    # --top_entropy_quantile 0.5: the policy term on each micro batch's higher-entropy half of the tokens
    "grpo_top_entropy": dict(loss_type="grpo", beta=0.04, top_entropy_quantile=0.5),
}
MICRO = 2  # completions per micro batch; 4 completions -> 2 micro batches


def rollouts_spec(vocab: int) -> list:
    g = torch.Generator().manual_seed(3)
    out = []
    prompt_lengths, completion_lengths = [5, 3], [[4, 1], [6, 3]]
    for p, lengths in zip(prompt_lengths, completion_lengths):
        prompt = torch.randint(3, vocab, (p,), generator=g).tolist()
        for c in lengths:
            out.append({"prompt": prompt, "completion": torch.randint(3, vocab, (c,), generator=g).tolist()})
    adv = [0.9, -0.9, -0.4, 0.4]
    for r, a in zip(out, adv):
        r["advantage"] = a
    return out


def oracle(root: str) -> None:
    from transformers import AutoModelForCausalLM

    from megatron_swift.model.tiny import tiny_hf_config

    torch.manual_seed(0)
    cfg = tiny_hf_config("qwen3", num_hidden_layers=2)
    cfg._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(cfg).float()
    model.save_pretrained(os.path.join(root, "hf"), safe_serialization=True)
    ref = AutoModelForCausalLM.from_config(cfg).float()
    with torch.no_grad():
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            q.copy_(p + 0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    ref.save_pretrained(os.path.join(root, "ref"), safe_serialization=True)
    spec = rollouts_spec(cfg.vocab_size)
    with open(os.path.join(root, "rollouts.json"), "w") as f:
        json.dump(spec, f)

    def completion_logps(m, entropies=None):
        rows = []
        for r in spec:
            ids = torch.tensor([r["prompt"] + r["completion"]])
            logits = m(input_ids=ids).logits[0] / T
            logp = torch.log_softmax(logits.float(), -1)
            p, c = len(r["prompt"]), len(r["completion"])
            rows.append(logp[p - 1:p - 1 + c].gather(-1, torch.tensor(r["completion"]).unsqueeze(-1)).squeeze(-1))
            if entropies is not None:
                lp = logp[p - 1:p - 1 + c].detach()
                entropies.append(-(lp.exp() * lp).sum(-1))
        return rows

    with torch.no_grad():
        ref_rows = completion_logps(ref)
    results = {}
    for case, opts in CASES.items():
        model.zero_grad()
        entropies = []
        rows = completion_logps(model, entropies)
        beta = opts["beta"]
        keep = [torch.ones_like(e) for e in entropies]
        if "top_entropy_quantile" in opts:  # per micro batch: tokens at or above the (1 - q) quantile
            for i in range(0, 4, MICRO):
                threshold = torch.quantile(torch.cat(entropies[i:i + MICRO]), 1 - opts["top_entropy_quantile"])
                for j in range(i, i + MICRO):
                    keep[j] = (entropies[j] >= threshold).float()
        per_seq = []
        for r, logp, ref_lp, k in zip(spec, rows, ref_rows, keep):
            a = r["advantage"]
            if opts.get("importance_sampling_level") == "sequence":
                rho = torch.exp((logp - logp.detach()).mean()).expand_as(logp)
            else:
                rho = torch.exp(logp - logp.detach())
            d = ref_lp - logp
            per_seq.append(-rho * a * k + beta * (torch.exp(d) - d - 1))  # on-policy: nothing clips at ρ = 1
        if opts["loss_type"] == "grpo":  # micro batch: mean over its completions of token means; then / M
            mbs = [torch.stack([s.mean() for s in per_seq[i:i + MICRO]]).mean() for i in range(0, 4, MICRO)]
            loss = sum(mbs) / len(mbs)
        elif opts["loss_type"] == "bnpo":  # micro batch: token mean; then / M
            mbs = [torch.cat(per_seq[i:i + MICRO]).mean() for i in range(0, 4, MICRO)]
            loss = sum(mbs) / len(mbs)
        else:  # dapo: token mean over the whole batch
            loss = torch.cat(per_seq).mean()
        loss.backward()
        results[case] = {"loss": float(loss), "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()},
                         "entropy": float(torch.cat(entropies).mean()),
                         "kept": float(torch.cat(keep).mean())}
    torch.save(results, os.path.join(root, "oracle.pt"))


class GradParams:
    """write_hf_weights' value source: each parameter's finalized gradient instead of its value."""
    collective = False

    def materialize(self, group):
        pass

    def tensor(self, lp):
        return lp.param.main_grad.detach()

    def release(self, group):
        pass


def ours(root: str, out: str, tp: int, pp: int, sp: bool) -> None:
    from megatron_swift.converters.api import load_hf_into_mcore, write_hf_weights
    from megatron_swift.data.batching import Collator
    from megatron_swift.model import build_model, load_hf_config
    from megatron_swift.platform import ParallelLayout, destroy_parallel, init_parallel
    from megatron_swift.rlhf.grpo import GRPOLossSettings
    from megatron_swift.rlhf.grpo_step import GRPOObjective, Rollout, collate_rollouts
    from megatron_swift.rlhf.reference import build_reference
    from megatron_swift.trainer.model_setup import OptimizerSettings, build_optimizer, wrap_ddp
    from megatron_swift.trainer.step import forward_backward

    init_parallel(ParallelLayout(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp), seed=7)
    hf = load_hf_config(os.path.join(root, "hf"))
    overrides = dict(sequence_parallel=sp, calculate_per_token_loss=False)
    chunks, config, settings = build_model(hf, dict(overrides))
    opt = OptimizerSettings(optimizer="adam", lr=1e-2, weight_decay=0.0, clip_grad=0.0, use_distributed_optimizer=False)
    ddp = wrap_ddp(chunks, config, opt)
    build_optimizer(ddp, config, opt)  # installs megatron's grad finalization (TP/SP norm grads, DP, PP embeddings)
    load_hf_into_mcore(ddp, os.path.join(root, "hf"), config, settings)
    reference = build_reference(ddp, hf, overrides, "test", ref_model_dir=os.path.join(root, "ref"))
    spec = json.load(open(os.path.join(root, "rollouts.json")))
    fixed = 32 if pp > 1 else None  # pipeline parallelism: fixed micro-batch shapes
    collator = Collator(pad_token_id=0, padding_free=True, pad_to_multiple_of=tp if sp else 1, fixed_length=fixed)
    result = {}
    for case, opts in CASES.items():
        rollouts = [Rollout(r["prompt"], r["completion"], None, False, r["advantage"]) for r in spec]
        micro = [collate_rollouts(rollouts[i:i + MICRO], collator) for i in range(0, len(rollouts), MICRO)]
        tokens = sum(float(mb["completion_mask"].sum()) for mb in micro)
        for mb in micro:
            mb["tokens_per_share"] = tokens / len(micro)
        loss_opts = {k: v for k, v in opts.items() if k != "top_entropy_quantile"}
        objective = GRPOObjective(GRPOLossSettings(**loss_opts), T, settings.vocab_size,
                                  reference=reference if opts["beta"] else None, log_entropy=True,
                                  top_entropy_quantile=opts.get("top_entropy_quantile", 1.0))
        seq = fixed or 32
        objective.prepare(micro, seq, 1)
        for chunk in ddp:
            chunk.zero_grad_buffer()
        iters = [iter(micro) for _ in ddp] if len(ddp) > 1 else iter(micro)
        res = forward_backward(ddp, iters, len(micro), seq, 1, objective=objective)
        write_hf_weights(ddp, config, settings, os.path.join(out, case), dtype=torch.float32, params=GradParams())
        result[case] = {"loss": res.loss, "metrics": res.metrics}
    if torch.distributed.get_rank() == 0:
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump(result, f)
    destroy_parallel()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--root", required=True)
    p.add_argument("--out")
    p.add_argument("--oracle", action="store_true")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--sp", action="store_true")
    a = p.parse_args()
    if a.oracle:
        oracle(a.root)
    else:
        ours(a.root, a.out, a.tp, a.pp, a.sp)
