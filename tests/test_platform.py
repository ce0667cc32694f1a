"""The CPU compatibility layer against the pinned megatron-core (re-run these on a version bump).

Each test names the megatron-core CUDA assumption it bridges (shared/notes/megatron-core-on-cpu.md).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import REPO

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU compatibility layer")


def test_platform_is_cpu_gloo_and_layer_installed(megatron_world1):
    from megatron_swift.platform import cpu_compat, get_platform

    platform = get_platform()
    assert (platform.device_type, platform.backend) == ("cpu", "gloo")
    assert cpu_compat.is_installed()
    assert torch.distributed.get_backend() == "gloo"


def test_cuda_device_arguments_land_on_cpu(megatron_world1):
    # megatron-core: device=torch.cuda.current_device(), literal "cuda", .cuda(), .to("cuda")
    assert torch.empty(3, device=torch.cuda.current_device()).device.type == "cpu"
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.ones(2, device=torch.device("cuda", 0)).device.type == "cpu"
    t = torch.arange(4)
    assert t.cuda().device.type == "cpu"
    assert t.to("cuda").device.type == "cpu"
    assert t.to("cuda", torch.float32).dtype == torch.float32
    assert torch.empty(2, pin_memory=True).device.type == "cpu"
    assert torch.zeros(2).new_zeros(3, device="cuda").device.type == "cpu"
    # torch.device as a context (transformers builds models under "meta") still fills in factories
    with torch.device("meta"):
        assert torch.empty(2).device.type == "meta" and torch.zeros(1, device="meta").is_meta
    # megatron's optimizer/clip_grads assert tensor.type() == 'torch.cuda.FloatTensor'; only they
    # are answered with CUDA names
    asks = {"__name__": "megatron.core.optimizer.clip_grads", "torch": torch}
    assert eval("torch.zeros(1).type()", asks) == "torch.cuda.FloatTensor"
    assert eval("torch.zeros(1, dtype=torch.bfloat16).type()", asks) == "torch.cuda.BFloat16Tensor"
    assert torch.zeros(1).type() == "torch.FloatTensor"  # everyone else sees the truth
    assert torch.zeros(1).type(torch.float64).dtype == torch.float64
    # consistent with each other: no CUDA, no CUDA devices (megatron's and transformers' own no-CUDA
    # fallbacks stay active)
    assert not torch.cuda.is_available() and torch.cuda.device_count() == 0


def test_megatron_optimizer_dtype_checks_pass(megatron_world1):
    """The check the CUDA type names exist for: megatron's optimizer sorts params by Tensor.type()."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_swift.model import build_model
    from megatron_swift.model.tiny import tiny_hf_config
    from megatron_swift.trainer.model_setup import OptimizerSettings, wrap_ddp

    (model,), config, _ = build_model(tiny_hf_config("qwen3"))
    chunks = wrap_ddp([model], config, OptimizerSettings(use_distributed_optimizer=False))
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3), chunks)
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == \
        sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("distributed", [True, False])
def test_torch_adam_runs_fused_and_updates_as_adamw(megatron_world1, distributed):
    """Without TE/apex megatron builds torch's AdamW, which on CPU tensors defaults to its per-tensor
    loop; ours runs torch's fused kernel. Oracle: torch's per-tensor AdamW on copies of the weights
    with the same gradients, two steps."""
    from megatron_swift.model import build_model
    from megatron_swift.model.tiny import tiny_hf_config
    from megatron_swift.trainer.model_setup import OptimizerSettings, build_optimizer, model_parameters, wrap_ddp

    (model,), config, _ = build_model(tiny_hf_config("qwen3"))
    settings = OptimizerSettings(lr=1e-2, weight_decay=0.0, clip_grad=0.0, use_distributed_optimizer=distributed)
    chunks = wrap_ddp([model], config, settings)
    optimizer = build_optimizer(chunks, config, settings)
    groups = [g for part in getattr(optimizer, "chained_optimizers", [optimizer]) for g in part.optimizer.param_groups]
    assert groups and all(g["fused"] for g in groups)

    params = [p for _, p in model_parameters(chunks)]
    copies = [p.detach().clone().requires_grad_(True) for p in params]
    oracle = torch.optim.AdamW(copies, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, foreach=False)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        for p, c in zip(params, copies):
            grad = torch.randn(p.shape, generator=g)
            p.main_grad.copy_(grad)
            c.grad = grad.clone()
        assert optimizer.step()[0]
        oracle.step()
    for p, c in zip(params, copies):
        torch.testing.assert_close(p.detach(), c.detach(), rtol=1e-6, atol=1e-7)


