"""Layer-level LoRA parity: megatron's column/row linears with our adapter at TP 1 or 2, SP on/off,
against a float64 dense computation of the same global tensors.

Cases: column, row, fused QKV (GQA; compared per projection through the converter's QKV rule),
SwiGLU fc1 (per gate/up through the GATE_UP rule), an expert fc1 (is_expert, expert-TP group).
Gradients go through megatron's own DDP + finalize_model_grads (the SP sum of replicated factors).
Sensitivity variants (``--break``): ``sp_sum`` drops the replicated factors' SP mark;
``fc1_chunk`` shards fc1's B by plain row chunks. Writes OUT/result.json: per case max relative
errors and whether the replicated factors are bitwise equal across ranks.
"""

from __future__ import annotations

import argparse
import json
import os

import torch


def parse():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--breaks", default="", help="comma-separated sensitivity variants to run as well")
    p.add_argument("--also_tp1", action="store_true", help="then the same cases at TP1 (keys 'tp1:...'; the "
                   "ranks are data-parallel replicas with the same data)")
    return p.parse_args()


H, FFN, R, S, B = 16, 24, 4, 8, 2
HEADS, GROUPS, HEAD_DIM = 4, 2, 4


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / max(b.norm().item(), 1e-30))


def gather(t: torch.Tensor, dim: int, group) -> torch.Tensor:
    n = torch.distributed.get_world_size(group)
    if n == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(n)]
    torch.distributed.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def main():
    args = parse()
    from megatron.core import parallel_state as ps

    from converters.mapping import GATE_UP, QKV, Rule, src
    from converters.transforms import Geometry
    from megatron_swift.platform import ParallelLayout, destroy_parallel, init_parallel
    from megatron_swift.tuners import lora

    init_parallel(ParallelLayout(tensor_model_parallel_size=args.tp, expert_tensor_parallel_size=1), seed=3)
    tp_group = ps.get_tensor_model_parallel_group()
    tp = tp_group.size()
    geo = Geometry(num_heads=HEADS, num_groups=GROUPS, head_dim=HEAD_DIM, vocab_size=0, padded_vocab_size=0)
    qkv_rule = Rule("qkv", (src("q"), src("k"), src("v")), QKV, 0)
    fc1_rule = Rule("fc1", (src("g"), src("u")), GATE_UP, 0)
    settings = lora.LoraSettings(rank=R, alpha=8, dropout=0.0, init_weights="false", seed=11)  # B non-zero
    results = {}
    good_rows = lora._global_b_rows
    for broken in [""] + [b for b in args.breaks.split(",") if b]:
        lora._global_b_rows = (lambda b, rank, size, gated: b.chunk(size, 0)[rank]) if broken == "fc1_chunk" \
            else good_rows
        results.update({(f"{broken}:{k}" if broken else k): v for k, v in
                        run_cases(args, lora, settings, tp, geo, qkv_rule, fc1_rule, broken).items()})
    lora._global_b_rows = good_rows
    if args.also_tp1 and tp > 1:
        init_parallel(ParallelLayout(tensor_model_parallel_size=1, expert_tensor_parallel_size=1), seed=3)
        args.tp = 1
        results.update({f"tp1:{k}": v for k, v in
                        run_cases(args, lora, settings, 1, geo, qkv_rule, fc1_rule, "").items()})
    if torch.distributed.get_rank() == 0:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "result.json"), "w") as f:
            json.dump(results, f, indent=1)
    destroy_parallel()


