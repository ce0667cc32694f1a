"""The GPU path, checked on a CPU: the decisions and data structures that do not need a GPU.

Oracles: megatron-core's own classes and helpers (its ColumnParallelLinear without NVIDIA apex, its
context-parallel batch split), megatron-core's spec source for Transformer Engine's checkpoint keys
(gpt_layer_specs.py: the TE MoE layer keeps ``pre_mlp_layernorm``, TE modules carry ``_extra_state``),
and megatron-core's declared Transformer Engine range. A GPU host is played by a ``Capabilities`` /
``Platform`` made by hand. scripts/gpu_check.py runs the real thing on a GPU (docs/gpu.md).
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

from megatron_swift.args.capabilities import Capabilities

REPO = Path(__file__).resolve().parents[1]
GPU_NO_TE = Capabilities(gpu=True, transformer_engine=False, apex_gradient_accumulation=False, deep_ep=False,
                         wandb=False, swanlab=False)
GPU_TE = Capabilities(gpu=True, transformer_engine=True, apex_gradient_accumulation=False, deep_ep=False,
                      wandb=False, swanlab=False)


class FakeCudaPlatform:
    """megatron_swift.platform.Platform as a CUDA host without TE or apex sees itself."""

    def __new__(cls):
        from megatron_swift.platform import Platform

        platform = Platform("cuda", "nccl")
        platform.__dict__["has_transformer_engine"] = False  # cached_property values
        platform.__dict__["has_apex_gradient_accumulation"] = False
        return platform


def test_gpu_without_te_or_apex_builds_a_config_megatron_accepts(monkeypatch, megatron_world1):
    """B1/B9: fusions follow what the machine has. Reproduced first: megatron's output layer with
    gradient-accumulation fusion (the old default on any GPU) needs apex's CUDA extension."""
    from megatron.core.tensor_parallel import layers
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear
    from megatron.core.transformer import TransformerConfig

    import megatron_swift.model.config as model_config
    from megatron_swift.model.tiny import tiny_hf_config

    monkeypatch.setattr(layers, "_grad_accum_fusion_available", False)  # as without apex (and our CPU stand-in)
    with pytest.raises(RuntimeError, match="fused_weight_gradient_mlp_cuda|gradient_accumulation_fusion"):
        old = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, gradient_accumulation_fusion=True)
        ColumnParallelLinear(8, 8, config=old, init_method=old.init_method)
    monkeypatch.setattr(model_config, "get_platform", lambda: FakeCudaPlatform())
    config, _ = model_config.transformer_config_from_hf(tiny_hf_config("qwen3"), {})
    assert config.gradient_accumulation_fusion is False and config.apply_rope_fusion is False
    assert config.masked_softmax_fusion is False and config.transformer_impl == "local"
    assert config.bias_activation_fusion is True  # megatron's jit-fused kernel works on any GPU
    ColumnParallelLinear(8, 8, config=config, init_method=config.init_method)


def test_explicit_fusions_need_their_kernels(tmp_path):
    from megatron_swift.args import ArgumentError
    from megatron_swift.args.commands import COMMANDS
    from megatron_swift.args.parser import collect_values
    from megatron_swift.args.validate import validate

    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "qwen3", "num_attention_heads": 4,
                                                   "num_key_value_heads": 2, "hidden_size": 64,
                                                   "intermediate_size": 128, "num_hidden_layers": 2}))
    data = tmp_path / "d.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n')

    def parse(caps, *extra):
        values, explicit = collect_values("sft", ["--model", str(model), "--dataset", str(data), "--train_iters", "1",
                                                  *extra])
        args = COMMANDS["sft"](**values)
        args.command, args.explicit_args = "sft", explicit
        validate(args, 1, {}, caps=caps)
        return args

    for flag in ("--apply_rope_fusion", "--masked_softmax_fusion", "--gradient_accumulation_fusion",
                 "--moe_grouped_gemm"):
        with pytest.raises(ArgumentError, match=flag.lstrip("-")):
            parse(GPU_NO_TE, flag, "true")
    assert parse(GPU_TE, "--apply_rope_fusion", "true").apply_rope_fusion is True
    cpu = Capabilities(False, False, False, False, False, False)  # torch's addmm stands in for apex on CPU
    assert parse(cpu, "--gradient_accumulation_fusion", "true").gradient_accumulation_fusion is True
    # GPU defaults: no core-attention recompute on top of TE's flash attention; overlap with DP > 1
    assert parse(GPU_TE).recompute_granularity == "none"
    assert parse(GPU_TE, "--recompute_granularity", "selective").recompute_granularity == "selective"
    # without TE: none where the THD attention is one SDPA flash call per sequence, else selective
    assert parse(cpu).recompute_granularity == "none"
    assert parse(GPU_NO_TE).recompute_granularity == "none"
    assert parse(cpu, "--padding_free", "false").recompute_granularity == "selective"
    assert parse(cpu, "--attention_dropout", "0.1").recompute_granularity == "selective"
    assert parse(cpu, "--recompute_granularity", "selective").recompute_granularity == "selective"