_LAYER_SCOPE = r"""
import json, torch
from transformers import AutoModelForCausalLM
from megatron_swift.model.tiny import tiny_hf_config
from megatron_swift.platform import destroy_parallel, init_parallel

original = (torch.cuda.current_device, torch.cuda.synchronize)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(tiny_hf_config("qwen3")).eval()
ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    plain = model(ids).logits
init_parallel()
with torch.no_grad():
    layered = model(ids).logits
    generated = model.generate(ids[:1, :8], max_new_tokens=4, do_sample=False)
installed = torch.ones(1, device="cuda").device.type
destroy_parallel()
try:
    torch.ones(1, device="cuda")
    after = "cpu tensor"
except AssertionError as exc:  # torch's CPU build: "Torch not compiled with CUDA enabled"
    after = type(exc).__name__
print(json.dumps({"same_logits": bool(torch.equal(plain, layered)), "generated": list(generated.shape),
                  "installed": installed, "after": after,
                  "restored": (torch.cuda.current_device, torch.cuda.synchronize) == original,
                  "modes": torch._C._len_torch_function_stack()}))
"""


def test_cpu_layer_is_scoped_and_transformers_runs_under_it():
    """The layer lives from init_parallel to destroy_parallel: transformers (and vLLM, colocated for
    rollouts) computes the same logits with it installed, and afterwards torch is torch again."""
    from helpers import worker_env

    out = subprocess.run([sys.executable, "-c", _LAYER_SCOPE], cwd=REPO, capture_output=True, text=True,
                         env=worker_env(), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = __import__("json").loads(out.stdout.strip().splitlines()[-1])
    assert result == {"same_logits": True, "generated": [1, 12], "installed": "cpu", "after": "AssertionError",
                      "restored": True, "modes": 0}, result


def test_cuda_allocation_inside_custom_backward(megatron_world1):
    """megatron's TP/SP autograd Functions allocate with device=cuda in backward()."""

    class AllocatesCudaInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            buffer = torch.empty(grad.shape, device="cuda")
            buffer.copy_(grad)
            return buffer * 2

    x = torch.ones(3, requires_grad=True)
    AllocatesCudaInBackward.apply(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.full((3,), 2.0))
    y = torch.ones(3, requires_grad=True)
    torch.autograd.backward([AllocatesCudaInBackward.apply(y).sum()], inputs=[y])
    torch.testing.assert_close(y.grad, torch.full((3,), 2.0))


def test_streams_events_and_memory_stats_are_inert(megatron_world1):
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        stream.wait_stream(torch.cuda.current_stream())
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    event.synchronize()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    assert torch.cuda.memory_allocated() == 0


def test_rng_tracker_forks_reproducible_streams(megatron_world1):
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    def draw():
        model_parallel_cuda_manual_seed(123)
        outside = torch.rand(4)
        with get_cuda_rng_tracker().fork():
            inside = torch.rand(4)
        after = torch.rand(4)
        return outside, inside, after

    first, second = draw(), draw()
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b)
    # the model-parallel region draws from its own stream, and leaves the default one untouched
    assert not torch.equal(first[0], first[1])
    model_parallel_cuda_manual_seed(123)
    torch.rand(4)
    torch.testing.assert_close(torch.rand(4), first[2])


def test_te_general_gemm_is_defined_without_te(megatron_world1):
    from megatron.core.transformer.moe import moe_utils

    assert moe_utils.te_general_gemm is None


def test_cpu_model_settings_are_adjusted_before_config_validation():
    from megatron_swift.platform import get_platform

    fields = dict(num_moe_experts=4, moe_token_dispatcher_type="alltoall", apply_rope_fusion=True,
                  batch_p2p_comm=True)
    changes = get_platform().adjust_model_fields(fields)
    assert fields["moe_token_dispatcher_type"] == "alltoall"  # runs on gloo (mcore_compat)
    assert fields["apply_rope_fusion"] is False and fields["batch_p2p_comm"] is False
    assert any("apply_rope_fusion" in c for c in changes)


