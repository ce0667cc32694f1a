"""Model-level LoRA parity against PEFT on the transformers model (fp32, dropout 0).

``--oracle``: a tiny HF Qwen3 (saved as DIR/hf), a PEFT LoRA on q/k/v/o/gate/up/down (``--targets``)
with B set to random non-zero values and A shared within q/k/v and within gate/up (our fused layers
share one A; ``--separate_a``: PEFT's own independent A's, which our canonical mode takes), saved as
DIR/adapter; logits, the per-token mean loss and the adapter grads of one batch -> DIR/oracle.pt.
Otherwise (one process or torchrun): the mcore model at the given layout loads DIR/hf and the
PEFT adapter (``load_peft_adapter``, what ``--adapters`` runs), runs forward/backward through
megatron's schedule and writes OUT/ours.pt: loss, logits (no PP), the adapter grads in PEFT
layout (``adapter_to_peft``, what the PEFT export runs); with ``--steps N`` it also trains N Adam
steps and records whether every base tensor stayed bit-identical. ``--break_scatter``: the logits
again with canonical adapters' rows scattered as plain [q; k; v] / [gate; up] blocks instead of
megatron's layout (a sensitivity check: must differ). ``--moe``: a tiny Qwen3-MoE instead, the PEFT
adapter on q/k/v/o and, through ``target_parameters``, on the fused 3-D expert tensors
(``mlp.experts.gate_up_proj`` / ``down_proj``); ``--ep``: expert parallelism of our side;
``--break_expert_order``: the logits again with expert B's columns read as (expert, r) instead of
PEFT's (r, expert) (must differ).
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from parity_worker import global_batch, microbatches  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MOE_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
SEQ, N = 16, 4


def oracle(root: str, rslora: bool, targets: list, share_a: bool, kv_heads: int, moe: bool = False) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from megatron_swift.model.tiny import tiny_hf_config

    torch.manual_seed(0)
    extra = {}
    if moe:  # routed experts as transformers' fused 3-D tensors, adapted by PEFT's target_parameters
        # no load-balancing loss: transformers' logits path has none (ours would add its gradient)
        cfg = tiny_hf_config("qwen3_moe", num_hidden_layers=2, router_aux_loss_coef=0.0)
        targets = [t for t in targets if t in ("q_proj", "k_proj", "v_proj", "o_proj")]
        extra["target_parameters"] = MOE_PARAMETERS
    else:
        # kv_heads 4 (8 query heads): 2 query groups per rank at TP2, so a wrong row scatter shows there too
        cfg = tiny_hf_config("qwen3", num_hidden_layers=2, num_key_value_heads=kv_heads,
                             num_attention_heads=2 * kv_heads)
    cfg._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(cfg).float()
    model.save_pretrained(os.path.join(root, "hf"), safe_serialization=True)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets,
                                            use_rslora=rslora, **extra))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        modules = dict(peft.named_modules())
        for name, module in modules.items():
            if hasattr(module, "lora_B") and "default" in getattr(module, "lora_B", {}):
                module.lora_B["default"].weight.copy_(torch.randn(module.lora_B["default"].weight.shape, generator=g) * 0.1)
        for name, module in (modules.items() if share_a else ()):  # fused groups share A (copied)
            for src, dsts in (("q_proj", ("k_proj", "v_proj")), ("gate_proj", ("up_proj",))):
                if name.endswith("." + src):
                    for d in dsts:
                        modules[name[: -len(src)] + d].lora_A["default"].weight.copy_(module.lora_A["default"].weight)
    peft.save_pretrained(os.path.join(root, "adapter"))
    batch = global_batch(N, SEQ, cfg.vocab_size)
    logits = peft(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    labels = batch["labels"]
    mask = labels.ne(-100)
    # transformers' objective as it is: megatron keeps its padded vocabulary rows out of the softmax
    losses = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.clamp(min=0).reshape(-1),
                                               reduction="none")
    loss = (losses * mask.reshape(-1)).sum() / mask.sum()
    loss.backward()
    grads = {}
    for name, p in peft.named_parameters():
        if p.grad is not None:
            key = name[len("base_model.model."):].replace(".default.", ".")
            grads[key] = p.grad.detach().clone()
    torch.save({"logits": logits.detach(), "loss": loss.item(), "grads": grads}, os.path.join(root, "oracle.pt"))


def ours(root: str, out: str, tp: int, pp: int, sp: bool, steps: int, break_scatter: bool = False,
         ep: int = 1, break_expert_order: bool = False) -> None:
    from megatron.core import parallel_state as ps

    from megatron_swift.converters.load import load_hf_into_mcore
    from megatron_swift.model import build_model, load_hf_config, unwrap
    from megatron_swift.platform import ParallelLayout, destroy_parallel, init_parallel
    from megatron_swift.trainer.model_setup import OptimizerSettings, build_optimizer, wrap_ddp
    from megatron_swift.trainer.step import forward_backward
    from megatron_swift.tuners.lora import LoraSettings, apply_lora
    from megatron_swift.tuners.peft_io import (adapter_to_peft, expert_target_parameters, load_peft_adapter,
                                               settings_from_peft)

    init_parallel(ParallelLayout(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 expert_model_parallel_size=ep), seed=7)
    hf = load_hf_config(os.path.join(root, "hf"))
    chunks, config, settings = build_model(hf, dict(sequence_parallel=sp, calculate_per_token_loss=True))
    lora = settings_from_peft(LoraSettings(dropout=0.0), os.path.join(root, "adapter"))
    apply_lora(chunks, config, lora)
    opt = OptimizerSettings(optimizer="adam", lr=1e-2, weight_decay=0.0, clip_grad=0.0, use_distributed_optimizer=os.environ.get("LORA_DISTOPT", "1") == "1")
    ddp = wrap_ddp(chunks, config, opt)
    optimizer = build_optimizer(ddp, config, opt)
    load_hf_into_mcore(ddp, os.path.join(root, "hf"), config, settings)
    load_peft_adapter(ddp, os.path.join(root, "adapter"), config, settings)
    optimizer.reload_model_params()
    base = {n: p.detach().clone() for n, p in unwrap(ddp[0]).named_parameters() if not p.requires_grad}
    batch = global_batch(N, SEQ, settings.vocab_size)
    result = {"lora": {"rank": lora.rank, "alpha": lora.alpha, "use_rslora": lora.use_rslora}}

    def logits():
        model = unwrap(ddp[0])
        with torch.no_grad():
            out = model(batch["input_ids"], batch["position_ids"], attention_mask=None)  # [b, s, V/tp]
        parts = [torch.empty_like(out) for _ in range(tp)]
        torch.distributed.all_gather(parts, out.contiguous(), group=ps.get_tensor_model_parallel_group())
        return torch.cat(parts, dim=-1)[..., : settings.vocab_size]

    if pp == 1:
        result["logits"] = logits()
    result["canonical"] = sorted(n for n, _ in unwrap(ddp[0]).named_parameters()
                                 if re.search(r"\.(q|k|v|gate|up)_proj\.lora_", n))
    if break_expert_order:  # expert B's columns read as (expert, r): load again, logits, then the right load
        from megatron_swift.tuners import peft_io

        good = peft_io.expert_factors
        peft_io.expert_factors = lambda a, b, r, e, i: (a.reshape(e, r, -1)[i], b.reshape(b.shape[0], e, r)[:, i])
        load_peft_adapter(ddp, os.path.join(root, "adapter"), config, settings)
        result["logits_broken"] = logits()
        peft_io.expert_factors = good
        load_peft_adapter(ddp, os.path.join(root, "adapter"), config, settings)
        optimizer.reload_model_params()
    if break_scatter:
        from megatron_swift.tuners import lora as lora_module

        good = lora_module.scatter_rows
        lora_module.scatter_rows = lambda rule, blocks, shape, geo: torch.cat(blocks, dim=0)
        result["logits_broken"] = logits()
        lora_module.scatter_rows = good
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    for step in range(max(steps, 1)):
        mbs = microbatches(batch, dp_rank, dp_size, 2)
        for chunk in ddp:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        res = forward_backward(ddp, iter(mbs), len(mbs), SEQ, 2)
        if step == 0:
            result["loss"] = res.loss
            result["grads"] = adapter_to_peft(ddp, config, settings, value=lambda p: p.main_grad)
        if steps:
            optimizer.step()
    if steps:
        result["base_unchanged"] = all(torch.equal(p, base[n]) for n, p in unwrap(ddp[0]).named_parameters()
                                       if n in base)
        result["adapter"] = adapter_to_peft(ddp, config, settings)
        result["target_parameters"] = expert_target_parameters(ddp, settings.family)
        if pp == 1:
            result["logits_after"] = logits()
    if torch.distributed.get_rank() == 0:
        os.makedirs(out, exist_ok=True)
        torch.save(result, os.path.join(out, "ours.pt"))
    destroy_parallel()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--root", required=True)
    p.add_argument("--out")
    p.add_argument("--oracle", action="store_true")
    p.add_argument("--rslora", action="store_true")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--moe", action="store_true")
    p.add_argument("--sp", action="store_true")
    p.add_argument("--steps", type=int, default=0)
    p.add_argument("--targets", default=",".join(TARGETS))
    p.add_argument("--separate_a", action="store_true")
    p.add_argument("--kv_heads", type=int, default=2)
    p.add_argument("--break_scatter", action="store_true")
    p.add_argument("--break_expert_order", action="store_true")
    a = p.parse_args()
    if a.oracle:
        oracle(a.root, a.rslora, a.targets.split(","), share_a=not a.separate_a, kv_heads=a.kv_heads,
               moe=a.moe)
    else:
        ours(a.root, a.out, a.tp, a.pp, a.sp, a.steps, a.break_scatter, a.ep, a.break_expert_order)