def run_cases(args, lora, settings, tp, geo, qkv_rule, fc1_rule, broken):
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.module import MegatronModule

    from converters.transforms import hf_to_local, local_shards_to_hf

    results = {}
    for sp in ([False, True] if tp > 1 else [False]):
        config = TransformerConfig(num_layers=1, hidden_size=H, num_attention_heads=HEADS, sequence_parallel=sp,
                                   tensor_model_parallel_size=tp, use_cpu_initialization=True,
                                   params_dtype=torch.float32, hidden_dropout=0.0, attention_dropout=0.0)
        qkv_out = (HEADS + 2 * GROUPS) * HEAD_DIM
        specs = {  # name -> (class, in, out, gated, hf rule, expert)
            "column": (ColumnParallelLinear, H, FFN, False, None, False),
            "row": (RowParallelLinear, FFN, H, False, None, False),
            "qkv": (ColumnParallelLinear, H, qkv_out, False, qkv_rule, False),
            "fc1": (ColumnParallelLinear, H, 2 * FFN, True, fc1_rule, False),
            "expert_fc1": (ColumnParallelLinear, H, 2 * FFN, True, fc1_rule, True),
        }
        for case, (cls, din, dout, gated, rule, expert) in specs.items():
            kw = dict(config=config, init_method=torch.nn.init.normal_, bias=False, skip_bias_add=False,
                      is_expert=expert, tp_group=ps.get_expert_tensor_parallel_group() if expert else None)
            kw.update(gather_output=False) if cls is ColumnParallelLinear else kw.update(input_is_parallel=True)
            layer = cls(din, dout, **kw)
            lora.add_lora(layer, settings, f"layer.{case}", gated=gated)
            for p in (layer.lora_A.weight, layer.lora_B.weight):
                if broken == "sp_sum" and hasattr(p, "sequence_parallel"):
                    del p.sequence_parallel
                if broken == "expert_allreduce" and expert:
                    p.allreduce = True  # routed to the dense data-parallel reduce

            class Holder(MegatronModule):
                def __init__(self):
                    super().__init__(config)
                    self.layer = layer

                def forward(self, x):
                    return self.layer(x)

            holder = Holder()
            for n, p in holder.named_parameters():
                p.requires_grad_(".lora_" in n)
            ddp = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), holder)
            ltp = layer.tp_group.size()
            lrank = layer.tp_group.rank()
            seq_split = layer.sequence_parallel
            # an expert's tokens: each expert-data-parallel rank holds its own share of them
            # (the dispatcher's job), and DDP's expert reduce sums the shares' grads
            # (at TP2 the two ranks are one data-parallel replica and the expert-DP group spans them;
            # at TP1 they are two DP replicas, whose grads megatron averages: each gets all tokens)
            edp = ps.get_expert_data_parallel_group() if expert and ps.get_data_parallel_world_size() == 1 else None
            expert_split = edp is not None
            gen = torch.Generator().manual_seed(5)
            x_full = torch.randn(S, B, din, generator=gen, dtype=torch.float64)
            gy_full = torch.randn(S, B, dout, generator=gen, dtype=torch.float64)
            # dense float64 oracle on the global tensors (the TP=1 draw)
            w_full = gather(layer.weight.detach().double(), 0 if cls is ColumnParallelLinear else 1, layer.tp_group)
            if cls is ColumnParallelLinear and gated:  # gathered shards [g0;u0;g1;u1] -> [g;u]
                g, u = local_shards_to_hf(fc1_rule, w_full.chunk(ltp, 0), geo)
                w_full = torch.cat([g, u])
            a_g = lora._init_global("A", (R, din), settings, f"layer.{case}.lora_A.weight").requires_grad_(True)
            b_g = lora._init_global("B", (dout, R), settings, f"layer.{case}.lora_B.weight").requires_grad_(True)
            s = settings.scaling
            if rule is None:
                y_ref = x_full @ w_full.T + s * (x_full @ a_g.T) @ b_g.T
            else:  # each HF projection on its own, then assembled in the mcore layout of this rank
                parts_w = local_shards_to_hf(rule, [w_full], geo) if rule is qkv_rule else list(w_full.chunk(2))
                parts_b = local_shards_to_hf(rule, [b_g], geo) if rule is qkv_rule else list(b_g.chunk(2))
                ys = [x_full @ pw.T + s * (x_full @ a_g.T) @ pb.T for pw, pb in zip(parts_w, parts_b)]
                y_ref = torch.cat(ys, dim=-1)  # HF order [q;k;v] / [gate;up] on the last dim
            (y_ref * gy_full).sum().backward() if rule is None else None
            # this rank's inputs
            if expert_split:
                x_loc = x_full.chunk(edp.size(), 0)[edp.rank()]
            elif expert:
                x_loc = x_full
            elif cls is ColumnParallelLinear:
                x_loc = x_full.chunk(ltp, 0)[lrank] if seq_split else x_full
            else:
                x_loc = x_full.chunk(ltp, 2)[lrank]
            out_rows = dout // ltp if cls is ColumnParallelLinear else dout
            if rule is not None:
                def read(i, index, ys=ys):  # noqa: E731
                    t = ys[i].permute(2, 0, 1)  # [out_i, s, b]
                    return t[index]

                y_exp = hf_to_local(rule, read, (out_rows, S, B), lrank, ltp, geo).permute(1, 2, 0)
                if expert_split:
                    y_exp = y_exp.chunk(edp.size(), 0)[edp.rank()]
                # the upstream grad in HF order, as each projection's output grad
                (sum((yy * gg).sum() for yy, gg in zip(ys, _split_like(gy_full, ys)))).backward()
            elif cls is ColumnParallelLinear:
                y_exp = y_ref.detach().chunk(ltp, 2)[lrank]
            else:
                y_exp = y_ref.detach().chunk(ltp, 0)[lrank] if seq_split else y_ref.detach()
            # the upstream gradient each rank sees for its output
            if cls is ColumnParallelLinear:
                if rule is None:
                    gy_loc = gy_full.chunk(ltp, 2)[lrank]
                else:
                    gparts = _split_like(gy_full, ys)

                    def readg(i, index, gparts=gparts):  # noqa: E731
                        return gparts[i].permute(2, 0, 1)[index]

                    gy_loc = hf_to_local(rule, readg, (out_rows, S, B), lrank, ltp, geo).permute(1, 2, 0)
                    if expert_split:
                        gy_loc = gy_loc.chunk(edp.size(), 0)[edp.rank()]
            else:
                gy_loc = gy_full.chunk(ltp, 0)[lrank] if seq_split else gy_full
            x_in = x_loc.float().requires_grad_(True)
            y, _ = ddp(x_in)
            (y.double() * gy_loc).sum().backward()
            finalize_model_grads([ddp])
            ga = layer.lora_A.weight.main_grad.double()
            gb = layer.lora_B.weight.main_grad.double()
            # reassemble global A/B grads from the shards
            if cls is ColumnParallelLinear:
                ga_full = ga
                gb_full = gather(gb, 0, layer.tp_group)
                if gated:
                    g, u = local_shards_to_hf(fc1_rule, gb_full.chunk(ltp, 0), geo)
                    gb_full = torch.cat([g, u])
            else:
                ga_full = gather(ga, 1, layer.tp_group)
                gb_full = gb
            replicated = ga if cls is ColumnParallelLinear else gb
            reps = [torch.empty_like(replicated) for _ in range(ltp)]
            if ltp > 1:
                torch.distributed.all_gather(reps, replicated.contiguous(), group=layer.tp_group)
            else:
                reps = [replicated]
            gb_ref = b_g.grad if rule is None else b_g.grad
            results[f"{case}/sp{int(sp)}"] = {
                "out": rel(y.detach(), y_exp),
                "grad_A": rel(ga_full, a_g.grad),
                "grad_B": rel(gb_full, gb_ref),
                "replicated_equal": all(torch.equal(reps[0], t) for t in reps[1:]),
            }
    return results


def _split_like(t: torch.Tensor, parts: list) -> list:
    sizes = [p.shape[-1] for p in parts]
    return list(t.split(sizes, dim=-1))


if __name__ == "__main__":
    main()