def test_alltoall_dispatcher_split_sizes_reach_gloo_as_numpy(megatron_world1):
    """megatron-core 0.16 converts the alltoall dispatcher's split sizes to numpy only for CUDA
    tensors; gloo's all_to_all_single rejects tensors (reproduced here). mcore_compat's workaround
    gives the dispatcher numpy arrays on CPU, as NCCL gets them."""
    import numpy as np
    import torch.distributed as dist
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    from megatron_swift.platform.mcore_compat import WORKAROUNDS, megatron_core_version

    sizes = torch.tensor([3])
    upstream = moe_utils.maybe_move_tensor_to_cpu(sizes, as_numpy=True)
    if megatron_core_version() < (0, 17, 0):
        assert torch.is_tensor(upstream), "megatron-core converts CPU split sizes now: retire the workaround"
    with pytest.raises(TypeError):
        dist.all_to_all_single(torch.empty(3), torch.ones(3), output_split_sizes=upstream, input_split_sizes=upstream)
    fixed = token_dispatcher.maybe_move_tensor_to_cpu(sizes, as_numpy=True)
    assert isinstance(fixed, np.ndarray)
    out = torch.empty(3)
    dist.all_to_all_single(out, torch.ones(3), output_split_sizes=fixed, input_split_sizes=fixed)
    assert out.tolist() == [1.0, 1.0, 1.0]
    assert any(w.name == "alltoall_split_sizes_as_lists" and w.applies("cpu") for w in WORKAROUNDS)


