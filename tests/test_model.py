"""HF config -> Megatron-Core model: each family builds, runs forward/backward on CPU (world size 1),
and its settings follow the HF config. Oracles: transformers' own modules (RMSNorm, rope init)."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import family_params

from megatron_swift.model import build_model, padded_vocab_size, transformer_config_from_hf
from megatron_swift.model.families import UnsupportedModelError
from megatron_swift.model.tiny import TINY_OVERRIDES, TINY_VOCAB, tiny_hf_config

FAMILIES = family_params(sorted(TINY_OVERRIDES))


@pytest.mark.parametrize("family", FAMILIES)
def test_family_forward_backward_world_size_1(megatron_world1, family):
    torch.manual_seed(0)
    chunks, config, settings = build_model(tiny_hf_config(family))
    (model,) = chunks
    ids = torch.randint(0, TINY_VOCAB, (2, 16))
    pos = torch.arange(16).unsqueeze(0).expand(2, -1)
    losses = model(ids, pos, attention_mask=None, labels=ids)
    assert losses.shape == (2, 16)
    # a random-init model predicts ~uniformly over the real vocab (padded entries are out of the softmax)
    assert abs(losses.mean().item() - math.log(settings.vocab_size)) < 0.2
    losses.mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if "router" not in name:  # unused experts may legitimately get no gradient
            assert p.grad.abs().sum() > 0, f"{name} got a zero gradient"
    logits = model(ids, pos, attention_mask=None)
    assert logits.shape == (2, 16, settings.padded_vocab_size)
    assert settings.padded_vocab_size > settings.vocab_size
    assert (logits[..., settings.vocab_size:] == torch.finfo(logits.dtype).min).all()
    expected = torch.nn.functional.cross_entropy(logits[..., :settings.vocab_size].flatten(0, 1), ids.flatten(),
                                                 reduction="none").view(2, 16)
    torch.testing.assert_close(model(ids, pos, attention_mask=None, labels=ids), expected, rtol=1e-5, atol=1e-5)


def test_family_settings_follow_hf_config():
    cfg, st = transformer_config_from_hf(tiny_hf_config("qwen2"))
    assert cfg.add_qkv_bias and not cfg.qk_layernorm and cfg.num_query_groups == 2
    cfg, st = transformer_config_from_hf(tiny_hf_config("qwen3"))
    assert cfg.qk_layernorm and not cfg.add_qkv_bias and cfg.kv_channels == 32
    cfg, st = transformer_config_from_hf(tiny_hf_config("llama", attention_bias=True, tie_word_embeddings=True))
    assert cfg.add_qkv_bias and st.share_embeddings_and_output_weights
    cfg, _ = transformer_config_from_hf(tiny_hf_config("qwen2_moe"))
    assert cfg.num_moe_experts == 4 and cfg.moe_shared_expert_gate and cfg.moe_shared_expert_intermediate_size == 64
    assert cfg.moe_router_pre_softmax  # norm_topk_prob=False: softmax over all experts, no renormalisation
    cfg, _ = transformer_config_from_hf(tiny_hf_config("qwen3_moe"))
    assert not cfg.moe_router_pre_softmax and cfg.moe_ffn_hidden_size == 32 and cfg.moe_router_topk == 2
    cfg, _ = transformer_config_from_hf(tiny_hf_config("qwen2_moe", num_hidden_layers=4, mlp_only_layers=[1]))
    assert cfg.moe_layer_freq == [1, 0, 1, 1]
    cfg, _ = transformer_config_from_hf(tiny_hf_config("llama"), {"rotary_base": 5.0, "hidden_dropout": 0.1})
    assert cfg.hidden_dropout == 0.1


def test_rope_theta_and_llama3_scaling_match_transformers(megatron_world1):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hf = tiny_hf_config("llama", rope_theta=500000.0, max_position_embeddings=16384, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192})
    (model,), _, settings = build_model(hf)
    assert settings.rotary_base == 500000.0
    expected = LlamaRotaryEmbedding(hf).inv_freq
    torch.testing.assert_close(model.rotary_pos_emb.inv_freq, expected, rtol=1e-6, atol=0)
    (plain,), _, _ = build_model(tiny_hf_config("llama", rope_theta=500000.0))
    torch.testing.assert_close(plain.rotary_pos_emb.inv_freq, LlamaRotaryEmbedding(tiny_hf_config(
        "llama", rope_theta=500000.0)).inv_freq, rtol=1e-6, atol=0)


def test_vocab_padding_for_tensor_parallel():
    assert padded_vocab_size(1000, 1) == 1024
    assert padded_vocab_size(1000, 2) == 1024
    assert padded_vocab_size(1000, 4) == 1024
    assert padded_vocab_size(1025, 2) == 1280
    assert padded_vocab_size(151936, 8) == 152576


def test_unsupported_architecture_lists_supported():
    from transformers import GPT2Config

    with pytest.raises(UnsupportedModelError, match="gpt2.*supported model types: .*deepseek_v3, .*llama, mistral, mixtral, qwen2"):
        transformer_config_from_hf(GPT2Config())


def test_tensor_parallel_must_divide_heads():
    with pytest.raises(ValueError, match=r"tensor_model_parallel_size=4 does not divide num_key_value_heads \(2\).*values: 1, 2"):
        transformer_config_from_hf(tiny_hf_config("qwen3"), {"tensor_model_parallel_size": 4})
    with pytest.raises(ValueError, match=r"expert_model_parallel_size=3 does not divide the number of experts \(4\)"):
        transformer_config_from_hf(tiny_hf_config("qwen3_moe"), {"expert_model_parallel_size": 3})


def test_unknown_override_is_rejected():
    with pytest.raises(ValueError, match="unknown Megatron model setting.*not_a_field"):
        transformer_config_from_hf(tiny_hf_config("llama"), {"not_a_field": 1})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_transformers(dtype):
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    from megatron_swift.kernels.norm import RMSNorm

    cfg, _ = transformer_config_from_hf(tiny_hf_config("qwen2"), {"sequence_parallel": False})
    ours = RMSNorm(cfg, 64, eps=1e-6)
    ref = Qwen2RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        w = torch.randn(64)
        ours.weight.copy_(w)
        ref.weight.copy_(w)
    x = torch.randn(3, 5, 64, dtype=dtype)
    torch.testing.assert_close(ours.to(dtype)(x), ref.to(dtype)(x), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("trainable", ["both", "input_only", "weight_only"])
def test_rms_norm_gradients_match_transformers(dtype, trainable):
    """The norm's written-out backward against autograd through transformers' module (a hidden-size
    norm and a per-head q/k norm shape), including frozen weights and inputs that need no grad."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    from megatron_swift.kernels.norm import RMSNorm

    cfg, _ = transformer_config_from_hf(tiny_hf_config("qwen2"), {"sequence_parallel": False})
    torch.manual_seed(0)
    for shape in ((7, 2, 64), (9, 4, 64)):
        ours, ref = RMSNorm(cfg, 64, eps=1e-6).to(dtype), Qwen2RMSNorm(64, eps=1e-6).to(dtype)
        with torch.no_grad():
            w = torch.rand(64) + 0.5
            ours.weight.copy_(w)
            ref.weight.copy_(w)
        for module in (ours, ref):
            module.weight.requires_grad_(trainable != "input_only")
        x = (torch.randn(*shape) * 3).to(dtype)
        grad = torch.randn(*shape).to(dtype)
        results = []
        for module in (ours, ref):
            xi = x.clone().requires_grad_(trainable != "weight_only")
            module.weight.grad = None
            out = module(xi)
            out.backward(grad)
            results.append((out.detach(), xi.grad, module.weight.grad))
        (out, gx, gw), (ref_out, ref_gx, ref_gw) = results
        torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
        for got, want in ((gx, ref_gx), (gw, ref_gw)):
            assert (got is None) == (want is None)
            if want is not None:
                # fp32: rounding of a different but equal formula; bf16: at most an ulp of the result
                tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
                torch.testing.assert_close(got, want, **tol)