def test_gpu_overlap_and_launch_environment(tmp_path):
    from megatron_swift.cli.launch import runtime_environment

    class Args:
        deterministic_mode = True

    assert runtime_environment(Args, gpu=True) == {"CUDA_DEVICE_MAX_CONNECTIONS": "1",
                                                    "NVTE_ALLOW_NONDETERMINISTIC_ALGO": "0"}
    Args.deterministic_mode = False
    assert runtime_environment(Args, gpu=False) == {}


def test_te_tagged_expert_weights_pass_the_partition_check():
    """B3: TE builds experts with parallel_mode=None when expert TP or EP > 1 and tags every weight
    partition_dim=0, also fc2 (split on dim 1 by the rule)."""
    from megatron_swift.converters.plan import _check_partition
    from megatron_swift.converters.mapping import Rule, src

    weight = torch.nn.Parameter(torch.empty(4, 4))
    weight.tensor_model_parallel, weight.partition_dim = True, 0
    expert_fc2 = Rule("decoder.layers.{layer}.mlp.experts.linear_fc2.weight{expert}",
                      (src("model.layers.{layer}.mlp.experts.{expert}.down_proj.weight"),), tp_dim=1)
    assert expert_fc2.is_expert
    _check_partition("decoder.layers.0.mlp.experts.linear_fc2.weight0", weight, expert_fc2)
    dense = Rule("decoder.layers.{layer}.mlp.linear_fc2.weight", (src("model.layers.{layer}.mlp.down_proj.weight"),),
                 tp_dim=1)
    with pytest.raises(ValueError, match="tp_dim=1"):
        _check_partition("decoder.layers.0.mlp.linear_fc2.weight", weight, dense)


def test_checkpoint_keys_do_not_depend_on_the_layer_spec(megatron_world1):
    """B5: megatron-core's TE MoE layer keeps ``pre_mlp_layernorm`` (gpt_layer_specs.py, TE branch:
    pre_mlp_layernorm=backend.layer_norm() if num_experts); the local spec renamed it to the dense fc1's
    fused-norm key. Our local spec uses TE's key in MoE layers and the dense key in dense layers."""
    from megatron_swift.model import build_model
    from megatron_swift.model.tiny import tiny_hf_config

    def norm_keys(family):
        (model,), _, _ = build_model(tiny_hf_config(family))
        return {v.key for k, v in model.sharded_state_dict().items() if "layernorm" in k or "layer_norm" in v.key}

    assert "decoder.layers.pre_mlp_layernorm.weight" in norm_keys("qwen3_moe")
    assert "decoder.layers.mlp.linear_fc1.layer_norm_weight" not in norm_keys("qwen3_moe")
    assert "decoder.layers.mlp.linear_fc1.layer_norm_weight" in norm_keys("qwen3")