def test_top_level_kernels_folder_does_not_shadow_hf_kernels():
    """transformers probes for HF's `kernels` package; our folder must not answer from the repo root."""
    code = (
        "import importlib.util, json\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "import megatron_swift.kernels.norm as n\n"
        "leaks = []\n"
        "for name in ('tests', 'scripts', 'megatron_swift', 'docs'):\n"
        "    try:\n"
        "        __import__('megatron_swift.' + name)\n"
        "        leaks.append(name)\n"
        "    except ImportError:\n"
        "        pass\n"
        "print(json.dumps([spec is None or spec.origin is None, n.__name__, leaks]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    no_regular_package, name, leaks = __import__("json").loads(out.stdout.strip().splitlines()[-1])
    assert leaks == [], f"top-level folders importable as megatron_swift.<folder>: {leaks}"
    assert no_regular_package, "a regular top-level `kernels` package is importable from the repo root"
    assert name == "megatron_swift.kernels.norm"
    assert importlib.util.find_spec("megatron_swift.kernels") is not None


def test_converters_and_kernels_are_imported_through_the_package():
    """`from converters...` works only where the repo root happens to be on sys.path (a pytest run
    from the root, as a namespace package: a second copy of every module) and fails in workers
    and wheels; the code imports them as megatron_swift.converters / megatron_swift.kernels."""
    import re

    pattern = re.compile(r"^\s*(from|import)\s+(converters|kernels)\b", re.M)
    offenders = []
    for folder in ("megatron_swift", "converters", "kernels", "tests", "scripts"):
        for path in (Path(REPO) / folder).rglob("*.py"):
            if pattern.search(path.read_text()):
                offenders.append(str(path.relative_to(REPO)))
    assert offenders == [], f"import megatron_swift.converters / megatron_swift.kernels instead in: {offenders}"


def test_tensor_parallel_marks_without_initialisation(megatron_world1):
    """megatron-core < 0.17 marks local linears' weights as tensor-parallel only inside its weight
    init: with perform_initialization=False the marks are missing (reproduced on megatron's own layer),
    and gradient clipping would count TP shards as duplicates. The builder adds them (mcore_compat)."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear
    from megatron.core.transformer import TransformerConfig

    from megatron_swift.model import build_model
    from megatron_swift.model.tiny import tiny_hf_config
    from megatron_swift.platform.mcore_compat import megatron_core_version, set_tensor_parallel_attributes

    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, perform_initialization=False)
    layer = ColumnParallelLinear(8, 8, config=config, init_method=config.init_method, bias=False)
    if megatron_core_version() < (0, 17, 0):
        assert not hasattr(layer.weight, "tensor_model_parallel"), "megatron marks them now: retire the workaround"
    set_tensor_parallel_attributes(layer)
    assert layer.weight.tensor_model_parallel and layer.weight.partition_dim == 0
    (model,), _, _ = build_model(tiny_hf_config("qwen3"), {"perform_initialization": False})
    linears = [m for m in model.modules() if isinstance(m, ColumnParallelLinear)]
    assert linears and all(getattr(m.weight, "tensor_model_parallel", False) for m in linears)


def test_gloo_all_gather_starts_no_thread_teams():
    """Gloo's all-gather copies its chunks out with torch ops in gloo's own thread, which then starts
    an OpenMP team; past more threads than CPUs libgomp stops spinning and every op of the step pays a
    wake-up (a 1-process step with the distributed optimizer was 1.5x slower). Megatron's all-gathers
    go through an all-reduce of a zero-padded buffer instead: bit-identical, no new threads."""
    import json
    import os

    from helpers import torchrun

    script = Path(__file__).parent / "parallel" / "gloo_gather_worker.py"
    proc = torchrun(script, 2, [])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["same"] and result["in_place_same"], result
    assert result["threads_started_by_ours"] == 0, result
    if os.cpu_count() and os.cpu_count() > 1:  # gloo's own gather starts one only where it parallelises
        assert result["threads_started_by_gloo"] > 0, result


def test_wgrad_kernel_matches_the_unfused_gradient():
    """kernels/wgrad.py has apex's fused_weight_gradient_mlp_cuda interface: main_grad += go^T @ x,
    accumulating over calls (micro batches), also for 16-bit inputs into an fp32 buffer."""
    from megatron_swift.kernels import wgrad

    torch.manual_seed(0)
    x, go = torch.randn(37, 16, dtype=torch.float64), torch.randn(37, 24, dtype=torch.float64)
    main = torch.zeros(24, 16, dtype=torch.float64)
    wgrad.wgrad_gemm_accum_fp32(x, go, main)
    wgrad.wgrad_gemm_accum_fp32(2 * x, go, main)
    torch.testing.assert_close(main, 3 * (go.t() @ x), rtol=1e-12, atol=1e-12)
    main32 = torch.ones(24, 16)
    wgrad.wgrad_gemm_accum_fp32(x.bfloat16(), go.bfloat16(), main32)
    torch.testing.assert_close(main32, 1 + (go.bfloat16().t() @ x.bfloat16()).float(), rtol=0, atol=0)
    main16 = torch.zeros(24, 16, dtype=torch.bfloat16)
    wgrad.wgrad_gemm_accum_fp16(x.bfloat16(), go.bfloat16(), main16)
    torch.testing.assert_close(main16, go.bfloat16().t() @ x.bfloat16(), rtol=0, atol=0)


def test_gradient_accumulation_fusion_under_ddp_equals_the_unfused_path(megatron_world1):
    """On CPU megatron's fused weight-gradient path runs on kernels/wgrad.py (mcore_compat): the
    linears of a DDP-wrapped model add into main_grad and return no .grad. Oracle: the same model
    with the fusion off (megatron computes the gradient, DDP's hook adds it), two micro batches."""
    from megatron.core.tensor_parallel import layers

    from megatron_swift.model.builder import build_model
    from megatron_swift.model.tiny import tiny_hf_config
    from megatron_swift.trainer.model_setup import OptimizerSettings, wrap_ddp

    assert layers._grad_accum_fusion_available and layers.fused_weight_gradient_mlp_cuda.__name__.endswith("wgrad")
    grads, weights_of_first = {}, None
    for fused in (False, True):
        chunks, config, _ = build_model(tiny_hf_config("qwen3"), {"gradient_accumulation_fusion": fused})
        assert config.gradient_accumulation_fusion is fused
        with torch.no_grad():  # both models start from the same weights
            weights_of_first = weights_of_first or {n: p.clone() for n, p in chunks[0].named_parameters()}
            for n, p in chunks[0].named_parameters():
                p.copy_(weights_of_first[n])
        linears = [m for m in chunks[0].modules() if hasattr(m, "gradient_accumulation_fusion")]
        assert linears and not any(m.gradient_accumulation_fusion for m in linears)  # no main_grad yet
        (ddp,) = wrap_ddp(chunks, config, OptimizerSettings(use_distributed_optimizer=False))
        assert all(m.gradient_accumulation_fusion is fused for m in linears)
        ddp.zero_grad_buffer()
        for seed in (1, 2):
            tokens = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(seed))
            ddp(tokens, torch.arange(9).expand(2, -1), attention_mask=None).float().square().mean().backward()
        weights = [m.weight for m in linears if m.weight is not None]
        assert all(w.grad is None for w in weights)
        assert all(w.grad_added_to_main_grad is fused for w in weights)  # the fused path ran
        grads[fused] = {n: p.main_grad.clone() for n, p in ddp.module.named_parameters()}
    for name, unfused in grads[False].items():
        torch.testing.assert_close(grads[True][name], unfused, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")


def test_one_rank_grad_reduce_scatter_in_place_is_skipped(megatron_world1):
    """The distributed optimizer's gradient reduce-scatter over one rank has the bucket as input and
    output: skipped (gloo would copy it through a staging buffer). Any other call reaches gloo."""
    import torch.distributed as dist
    from megatron.core.distributed import param_and_grad_buffer

    calls = []
    patched = param_and_grad_buffer.dist_reduce_scatter_func
    original = patched._megatron_swift_original
    buffer = torch.arange(6.0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(patched, "__defaults__", patched.__defaults__[:-1] + (lambda *a, **k: calls.append(a),))
        assert patched(buffer[:6], buffer, group=dist.group.WORLD) is None and calls == []
        patched(buffer[:3], buffer[:3].clone(), group=dist.group.WORLD)
        assert len(calls) == 1
    out = torch.zeros(6)
    patched(out, buffer, group=dist.group.WORLD)  # not in place: gloo's own
    assert out.tolist() == buffer.tolist() and original is not patched


def test_multi_tensor_norm_and_scale_use_foreach_with_the_same_bits(megatron_world1):
    """Without apex / TE megatron clips gradients with Python loops (a host read per parameter's
    norm; ``dst.copy_(src * scale)``); the foreach versions installed instead give the same bits."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer

    assert clip_grads.l2_norm_impl is not utils.local_multi_tensor_l2_norm
    assert clip_grads.multi_tensor_scale_impl is not utils.local_multi_tensor_scale
    assert optimizer.multi_tensor_scale_impl is not utils.local_multi_tensor_scale
    torch.manual_seed(0)
    shapes = [(7, 5), (300,), (64, 33), (1,)]
    for dtypes in ([torch.float32] * 4, [torch.float32, torch.bfloat16, torch.float32, torch.bfloat16]):
        grads = [torch.randn(shape).to(dtype) * 10 ** i for i, (shape, dtype) in enumerate(zip(shapes, dtypes))]
        flag = torch.zeros(1, dtype=torch.int)
        ours, _ = clip_grads.l2_norm_impl(2048 * 32, flag, [grads], False)
        upstream, _ = utils.local_multi_tensor_l2_norm(2048 * 32, flag, [grads], False)
        assert ours.shape == upstream.shape == (1,) and ours.dtype == upstream.dtype
        assert torch.equal(ours, upstream), (ours, upstream)
        coeff = 1.0 / (ours.item() + 1e-6)
        in_place, expected = [g.clone() for g in grads], [g.clone() for g in grads]
        clip_grads.multi_tensor_scale_impl(2048 * 32, flag, [in_place, in_place], coeff)
        utils.local_multi_tensor_scale(2048 * 32, flag, [expected, expected], coeff)
        assert all(torch.equal(a, b) for a, b in zip(in_place, expected))
        copies, expected = [torch.empty_like(g, dtype=torch.float32) for g in grads], [
            torch.empty_like(g, dtype=torch.float32) for g in grads]
        optimizer.multi_tensor_scale_impl(2048 * 32, flag, [grads, copies], 1.0)
        utils.local_multi_tensor_scale(2048 * 32, flag, [grads, expected], 1.0)
        assert all(torch.equal(a, b) for a, b in zip(copies, expected))
        assert all(torch.equal(a, g.float()) for a, g in zip(copies, grads))
