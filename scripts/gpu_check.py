"""One command that checks the GPU path: Transformer Engine spec, fused kernels, THD attention,
conversion through TE names, TE checkpoints (and CPU -> GPU resume), `megatron sft` end to end, and
throughput / MFU. Each step runs in its own subprocess with a time limit and appends one JSON line to
OUT/gpu_check.jsonl, so one failure does not hide the others; a table is printed at the end.

    python scripts/gpu_check.py --out OUT                 # on a GPU host (about 6-8 minutes on one H200)
    python scripts/gpu_check.py --out OUT --dry           # on a CPU: the same plumbing, tiny sizes

The dry mode (MEGATRON_SWIFT_DEVICE=cpu, local layer spec on both sides) exercises every step's code;
tests/test_gpu_check.py runs it. Results of a real run are kept in docs/gpu.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ("env", "specs", "te_vs_local", "thd", "export", "checkpoint", "sft", "throughput")
TIMEOUTS = {"env": 60, "specs": 120, "te_vs_local": 180, "thd": 120, "export": 240, "checkpoint": 240, "sft": 300,
            "throughput": 300}


def _python(*args, env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env or os.environ.copy(), capture_output=True,
                          text=True, timeout=timeout)


def _megatron(*args, nproc=1, env=None, timeout=600) -> subprocess.CompletedProcess:
    env = dict(env or os.environ)
    if nproc > 1:
        env["NPROC_PER_NODE"] = str(nproc)
    return _python("-m", "megatron_swift.cli.main", *map(str, args), env=env, timeout=timeout)


def _cpu_env() -> dict:
    return dict(os.environ, MEGATRON_SWIFT_DEVICE="cpu", CUDA_VISIBLE_DEVICES="")


def _demo(out: str) -> dict:
    from megatron_swift.demo import prepare

    path = os.path.join(out, "demo", "paths.json")
    if not os.path.isfile(path):
        paths = prepare(os.path.join(out, "demo"))
        with open(path, "w") as f:
            json.dump(paths, f)
    with open(path) as f:
        return json.load(f)


# --------------------------------------------------------------------------------------- steps

def step_env(out, dry):
    import importlib.util

    import torch

    import megatron.core
    import transformers

    from megatron_swift.platform import get_platform

    p = get_platform()
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "megatron_core": megatron.core.__version__,
            "transformers": transformers.__version__, "device": torch.cuda.get_device_name() if p.is_cuda else "cpu",
            "transformer_engine": p.has_transformer_engine, "apex_gradient_accumulation": p.has_apex_gradient_accumulation,
            "flash_attn": importlib.util.find_spec("flash_attn") is not None}
    if p.has_transformer_engine:
        import transformer_engine

        info["te_version"] = transformer_engine.__version__
    if p.is_cuda:
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def _build(family, impl=None, **hf_overrides):
    from megatron_swift.model import build_model
    from megatron_swift.model.tiny import tiny_hf_config

    overrides = {"perform_initialization": True}
    if impl:
        overrides["transformer_impl"] = impl
    return build_model(tiny_hf_config(family, **hf_overrides), overrides)


def _checkpoint_keys(model):
    """Global dist-checkpoint keys: what a checkpoint written by this spec contains."""
    return {v.key for v in model.sharded_state_dict().values()
            if hasattr(v, "key") and not v.key.endswith("_extra_state")}


def step_specs(out, dry):
    from megatron_swift.platform import init_parallel

    init_parallel()
    result = {}
    for family in ("qwen3", "qwen3_moe", "deepseek_v3"):
        (platform_model,), config, _ = _build(family)
        (local_model,), _, _ = _build(family, "local")
        keys, local = _checkpoint_keys(platform_model), _checkpoint_keys(local_model)
        result[family] = {"impl": config.transformer_impl,
                          "classes": sorted({type(m).__name__ for m in platform_model.modules()
                                             if type(m).__module__.startswith(("transformer_engine", "megatron"))})[:12],
                          "keys_only_in_platform_spec": sorted(keys - local)[:5],
                          "keys_only_in_local_spec": sorted(local - keys)[:5]}
        if keys != local:
            raise AssertionError(f"{family}: TE and local checkpoints differ in keys: {result[family]}")
    return result


def _hf_model(out, family):
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_swift.model.tiny import tiny_hf_config

    path = os.path.join(out, f"hf-{family}")
    if not os.path.isdir(path):
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(tiny_hf_config(family)).save_pretrained(path)
    return path


def step_te_vs_local(out, dry):
    import torch

    from megatron_swift.converters.api import load_hf_into_mcore
    from megatron_swift.model import build_model
    from megatron_swift.model.tiny import tiny_hf_config
    from megatron_swift.platform import get_platform, init_parallel

    init_parallel()
    device = get_platform().device
    result = {}
    for family in ("qwen3", "qwen3_moe"):
        hf = _hf_model(out, family)
        tokens = torch.randint(0, 1000, (2, 64), generator=torch.Generator().manual_seed(1)).to(device)
        positions = torch.arange(64, device=device).expand(2, -1)
        logits, grads = {}, {}
        for impl in ("platform", "local"):
            overrides = {} if impl == "platform" else {"transformer_impl": "local"}
            (model,), config, settings = build_model(tiny_hf_config(family), dict(overrides, perform_initialization=False))
            load_hf_into_mcore([model], hf, config, settings)
            model.train()
            out_logits = model(tokens, positions, attention_mask=None)
            out_logits.float().pow(2).mean().backward()
            logits[impl] = out_logits.detach().float()
            grads[impl] = {n: p.grad.detach().float() for n, p in model.named_parameters() if p.grad is not None}
        diff = float((logits["platform"] - logits["local"]).abs().max())
        grad_diff = max(float((grads["platform"][n] - g).abs().max()) for n, g in grads["local"].items()
                        if n in grads["platform"])
        result[family] = {"fp32_logits_max_diff": diff, "fp32_grads_max_diff": grad_diff}
        if diff > 1e-3:
            raise AssertionError(f"{family}: TE and local logits differ by {diff}")
    return result


def step_thd(out, dry):
    import torch

    from megatron_swift.converters.api import load_hf_into_mcore
    from megatron_swift.data.batching import Collator, move_batch
    from megatron_swift.model import build_model
    from megatron_swift.model.tiny import tiny_hf_config
    from megatron_swift.platform import get_platform, init_parallel

    init_parallel()
    device = get_platform().device
    dtype = torch.float32 if dry else torch.bfloat16
    (model,), config, settings = build_model(tiny_hf_config("qwen3"), {"params_dtype": dtype, "perform_initialization": False,
                                                                       "bf16": dtype == torch.bfloat16})
    load_hf_into_mcore([model], _hf_model(out, "qwen3"), config, settings)
    g = torch.Generator().manual_seed(2)
    samples = [{"input_ids": ids, "labels": ids} for ids in
               (torch.randint(0, 1000, (n,), generator=g).tolist() for n in (37, 100, 251))]
    losses = {}
    for name, thd in (("padded", False), ("thd", True)):
        batch = move_batch(Collator(0, padding_free=thd, pad_to_multiple_of=8)(samples), device)
        labels = batch["labels"]
        per_token = model(batch["input_ids"], batch["position_ids"], attention_mask=None, labels=labels.clamp(min=0),
                          packed_seq_params=batch.get("packed_seq_params"))
        losses[name] = per_token.float()[labels.ne(-100)]
    diff = float((losses["thd"] - losses["padded"]).abs().max())
    cu = Collator(0, padding_free=True)(samples)["packed_seq_params"].cu_seqlens_q
    if diff > (1e-4 if dry else 2e-2):
        raise AssertionError(f"THD and padded per-token losses differ by {diff}")
    return {"max_per_token_loss_diff": diff, "dtype": str(dtype), "cu_seqlens_dtype": str(cu.dtype)}


def step_export(out, dry):
    import torch
    from safetensors.torch import load_file

    hf = _hf_model(out, "qwen3_moe")
    mcore, back = os.path.join(out, "export-mcore"), os.path.join(out, "export-hf")
    for cmd in ((("export", "--model", hf, "--to_mcore", "true", "--output_dir", mcore, "--test_convert_precision",
                  "true", "--exist_ok", "true")),
                (("export", "--mcore_model", mcore, "--to_hf", "true", "--output_dir", back, "--exist_ok", "true"))):
        proc = _megatron(*cmd)
        if proc.returncode:
            raise AssertionError(proc.stderr[-2000:])
    precision = json.load(open(os.path.join(mcore, "convert_precision.json")))
    a = {k: v for f in os.listdir(hf) if f.endswith(".safetensors") for k, v in load_file(os.path.join(hf, f)).items()}
    b = {k: v for f in os.listdir(back) if f.endswith(".safetensors") for k, v in load_file(os.path.join(back, f)).items()}
    exact = sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    if not exact or precision["max_diff"] > 1e-3:
        raise AssertionError(f"round trip exact={exact}, precision={precision}")
    return {"round_trip_bit_exact": exact, "max_logit_diff": precision["max_diff"]}


def _sft(paths, save, *extra, env=None, nproc=1):
    return _megatron("sft", "--model", paths["model"], "--dataset", paths["dataset"], "--micro_batch_size", "4",
                     "--global_batch_size", "16", "--lr", "2e-3", "--log_interval", "1", "--save", save,
                     "--add_version", "false", "--split_dataset_ratio", "0", *extra, env=env, nproc=nproc)


def _losses(save):
    with open(os.path.join(save, "logging.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f if '"loss"' in line]


def step_checkpoint(out, dry):
    paths = _demo(out)
    cpu = os.path.join(out, "ckpt-cpu")
    proc = _sft(paths, cpu, "--train_iters", "2", "--overwrite_output_dir", "true", env=_cpu_env())
    if proc.returncode:
        raise AssertionError(proc.stderr[-2000:])
    resumed = _sft(paths, cpu, "--train_iters", "4", "--load", cpu)  # CPU (local spec) checkpoint on this platform
    if resumed.returncode:
        raise AssertionError(resumed.stderr[-2000:])
    return {"cpu_checkpoint_resumed_on_platform": True, "losses_after_resume": _losses(cpu)[2:]}


def step_sft(out, dry):
    paths = _demo(out)
    results = {}
    for name, env, extra in (("platform", None, ["--torch_dtype", "float32" if dry else "bfloat16"]),
                             ("cpu", _cpu_env(), ["--torch_dtype", "float32"])):
        save = os.path.join(out, f"sft-{name}")
        iters = "20" if name == "platform" else "1"
        proc = _sft(paths, save, "--train_iters", iters, "--overwrite_output_dir", "true", *extra, env=env)
        if proc.returncode:
            raise AssertionError(f"{name}: {proc.stderr[-2000:]}")
        results[name] = _losses(save)
    first = abs(results["platform"][0] - results["cpu"][0]) / results["cpu"][0]
    falls = results["platform"][-1] < 0.7 * results["platform"][0]
    if first > 0.02 or not falls:
        raise AssertionError(f"step-1 loss off by {first:.2%} or loss did not fall: {results}")
    return {"step1_rel_diff_vs_cpu": first, "loss_first": results["platform"][0], "loss_last": results["platform"][-1]}


def step_throughput(out, dry):
    rows = []
    for layout in ("bshd", "thd"):
        path = os.path.join(out, f"throughput-{layout}.json")
        size = ["--size", "tiny", "--seq", "128", "--steps", "2", "--warmup", "1"] if dry else \
            ["--size", "1.7b", "--seq", "4096", "--micro_batch", "2", "--steps", "10"]
        proc = _python(os.path.join(REPO, "scripts", "bench_gpu_throughput.py"), *size, "--layout", layout,
                       "--json", path)
        if proc.returncode:
            raise AssertionError(proc.stderr[-2000:])
        rows.append(json.load(open(path)))
    return {"runs": rows}


# ---------------------------------------------------------------------------------------- runner

def run_step(name: str, out: str, dry: bool) -> None:
    start = time.time()
    record = {"step": name, "dry": dry}
    try:
        record["result"] = globals()[f"step_{name}"](out, dry)
        record["ok"] = True
    except BaseException as exc:  # recorded, not fatal: the other steps still run
        record["ok"] = False
        record["error"] = f"{type(exc).__name__}: {str(exc)[:1500]}"
        record["traceback"] = traceback.format_exc()[-3000:]
    record["seconds"] = round(time.time() - start, 1)
    with open(os.path.join(out, "gpu_check.jsonl"), "a") as f:
        f.write(json.dumps(record, default=str) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--dry", action="store_true", help="CPU, local spec on both sides, tiny sizes")
    parser.add_argument("--steps", nargs="*", default=list(STEPS), choices=STEPS)
    parser.add_argument("--step", default=None, help=argparse.SUPPRESS)  # one step, in a subprocess
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out or tempfile.mkdtemp(prefix="gpu_check-"))
    os.makedirs(out, exist_ok=True)
    if args.step:
        run_step(args.step, out, args.dry)
        return 0
    env = _cpu_env() if args.dry else dict(os.environ)
    env.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    for name in args.steps:
        cmd = [os.path.abspath(__file__), "--out", out, "--step", name] + (["--dry"] if args.dry else [])
        try:
            _python(*cmd, env=env, timeout=TIMEOUTS[name])
        except subprocess.TimeoutExpired:
            with open(os.path.join(out, "gpu_check.jsonl"), "a") as f:
                f.write(json.dumps({"step": name, "ok": False, "error": f"timed out after {TIMEOUTS[name]} s"}) + "\n")
    records = [json.loads(line) for line in open(os.path.join(out, "gpu_check.jsonl"))]
    print("| step | ok | seconds | result |")
    print("|---|---|---|---|")
    for r in records:
        detail = json.dumps(r.get("result") if r.get("ok") else r.get("error"), default=str)[:300]
        print(f"| {r['step']} | {r.get('ok')} | {r.get('seconds', '')} | {detail} |")
    return 0 if all(r.get("ok") for r in records) else 1


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    raise SystemExit(main())