def test_rms_norm_marks_weight_for_sequence_parallel_grad_reduce():
    from megatron_swift.kernels.norm import RMSNorm

    cfg, _ = transformer_config_from_hf(tiny_hf_config("qwen2"), {"tensor_model_parallel_size": 2,
                                                                 "sequence_parallel": True})
    assert RMSNorm(cfg, 64).weight.sequence_parallel is True


def test_freezing_by_global_names_prefix_regex_ratio_and_trainable(megatron_world1):
    from megatron_swift.trainer.model_setup import apply_freezing, global_parameter_names

    def frozen_names(**kwargs):
        chunks, config, _ = build_model(tiny_hf_config("qwen3", num_hidden_layers=4))
        apply_freezing(chunks, config.num_layers, **kwargs)
        return {n for n, p in global_parameter_names(chunks[0]) if not p.requires_grad}

    assert frozen_names(freeze_parameters=["embedding."]) == {"embedding.word_embeddings.weight"}
    ratio = frozen_names(freeze_parameters_ratio=0.5)
    assert "embedding.word_embeddings.weight" in ratio
    assert any(n.startswith("decoder.layers.1.") for n in ratio)
    assert not any(n.startswith(("decoder.layers.2.", "decoder.layers.3.", "output_layer")) for n in ratio)
    kept = frozen_names(freeze_parameters_regex=r"\.mlp\.", trainable_parameters=["decoder.layers.3."])
    assert kept and all(".mlp." in n and not n.startswith("decoder.layers.3.") for n in kept)


