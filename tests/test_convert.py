"""HF <-> Megatron-Core checkpoint conversion (``megatron_swift.converters``, ``megatron export``).

Oracles:
* transformers' own files: tiny random models saved with ``save_pretrained`` (safetensors, several
  shards); HF -> mcore -> HF must give the same tensors bit for bit
  (``safetensors.torch.load_file``), whatever the layouts on the way;
* transformers' own logits: ``AutoModelForCausalLM`` (fp32, eager) vs the converted mcore model
  on the same tokens, max |diff| < 1e-4 over the real vocabulary;
* hand-written layouts for the shard math (QKV per query group, [gate; up] per TP rank, zero
  vocab padding) and for the fused 3-D expert layout.
Layouts with 2 ranks (TP=2, PP=2, VPP, EP=2) are real gloo jobs under torch.distributed.run,
grouped into one job; the CLI runs once end to end with ``NPROC_PER_NODE=2``.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import TESTS, megatron, torchrun

from megatron_swift.converters.hf_io import HFCheckpoint, ShardPlan, ShardWriter, parse_size
from megatron_swift.converters.mapping import GATE_UP, QKV, VOCAB, Rule, split_name, src
from megatron_swift.converters.transforms import Geometry, hf_to_local, local_shards_to_hf

WORKER = TESTS / "parallel" / "convert_worker.py"
FAMILIES = ("llama", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mixtral")  # newer families: test_families.py
TOL = 1e-4


# ----------------------------------------------------------------------------------- helpers

def save_tiny(family: str, path: Path, seed: int = 0, **overrides) -> str:
    """A tiny random transformers model saved with save_pretrained (several shards) plus a few
    tokenizer-side files the HF output must carry over."""
    from transformers import AutoModelForCausalLM

    from megatron_swift.model.tiny import tiny_hf_config

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_hf_config(family, **overrides))
    model.save_pretrained(str(path), max_shard_size="200KB")
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 512, "tokenizer_class": "X"}))
    (path / "chat_template.jinja").write_text("{{ messages }}")
    return str(path)


def hf_tensors(path) -> dict:
    out = {}
    for file in sorted(glob.glob(os.path.join(str(path), "*.safetensors"))):
        out.update(load_file(file))
    return out


def assert_bit_exact(expected_dir, actual_dir, dtype=None):
    expected, actual = hf_tensors(expected_dir), hf_tensors(actual_dir)
    assert sorted(actual) == sorted(expected), set(actual) ^ set(expected)
    for key, want in expected.items():
        want = want if dtype is None else want.to(dtype)
        assert actual[key].dtype == want.dtype and torch.equal(actual[key], want), key


def assert_precise(result: dict, out_dir=None, tol: float = TOL):
    assert result["max_diff"] < tol and result["max_diff_with_loss"] < tol, result
    assert 0 <= result["mean_diff"] <= result["max_diff"] and result["token_diff"] == 0, result
    if out_dir is not None:
        saved = json.loads((Path(out_dir) / "convert_precision.json").read_text())
        for key in ("mean_diff", "max_diff", "mean_diff_with_loss", "max_diff_with_loss", "token_diff", "dtype"):
            assert saved[key] == result[key], key


def fuse_experts(src_dir: str, dst: Path, router_rename: dict | None = None) -> str:
    """Rewrites a per-expert checkpoint into transformers 5's in-memory layout: experts fused into
    ``mlp.experts.gate_up_proj [E, 2F, H]`` (gate first) and ``mlp.experts.down_proj [E, H, F]``."""
    import re

    tensors = hf_tensors(src_dir)
    out, experts = {}, {}
    pattern = re.compile(r"^model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight$")
    for key, t in tensors.items():
        m = pattern.match(key)
        if m:
            experts.setdefault(int(m.group(1)), {}).setdefault(int(m.group(2)), {})[m.group(3)] = t
            continue
        for old, new in (router_rename or {}).items():
            key = key.replace(old, new)
        out[key] = t
    names = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down", "w1": "gate", "w3": "up", "w2": "down"}
    for layer, per_expert in experts.items():
        parts = [{names[k]: v for k, v in per_expert[e].items()} for e in sorted(per_expert)]
        out[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([p["gate"], p["up"]]) for p in parts]).contiguous()
        out[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack([p["down"] for p in parts]).contiguous()
    dst.mkdir(parents=True)
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(os.path.join(src_dir, "config.json"), dst / "config.json")
    return str(dst)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """family -> HF dir (built on first use)."""
    root = tmp_path_factory.mktemp("hf")
    cache = {}

    def get(name: str, family: str | None = None, **overrides):
        if name not in cache:
            cache[name] = save_tiny(family or name, root / name, **overrides)
        return cache[name]

    return get


# ------------------------------------------------------------------------------ shard math

GEO = Geometry(num_heads=8, num_groups=2, head_dim=3, vocab_size=1000, padded_vocab_size=1024)


def _reader(tensors):
    return lambda i, index: tensors[i][index]


@pytest.mark.parametrize("tp", [1, 2])
def test_qkv_is_fused_per_query_group_and_split_by_groups(tp):
    d, hpg, hidden = GEO.head_dim, GEO.heads_per_group, 5
    q = torch.randn(GEO.num_heads * d, hidden)
    k, v = torch.randn(GEO.num_groups * d, hidden), torch.randn(GEO.num_groups * d, hidden)
    rule = Rule("x.linear_qkv.weight", (src("q"), src("k"), src("v")), QKV, tp_dim=0)
    rows = GEO.num_groups * (hpg + 2) * d // tp
    shards = [hf_to_local(rule, _reader([q, k, v]), (rows, hidden), r, tp, GEO) for r in range(tp)]
    # hand-built oracle: for each KV head g, the q heads of g, then k_g, then v_g
    expected = torch.cat([torch.cat([q[g * hpg * d:(g + 1) * hpg * d], k[g * d:(g + 1) * d], v[g * d:(g + 1) * d]])
                          for g in range(GEO.num_groups)])
    assert torch.equal(torch.cat(shards), expected)
    back = local_shards_to_hf(rule, shards, GEO)
    assert all(torch.equal(a, b) for a, b in zip(back, [q, k, v]))
    bias = [torch.randn(GEO.num_heads * d), torch.randn(GEO.num_groups * d), torch.randn(GEO.num_groups * d)]
    bias_rule = Rule("x.linear_qkv.bias", (src("q"), src("k"), src("v")), QKV, tp_dim=0)
    shards = [hf_to_local(bias_rule, _reader(bias), (rows,), r, tp, GEO) for r in range(tp)]
    assert all(torch.equal(a, b) for a, b in zip(local_shards_to_hf(bias_rule, shards, GEO), bias))


def test_gate_up_holds_gate_shard_then_up_shard_on_each_rank():
    gate, up = torch.randn(8, 3), torch.randn(8, 3)
    rule = Rule("x.linear_fc1.weight", (src("g"), src("u")), GATE_UP, tp_dim=0)
    shards = [hf_to_local(rule, _reader([gate, up]), (8, 3), r, 2, GEO) for r in range(2)]
    assert torch.equal(shards[0], torch.cat([gate[:4], up[:4]]))
    assert torch.equal(shards[1], torch.cat([gate[4:], up[4:]]))
    assert all(torch.equal(a, b) for a, b in zip(local_shards_to_hf(rule, shards, GEO), [gate, up]))
    # the halves alone (megatron saves them as separate tensors): read without building the shard
    for rows in [(0, 4), (4, 8), (2, 6)]:
        part = hf_to_local(rule, _reader([gate, up]), (8, 3), 1, 2, GEO, rows=rows)
        assert torch.equal(part, shards[1][rows[0]:rows[1]])


def test_vocab_is_padded_with_zero_rows_and_unpadded_back():
    emb = torch.randn(1000, 4)
    rule = Rule("embedding.word_embeddings.weight", (src("e"),), VOCAB, tp_dim=0)
    shards = [hf_to_local(rule, _reader([emb]), (512, 4), r, 2, GEO) for r in range(2)]
    full = torch.cat(shards)
    assert torch.equal(full[:1000], emb) and not full[1000:].any()
    assert torch.equal(local_shards_to_hf(rule, shards, GEO)[0], emb)


def test_transformer_engine_names_alias_the_local_spec_names():
    """TE cannot run here: the TE spec's names must resolve to the same rules as the local spec's."""
    from megatron_swift.converters.registry import MAPPINGS

    layer = "decoder.layers.3."
    pairs = {  # TE name -> local spec name
        "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
        "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
        "mlp.experts.linear_fc1.weight5": "mlp.experts.local_experts.5.linear_fc1.weight",
        "mlp.experts.linear_fc2.weight0": "mlp.experts.local_experts.0.linear_fc2.weight",
    }
    for te, local in pairs.items():
        assert split_name(layer + te) == split_name(layer + local)
    assert split_name(layer + "mlp.experts.linear_fc1.weight5") == (
        "decoder.layers.{layer}.mlp.experts.local_experts.{expert}.linear_fc1.weight", 3, 5)
    for family, mapping in MAPPINGS.items():
        te_norm = split_name(layer + "self_attention.linear_qkv.layer_norm_weight")[0]
        assert mapping.rule_for(te_norm).hf[0].key.endswith("input_layernorm.weight")
        if family != "mixtral":  # mixtral has no dense layers
            assert mapping.rule_for(split_name("decoder.layers.0.mlp.linear_fc1.layer_norm_weight")[0])
        if "moe" in family or family == "mixtral":
            rule = mapping.rule_for(split_name("decoder.layers.0.mlp.experts.linear_fc1.weight1")[0])
            assert rule.transform == GATE_UP and rule.is_expert


# --------------------------------------------------------------------------- safetensors I/O

def test_shard_writer_output_is_read_by_safetensors(tmp_path):
    torch.manual_seed(0)
    tensors = {f"t{i}": torch.randn(10 + i, 7) for i in range(6)}
    tensors["scalarish"] = torch.randn(3)
    plan = ShardPlan([(k, v.shape) for k, v in tensors.items()], torch.bfloat16, parse_size("1KB"))
    assert plan.sharded
    plan.create_files(str(tmp_path))
    writer = ShardWriter(plan, str(tmp_path), threads=3)
    for k in reversed(list(tensors)):  # any order
        writer.submit(k, tensors[k])
    writer.close()
    got = hf_tensors(tmp_path)
    assert sorted(got) == sorted(tensors)
    for k, v in tensors.items():
        assert torch.equal(got[k], v.bfloat16())
    sizes = {}
    for t in plan.tensors.values():
        sizes[t.file] = sizes.get(t.file, 0) + t.nbytes
    assert all(size <= 1000 for size in sizes.values())  # no tensor alone exceeds 1 KB here
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30


def test_reader_reads_only_requested_rows(tmp_path, models):
    path = models("qwen3")
    reader = HFCheckpoint(path)
    full = hf_tensors(path)["model.layers.1.self_attn.q_proj.weight"]
    part = reader.read(src("model.layers.{layer}.self_attn.q_proj.weight"), 1, None, full.shape,
                       (slice(32, 96), slice(None)))
    cols = reader.read(src("model.layers.{layer}.self_attn.q_proj.weight"), 1, None, full.shape,
                       (slice(None), slice(16, 48)))
    assert torch.equal(part, full[32:96]) and torch.equal(cols, full[:, 16:48])
    reader.close()


# ------------------------------------------------------------------- round trips, one process

@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_bit_exact_and_logits_match_transformers(family, models, tmp_path, megatron_world1):
    from megatron_swift.converters.api import convert_hf_to_mcore, convert_mcore_to_hf

    hf = models(family)
    mcore, back = tmp_path / "mcore", tmp_path / "hf"
    result = convert_hf_to_mcore(hf, str(mcore), test_convert_precision=True)
    assert_precise(result, mcore)
    assert (mcore / "latest_checkpointed_iteration.txt").read_text() == "release"
    assert (mcore / "release" / "metadata.json").is_file()
    info = json.loads((mcore / "args.json").read_text())
    assert info["model"] == hf and info["model_type"] == family and info["template"] is None
    assert info["hf_config"]["vocab_size"] == 1000
    result = convert_mcore_to_hf(str(mcore), str(back), max_shard_size="100KB", test_convert_precision=True)
    assert_precise(result, back)
    assert_bit_exact(hf, back)
    index = json.loads((back / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in back.glob("*.safetensors")}
    for name in ("generation_config.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (back / name).read_bytes() == (Path(hf) / name).read_bytes(), name
    config = json.loads((back / "config.json").read_text())
    assert config["model_type"] == family and config["dtype"] == "float32"
    assert not list(back.parent.glob(".hf.tmp-*")), "temporary directory left behind"


def test_tied_embeddings_round_trip(models, tmp_path, megatron_world1):
    from megatron_swift.converters.api import convert_hf_to_mcore, convert_mcore_to_hf

    hf = models("llama_tied", "llama", tie_word_embeddings=True)
    assert "lm_head.weight" not in hf_tensors(hf)
    assert_precise(convert_hf_to_mcore(hf, str(tmp_path / "m"), test_convert_precision=True))
    convert_mcore_to_hf(str(tmp_path / "m"), str(tmp_path / "h"))
    assert_bit_exact(hf, tmp_path / "h")


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_fused_expert_layout_is_read_and_published_layout_written(family, models, tmp_path, megatron_world1):
    """transformers 5 keeps experts fused in memory (``experts.gate_up_proj`` [E, 2F, H]); a
    checkpoint in that layout converts, and to_hf writes the published per-expert layout."""
    from megatron_swift.converters.api import convert_hf_to_mcore, convert_mcore_to_hf

    hf = models(family)
    rename = {"block_sparse_moe.gate.": "mlp.gate."} if family == "mixtral" else None
    fused = fuse_experts(hf, tmp_path / "fused", rename)
    assert any(k.endswith("experts.gate_up_proj") for k in hf_tensors(fused))
    convert_hf_to_mcore(fused, str(tmp_path / "m"))
    convert_mcore_to_hf(str(tmp_path / "m"), str(tmp_path / "h"))
    assert_bit_exact(hf, tmp_path / "h")


def test_bf16_output_and_exist_ok(models, tmp_path, megatron_world1):
    from megatron_swift.converters.api import convert_hf_to_mcore, convert_mcore_to_hf

    hf = models("qwen2")
    mcore = tmp_path / "m"
    convert_hf_to_mcore(hf, str(mcore), torch_dtype="bfloat16")
    assert json.loads((mcore / "args.json").read_text())["torch_dtype"] == "bfloat16"
    out = tmp_path / "h"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(ValueError, match=f"output directory {out} already exists"):
        convert_mcore_to_hf(str(mcore), str(out))
    convert_mcore_to_hf(str(mcore), str(out), exist_ok=True)
    assert not (out / "stale.txt").exists()
    assert_bit_exact(hf, out, dtype=torch.bfloat16)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


# --------------------------------------------------------------------------------- errors

def _corrupt_copy(src_dir: str, dst: Path) -> Path:
    shutil.copytree(src_dir, dst)
    return dst


def test_missing_shard_is_named(models, tmp_path):
    bad = _corrupt_copy(models("qwen3"), tmp_path / "bad")
    victim = sorted(bad.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        HFCheckpoint(str(bad))


def test_missing_and_unused_tensors_and_shape_mismatch_are_named(models, tmp_path, megatron_world1):
    from megatron_swift.converters.api import convert_hf_to_mcore

    hf = models("qwen2")
    tensors = hf_tensors(hf)
    config = Path(hf) / "config.json"

    def variant(name, change):
        d = tmp_path / name
        d.mkdir()
        t = dict(tensors)
        change(t)
        save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
        shutil.copy(config, d / "config.json")
        return str(d)

    key = "model.layers.1.mlp.up_proj.weight"
    missing = variant("missing", lambda t: t.pop(key))
    with pytest.raises(ValueError, match=f"tensor {key} is missing"):
        convert_hf_to_mcore(missing, str(tmp_path / "o1"))
    shape = variant("shape", lambda t: t.__setitem__(key, torch.zeros(100, 64)))
    with pytest.raises(ValueError, match=rf"shape mismatch for {key} .*\[100, 64\].*\[128, 64\]"):
        convert_hf_to_mcore(shape, str(tmp_path / "o2"))
    extra = variant("extra", lambda t: t.__setitem__("model.layers.0.mlp.extra_proj.weight", torch.zeros(2)))
    with pytest.raises(ValueError, match="model.layers.0.mlp.extra_proj.weight"):
        convert_hf_to_mcore(extra, str(tmp_path / "o3"))
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_unsupported_architecture_and_bad_tp_are_explained(models, tmp_path, megatron_world1):
    from transformers import GPT2Config

    from megatron_swift.converters.api import convert_hf_to_mcore

    gpt2 = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(str(gpt2))
    save_file({"x": torch.zeros(1)}, str(gpt2 / "model.safetensors"))
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported; supported model types: .*deepseek_v3, .*llama"):
        convert_hf_to_mcore(str(gpt2), str(tmp_path / "o"))
    mqa = models("llama_mqa", "llama", num_key_value_heads=1)  # fewer KV heads than TP
    with pytest.raises(ValueError, match=r"tensor_model_parallel_size=2 does not divide num_key_value_heads \(1\)"):
        convert_hf_to_mcore(mqa, str(tmp_path / "o"), overrides={"tensor_model_parallel_size": 2})


# ------------------------------------------------------------------ 2-rank layouts (one job)

@pytest.fixture(scope="module")
def parallel_job(models, tmp_path_factory):
    """One torchrun job (2 gloo ranks) running every multi-rank step; returns (dirs, results)."""
    root = tmp_path_factory.mktemp("parallel")
    d = {name: str(root / name) for name in (
        "q3_tp2", "q3_pp2", "q3_api", "q2_api", "llt_vpp", "llt_tp2", "qm_ep2", "qm_tp2", "mix_ep2", "mix_pp2",
        "q3m_fused_tp2", "q3m_tp2_hf")}
    hf = {"qwen3": models("qwen3"), "qwen2": models("qwen2"), "qwen2_moe": models("qwen2_moe"),
          "mixtral": models("mixtral"), "qwen3_moe": models("qwen3_moe"),
          "llama4": models("llama_tied4", "llama", tie_word_embeddings=True, num_hidden_layers=4),
          "mqa": models("llama_mqa", "llama", num_key_value_heads=1)}
    fused = fuse_experts(hf["qwen3_moe"], root / "q3m_fused")
    plan = [
        {"op": "to_mcore", "hf": hf["qwen3"], "out": d["q3_tp2"], "layout": {"tp": 2}, "precision": True},
        {"op": "to_hf", "mcore": d["q3_tp2"], "out": d["q3_pp2"], "layout": {"pp": 2}, "precision": True,
         "max_shard_size": "100KB"},
        {"op": "api", "hf": hf["qwen3"], "out": d["q3_api"], "layout": {"tp": 2}},
        {"op": "api", "hf": hf["qwen2"], "out": d["q2_api"], "layout": {"pp": 2}},
        {"op": "to_mcore", "hf": hf["llama4"], "out": d["llt_vpp"], "layout": {"pp": 2, "vpp": 2},
         "precision": True, "threads": 2},
        {"op": "to_hf", "mcore": d["llt_vpp"], "out": d["llt_tp2"], "layout": {"tp": 2}, "threads": 2},
        {"op": "to_mcore", "hf": hf["qwen2_moe"], "out": d["qm_ep2"], "layout": {"ep": 2}, "precision": True},
        {"op": "to_hf", "mcore": d["qm_ep2"], "out": d["qm_tp2"], "layout": {"tp": 2}, "precision": True},
        {"op": "to_mcore", "hf": hf["mixtral"], "out": d["mix_ep2"], "layout": {"ep": 2}, "dtype": "bfloat16"},
        {"op": "to_hf", "mcore": d["mix_ep2"], "out": d["mix_pp2"], "layout": {"pp": 2}},
        {"op": "to_mcore", "hf": fused, "out": d["q3m_fused_tp2"], "layout": {"tp": 2}, "precision": True},
        {"op": "to_hf", "mcore": d["q3m_fused_tp2"], "out": d["q3m_tp2_hf"], "layout": {"ep": 2}},
        # GQA with fewer KV heads than TP ranks: megatron cannot split one KV head
        {"op": "to_mcore", "hf": hf["mqa"], "out": str(root / "never"), "layout": {"tp": 2}, "expect_error": True},
    ]
    (root / "plan.json").write_text(json.dumps(plan))
    torchrun(WORKER, 2, [root / "plan.json", root / "result.json"], timeout=400)
    results = json.loads((root / "result.json").read_text())
    return d, hf, results


@pytest.mark.slow  # a real 2-process gloo job
def test_dense_layouts_tp_pp_vpp(parallel_job):
    d, hf, results = parallel_job
    assert_precise(results[0]["precision"], d["q3_tp2"])  # HF -> mcore at TP=2
    assert_precise(results[1]["precision"], d["q3_pp2"])  # TP=2 checkpoint -> HF at PP=2
    assert_bit_exact(hf["qwen3"], d["q3_pp2"])
    assert_precise(results[4]["precision"], d["llt_vpp"])  # tied embeddings, PP=2 x VPP=2
    assert len(glob.glob(os.path.join(d["llt_vpp"], "release", "*.distcp"))) == 4  # 2 ranks x 2 threads
    assert_bit_exact(hf["llama4"], d["llt_tp2"])


@pytest.mark.slow  # a real 2-process gloo job
def test_trainer_api_load_and_save_sharded(parallel_job):
    d, hf, results = parallel_job
    assert_bit_exact(hf["qwen3"], d["q3_api"])  # TP=2
    assert_bit_exact(hf["qwen2"], d["q2_api"])  # PP=2 (qkv bias)


@pytest.mark.slow  # a real 2-process gloo job
def test_moe_layouts_ep_and_fused_experts(parallel_job):
    d, hf, results = parallel_job
    assert_precise(results[6]["precision"], d["qm_ep2"])
    assert_precise(results[7]["precision"], d["qm_tp2"])
    assert_bit_exact(hf["qwen2_moe"], d["qm_tp2"])
    assert_bit_exact(hf["mixtral"], d["mix_pp2"], dtype=torch.bfloat16)
    assert_precise(results[10]["precision"], d["q3m_fused_tp2"])  # fused 3-D experts, split by TP
    assert_bit_exact(hf["qwen3_moe"], d["q3m_tp2_hf"])
    assert "tensor_model_parallel_size=2 does not divide num_key_value_heads (1)" in results[12]["error"]
    assert not os.path.exists(os.path.join(os.path.dirname(d["q3_tp2"]), "never"))


# ---------------------------------------------------------------------------------------- CLI

@pytest.mark.slow  # a real 2-process gloo job
def test_cli_export_both_directions_under_torchrun(models, tmp_path):
    hf = models("qwen2_moe")
    mcore, back = tmp_path / "mcore", tmp_path / "hf"
    out = megatron(*["export", "--model", hf, "--to_mcore", "true", "--output_dir", str(mcore),
                "--expert_model_parallel_size", "2", "--test_convert_precision", "true"], nproc=2)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "mean_diff (with loss)" in out.stdout and "token_diff: 0" in out.stdout
    assert_precise(json.loads((mcore / "convert_precision.json").read_text()))
    out = megatron(*["export", "--mcore_model", str(mcore), "--to_hf", "true", "--output_dir", str(back),
                "--pipeline_model_parallel_size", "2", "--max_shard_size", "50KB"], nproc=2)
    assert out.returncode == 0, out.stderr[-3000:]
    assert_bit_exact(hf, back)
    assert (back / "tokenizer_config.json").is_file()
    # an existing output directory needs --exist_ok (checked before any work)
    out = megatron(*["export", "--mcore_model", str(mcore), "--to_hf", "true", "--output_dir", str(back)])
    assert out.returncode == 2 and out.stderr.startswith("megatron export: error: argument --output_dir:")
    assert "already exists" in out.stderr


def test_cli_errors_name_the_problem(models, tmp_path):
    bad = _corrupt_copy(models("qwen3"), tmp_path / "bad")
    victim = sorted(bad.glob("model-*.safetensors"))[0]
    victim.unlink()
    out = megatron(*["export", "--model", str(bad), "--to_mcore", "true", "--output_dir", str(tmp_path / "o")])
    assert out.returncode == 2
    assert out.stderr.startswith("megatron export: error: ") and victim.name in out.stderr, out.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((bad / "config.json").read_text())
    out = megatron(*["export", "--model", str(empty), "--to_mcore", "true", "--output_dir", str(tmp_path / "o")])
    assert out.returncode == 2 and "no safetensors weights in" in out.stderr, out.stderr