def test_checkpoints_load_across_specs_and_versions(tmp_path, megatron_world1):
    """B5: a checkpoint without TE's ``_extra_state`` (written on CPU) and one with the old MoE norm
    key (earlier versions) load into this model."""
    import dataclasses

    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from megatron_swift.checkpoint.state import adapt_request, load_model_state, model_sharded_state_dict
    from megatron_swift.model import build_model
    from megatron_swift.model.tiny import tiny_hf_config

    (model,), _, _ = build_model(tiny_hf_config("qwen3_moe"))
    state = model_sharded_state_dict([model])
    old_name = "decoder.layers.mlp.linear_fc1.layer_norm_weight"
    for name, value in state["model"].items():
        if value.key == "decoder.layers.pre_mlp_layernorm.weight":
            state["model"][name] = dataclasses.replace(value, key=old_name)
    dist_checkpointing.save(state, str(tmp_path))
    expected = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    (fresh,), _, _ = build_model(tiny_hf_config("qwen3_moe"), {"perform_initialization": True})
    request = model_sharded_state_dict([fresh])
    request["model"]["decoder.final_layernorm._extra_state"] = ShardedObject(
        "decoder.final_layernorm._extra_state", None, (1,), (0,), replica_id=0)  # what a TE norm asks for
    changes = adapt_request(request, str(tmp_path))
    assert any("read as" in c for c in changes) and any("_extra_state" in c for c in changes)
    load_model_state([fresh], dist_checkpointing.load(request, str(tmp_path)))
    for key, value in expected.items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_conversion_collectives_go_through_comm():
    """B4: NCCL takes only GPU tensors; the converters' tensor collectives all go through
    converters/comm.py, which moves them to the platform device and back."""
    collectives = {"all_reduce", "gather", "broadcast", "all_gather", "reduce_scatter", "reduce", "scatter",
                   "all_to_all", "send", "recv", "all_gather_into_tensor", "reduce_scatter_tensor"}
    offenders = []
    for path in sorted((REPO / "converters").glob("*.py")):
        if path.name == "comm.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in collectives
                    and isinstance(node.func.value, ast.Name) and node.func.value.id in ("dist", "torch")):
                offenders.append(f"{path.name}:{node.lineno} {node.func.attr}")
    assert offenders == []


def test_comm_moves_tensors_to_the_device_and_back(megatron_world1):
    from megatron_swift.converters import comm

    t = torch.arange(6.0).reshape(2, 3)
    assert comm.gather(t, None, 1, True)[0] is t
    assert comm.max_int(3) == 3 and comm.min_int(4) == 4
    out = comm.broadcast(t, 0, t.shape, t.dtype)
    assert out.device.type == "cpu" and torch.equal(out, t)


@pytest.mark.parametrize("cp", [2, 4])
def test_context_parallel_split_matches_megatron(cp):
    """B8: padded batches use megatron-core's own split; THD rows are split per sequence, which must
    equal megatron's split applied to each sequence alone, and the CP ranks together hold every token
    once."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    from megatron_swift.data.batching import Collator
    from megatron_swift.data.context_parallel import _Group, split_for_context_parallel

    g = torch.Generator().manual_seed(0)
    samples = [{"input_ids": torch.randint(1, 99, (n,), generator=g).tolist()} for n in (5, 13, 8)]
    for s in samples:
        s["labels"] = s["input_ids"]
    padded = Collator(0, padding_free=False, pad_to_multiple_of=2 * cp, context_parallel_size=cp)(samples)
    for rank in range(cp):
        ours = split_for_context_parallel(padded, cp, rank)
        theirs = get_batch_on_this_cp_rank({k: padded[k].clone() for k in ("input_ids", "labels")},
                                           cp_group=_Group(cp, rank))
        assert torch.equal(ours["input_ids"], theirs["input_ids"])
    thd = Collator(0, padding_free=True, context_parallel_size=cp)(samples)
    params = thd["packed_seq_params"]
    assert params.cu_seqlens_q.tolist()[:4] == [0, 5, 18, 26]
    assert all(b % (2 * cp) == 0 for b in params.cu_seqlens_q_padded.tolist())
    seen = []
    bounds = params.cu_seqlens_q_padded.tolist()
    for rank in range(cp):
        part = split_for_context_parallel(thd, cp, rank)
        expected = torch.cat([get_batch_on_this_cp_rank({"x": thd["input_ids"][:, a:b].clone()},
                                                        cp_group=_Group(cp, rank))["x"] for a, b in
                              zip(bounds[:-1], bounds[1:])], dim=1)
        assert torch.equal(part["input_ids"], expected)
        seen.append(part["input_ids"])
    assert sorted(torch.cat(seen, dim=1).flatten().tolist()) == sorted(thd["input_ids"].flatten().tolist())


def test_gpu_extra_pins_transformer_engine_to_megatron_cores_range():
    """B10: TE in the range megatron-core declares, and no `apex` (the PyPI project of that name is not
    NVIDIA apex)."""
    import importlib.metadata
    import re
    import tomllib

    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    te = next(r for r in extra if r.startswith("transformer-engine"))
    declared = next(r for r in importlib.metadata.requires("megatron-core") if r.startswith("transformer-engine"))
    assert re.findall(r"[<>=!]=?[\d.a-z]+", te) and sorted(re.findall(r"[<>=!]=?[\d.a-z]+", te)) == sorted(
        re.findall(r"[<>=!]=?[\d.a-z]+", declared.split(";")[0]))
    assert not any(r.split("[")[0].split("=")[0].strip() == "apex" for r in extra)