@pytest.mark.gpu
def test_transformer_engine_spec_matches_local_spec_on_gpu():
    """GPU counterpart of test_family_forward_backward_world_size_1: with CUDA and Transformer
    Engine the platform picks the TE layer spec, and the model runs forward and backward."""
    import subprocess
    import sys

    from helpers import REPO

    code = r"""
import torch
from megatron_swift.platform import init_parallel, get_platform
from megatron_swift.model import build_model
from megatron_swift.model.builder import decoder_block_spec
from megatron_swift.model.tiny import tiny_hf_config
platform = init_parallel()
assert platform.is_cuda and platform.has_transformer_engine, "needs CUDA + Transformer Engine"
torch.manual_seed(0)
(te_model,), cfg, st = build_model(tiny_hf_config("qwen3"))
assert "TE" in type(te_model.decoder.layers[0].self_attention.linear_qkv).__name__
ids = torch.randint(0, 1000, (1, 32), device="cuda"); pos = torch.arange(32, device="cuda")[None]
loss = te_model(ids, pos, attention_mask=None, labels=ids).mean()
loss.backward()
print("ok", float(loss))
"""
    import os

    env = {k: v for k, v in os.environ.items() if k != "MEGATRON_SWIFT_DEVICE"}  # conftest's CPU default
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


@pytest.mark.parametrize("family", ["qwen3", "qwen2_moe"])
def test_meta_builds_allocate_and_initialise_nothing(family, megatron_world1):
    """The converters plan with meta builds: every parameter and buffer must be on the meta device,
    also those megatron creates with an explicit device (its local layers, Transformer Engine's) or
    with none (qwen2_moe's shared-expert gate)."""
    from megatron_swift.model import build_model

    chunks, config, _ = build_model(tiny_hf_config(family), {"use_cpu_initialization": False}, meta=True)
    assert config.perform_initialization is False
    tensors = [(n, t) for c in chunks for n, t in list(c.named_parameters()) + list(c.named_buffers())]
    assert tensors and [n for n, t in tensors if not t.is_meta] == []
