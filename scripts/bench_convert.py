#!/usr/bin/env python
"""Peak memory and wall time of HF <-> mcore conversion on a synthetic multi-GB checkpoint.

    python scripts/bench_convert.py [--workdir /tmp/bench_convert] [--layers 20] [--shard_size 500MB]

1. Writes a synthetic Llama checkpoint (bf16, random weights, written with safetensors directly,
   several shards) of about 2 GB with the default sizes.
2. Runs each conversion in a fresh single-rank process and reports, per run: wall time of the
   conversion call, peak RSS above the process's idle RSS (idle = after imports and process-group
   setup, just before converting). The peak is the kernel's high-water mark ``VmHWM`` of the
   process, reset to the idle RSS right before the conversion (``/proc/self/clear_refs`` = 5);
   a 10 ms psutil sampler cross-checks it. (``getrusage().ru_maxrss`` is not usable here: Linux
   carries the parent's RSS at fork time over into the child's ru_maxrss.)
   Next to it: a plain sequential read of the same input bytes.
   * streaming HF -> mcore (``convert_hf_to_mcore``) and mcore -> HF (``convert_mcore_to_hf``);
   * the naive alternatives: HF -> mcore by loading the whole model with transformers, filling a
     fully built mcore model and saving it with megatron's standard writer; mcore -> HF by loading
     the whole checkpoint into a built model and then writing it.
   Input files are evicted from the page cache (``posix_fadvise(DONTNEED)``) before every run, so
   the conversions and the "cold" plain read start from disk; the "hot" read is from page cache.
   "plain copy" = reading the input and writing the same bytes with fsync: the I/O floor of a
   conversion that writes its output durably.
3. Prints a markdown table (and writes ``results.json`` into the workdir).
"""

from __future__ import annotations

import argparse
import gc
import glob
import json
import os
import shutil
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))


# ------------------------------------------------------------------------------ the checkpoint

def write_synthetic(path: str, layers: int, hidden: int, ffn: int, heads: int, kv_heads: int, vocab: int,
                    shard_size: int) -> dict:
    import torch
    from transformers import LlamaConfig

    os.makedirs(path, exist_ok=True)
    head_dim = hidden // heads
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
                      rms_norm_eps=1e-5, tie_word_embeddings=False, dtype="bfloat16")
    cfg.save_pretrained(path)
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    def tensors():
        yield "model.embed_tokens.weight", rand(vocab, hidden)
        for i in range(layers):
            p = f"model.layers.{i}."
            yield p + "input_layernorm.weight", torch.ones(hidden, dtype=torch.bfloat16)
            yield p + "self_attn.q_proj.weight", rand(heads * head_dim, hidden)
            yield p + "self_attn.k_proj.weight", rand(kv_heads * head_dim, hidden)
            yield p + "self_attn.v_proj.weight", rand(kv_heads * head_dim, hidden)
            yield p + "self_attn.o_proj.weight", rand(hidden, heads * head_dim)
            yield p + "post_attention_layernorm.weight", torch.ones(hidden, dtype=torch.bfloat16)
            yield p + "mlp.gate_proj.weight", rand(ffn, hidden)
            yield p + "mlp.up_proj.weight", rand(ffn, hidden)
            yield p + "mlp.down_proj.weight", rand(hidden, ffn)
        yield "model.norm.weight", torch.ones(hidden, dtype=torch.bfloat16)
        yield "lm_head.weight", rand(vocab, hidden)

    return _write_shards(path, tensors(), shard_size)


def write_synthetic_deepseek_v3(path: str, spec: dict) -> dict:
    """A DeepSeek-V3-shaped checkpoint: MLA (q_lora), first layer dense, then MoE layers with many
    routed experts (per-expert tensors, the published layout), a shared expert and the router's
    e_score_correction_bias (fp32, as published)."""
    import torch
    from transformers import DeepseekV3Config

    os.makedirs(path, exist_ok=True)
    h, heads, layers, experts = spec["hidden"], spec["heads"], spec["layers"], spec["experts"]
    q_lora, kv_lora, nope, rope, v = spec["q_lora"], spec["kv_lora"], spec["nope"], spec["rope"], spec["v"]
    ffn, moe_ffn, vocab = spec["ffn"], spec["moe_ffn"], spec["vocab"]
    cfg = DeepseekV3Config(vocab_size=vocab, hidden_size=h, intermediate_size=ffn, moe_intermediate_size=moe_ffn,
                           num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                           n_routed_experts=experts, n_shared_experts=1, num_experts_per_tok=8, n_group=8,
                           topk_group=4, first_k_dense_replace=1, q_lora_rank=q_lora, kv_lora_rank=kv_lora,
                           qk_nope_head_dim=nope, qk_rope_head_dim=rope, v_head_dim=v, head_dim=rope,
                           num_nextn_predict_layers=0, tie_word_embeddings=False, dtype="bfloat16")
    cfg.save_pretrained(path)
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    def ones(n):
        return torch.ones(n, dtype=torch.bfloat16)

    def mlp(prefix, f):
        yield prefix + "gate_proj.weight", rand(f, h)
        yield prefix + "up_proj.weight", rand(f, h)
        yield prefix + "down_proj.weight", rand(h, f)

    def tensors():
        yield "model.embed_tokens.weight", rand(vocab, h)
        for i in range(layers):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            yield p + "input_layernorm.weight", ones(h)
            yield a + "q_a_proj.weight", rand(q_lora, h)
            yield a + "q_a_layernorm.weight", ones(q_lora)
            yield a + "q_b_proj.weight", rand(heads * (nope + rope), q_lora)
            yield a + "kv_a_proj_with_mqa.weight", rand(kv_lora + rope, h)
            yield a + "kv_a_layernorm.weight", ones(kv_lora)
            yield a + "kv_b_proj.weight", rand(heads * (nope + v), kv_lora)
            yield a + "o_proj.weight", rand(h, heads * v)
            yield p + "post_attention_layernorm.weight", ones(h)
            if i == 0:
                yield from mlp(p + "mlp.", ffn)
                continue
            yield p + "mlp.gate.weight", (torch.randn(experts, h, generator=g) * 0.02).to(torch.bfloat16)
            yield p + "mlp.gate.e_score_correction_bias", torch.zeros(experts, dtype=torch.float32)
            for e in range(experts):
                yield from mlp(p + f"mlp.experts.{e}.", moe_ffn)
            yield from mlp(p + "mlp.shared_experts.", moe_ffn)
        yield "model.norm.weight", ones(h)
        yield "lm_head.weight", rand(vocab, h)

    return _write_shards(path, tensors(), spec["shard_size"])


def _write_shards(path: str, tensors, shard_size: int) -> dict:
    from safetensors.torch import save_file

    shards, current, size = [], {}, 0
    for key, t in tensors:
        n = t.numel() * t.element_size()
        if current and size + n > shard_size:
            shards.append(current)
            current, size = {}, 0
        current[key] = t
        size += n
    shards.append(current)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
        for key, t in shard.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    sizes = [os.path.getsize(p) for p in glob.glob(os.path.join(path, "*.safetensors"))]
    return {"total_bytes": total, "shards": len(sizes), "largest_shard": max(sizes)}


def files_of(path: str) -> list[str]:
    return sorted(p for p in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                  if os.path.isfile(p) and (p.endswith(".safetensors") or p.endswith(".distcp")))


def evict(paths: list[str]) -> None:
    os.sync()
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def plain_copy(paths: list[str], dst: str) -> float:
    """Read + write the same bytes + fsync: the I/O floor of any conversion that writes its output."""
    os.makedirs(dst, exist_ok=True)
    t0 = time.perf_counter()
    buf = bytearray(64 << 20)
    for i, p in enumerate(paths):
        with open(p, "rb", buffering=0) as f, open(os.path.join(dst, str(i)), "wb", buffering=0) as g:
            while True:
                n = f.readinto(buf)
                if not n:
                    break
                g.write(memoryview(buf)[:n])
            os.fsync(g.fileno())
    elapsed = time.perf_counter() - t0
    shutil.rmtree(dst, ignore_errors=True)
    return elapsed


def plain_read(paths: list[str]) -> float:
    t0 = time.perf_counter()
    buf = bytearray(64 << 20)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------- one measurement

def _naive_hf_to_mcore(src: str, dst: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_swift.converters.plan import local_params
    from megatron_swift.converters.registry import mapping_for
    from megatron_swift.converters.mapping import format_key
    from megatron_swift.converters.mcore_io import build_chunks, save_checkpoint, write_layout
    from megatron_swift.converters.transforms import geometry, hf_to_local
    from megatron_swift.model import load_hf_config

    hf_config = load_hf_config(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    state = model.state_dict()
    chunks, config, settings = build_chunks(hf_config, {"params_dtype": torch.bfloat16,
                                                        "perform_initialization": False})
    geo = geometry(config, settings)
    with torch.no_grad():
        for lp in local_params(chunks, mapping_for(settings.family), settings.share_embeddings_and_output_weights):
            keys = [format_key(s.key, lp.layer, lp.expert) for s in lp.sources]
            lp.param.copy_(hf_to_local(lp.rule, lambda i, index, keys=keys: state[keys[i]][index],
                                       tuple(lp.param.shape), lp.tp_rank, lp.tp_size, geo))
    model = state = None  # free both before building the checkpoint
    gc.collect()
    os.makedirs(dst)
    save_checkpoint(chunks, os.path.join(dst, "release"))
    write_layout(dst, {"model": src, "model_dir": src, "model_type": hf_config.model_type,
                       "hf_config": hf_config.to_dict(), "template": None, "torch_dtype": "bfloat16"})


def _naive_mcore_to_hf(src: str, dst: str, hf_dir: str, shard: str) -> None:
    import torch

    from megatron_swift.converters.api import save_mcore_as_hf
    from megatron_swift.converters.mcore_io import build_chunks, load_checkpoint
    from megatron_swift.model import load_hf_config

    hf_config = load_hf_config(hf_dir)
    chunks, config, settings = build_chunks(hf_config, {"params_dtype": torch.bfloat16,
                                                        "perform_initialization": False})
    load_checkpoint(chunks, src)
    save_mcore_as_hf(chunks, config, settings, hf_config, dst, source_dir=hf_dir, torch_dtype=torch.bfloat16,
                     max_shard_size=shard)


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def measure(op: str, src: str, dst: str, hf_dir: str, shard: str, threads: int) -> dict:
    import psutil
    import torch  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: F401  (imports are not conversion time)

    import megatron_swift.converters.convert as convert
    import megatron_swift.converters.mcore_io  # noqa: F401
    from megatron_swift.platform import ParallelLayout, init_parallel

    init_parallel(ParallelLayout())
    gc.collect()
    proc = psutil.Process()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS high-water mark to the current RSS
    idle = _status("VmRSS")
    peak = [idle]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    if op == "hf_to_mcore":
        convert.convert_hf_to_mcore(src, dst, thread_count=threads)
    elif op == "mcore_to_hf":
        convert.convert_mcore_to_hf(src, dst, max_shard_size=shard, thread_count=threads)
    elif op == "naive_hf_to_mcore":
        _naive_hf_to_mcore(src, dst)
    elif op == "naive_mcore_to_hf":
        _naive_mcore_to_hf(src, dst, hf_dir, shard)
    else:
        raise ValueError(op)
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    hwm = _status("VmHWM")
    return {"op": op, "wall_s": wall, "idle_rss": idle, "peak_rss": max(hwm, peak[0]), "vmhwm": hwm,
            "sampled_peak_rss": peak[0]}


# ------------------------------------------------------------------------------------- driver

def _size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    text = text.strip().upper()
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def _child(argv: list) -> dict:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), *map(str, argv)], capture_output=True,
                         text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if out.returncode:
        raise SystemExit(f"{argv[0]} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def verify(expected_dir: str, actual_dir: str) -> dict:
    import torch
    from safetensors import safe_open

    with open(os.path.join(actual_dir, "model.safetensors.index.json")) as f:
        where = json.load(f)["weight_map"]
    same, count = True, 0
    for path in files_of(expected_dir):
        with safe_open(path, "pt") as h:
            for key in h.keys():
                with safe_open(os.path.join(actual_dir, where[key]), "pt") as o:
                    same &= torch.equal(h.get_tensor(key), o.get_tensor(key))
                count += 1
    return {"bit_exact": bool(same and count == len(where)), "tensors": count}


def run_measure(args, op: str, src: str, dst: str) -> dict:
    shutil.rmtree(dst, ignore_errors=True)
    evict(files_of(src))
    cmd = [sys.executable, os.path.abspath(__file__), "_measure", op, src, dst, args.hf_dir, args.shard_size,
           str(args.threads)]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), PYTHONWARNINGS="ignore")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"{op} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "_measure":
        op, src, dst, hf_dir, shard, threads = sys.argv[2:8]
        print(json.dumps(measure(op, src, dst, hf_dir, shard, int(threads))))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_write":
        print(json.dumps(write_synthetic(sys.argv[2], *map(int, sys.argv[3:10]))))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_write_deepseek_v3":
        print(json.dumps(write_synthetic_deepseek_v3(sys.argv[2], json.loads(sys.argv[3]))))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_verify":
        print(json.dumps(verify(sys.argv[2], sys.argv[3])))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/bench_convert")
    p.add_argument("--family", default="llama", choices=["llama", "deepseek_v3"],
                   help="deepseek_v3: MLA, 1 dense + (layers - 1) MoE layers of --experts routed experts")
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--moe_ffn", type=int, default=512)
    p.add_argument("--layers", type=int, default=20)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv_heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--shard_size", default="500MB")
    p.add_argument("--threads", type=int, default=2)  # the CLI default --thread_count at this size
    p.add_argument("--skip_naive", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the workdir")
    args = p.parse_args()
    # this driver stays small (no torch): children inherit its RSS into their ru_maxrss
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    args.hf_dir = os.path.join(work, "hf")
    t0 = time.perf_counter()
    if args.family == "deepseek_v3":
        spec = dict(hidden=args.hidden, heads=args.heads, layers=args.layers, experts=args.experts,
                    q_lora=args.hidden // 2, kv_lora=args.hidden // 4, nope=64, rope=32, v=64, ffn=args.ffn,
                    moe_ffn=args.moe_ffn, vocab=args.vocab, shard_size=_size(args.shard_size))
        info = _child(["_write_deepseek_v3", args.hf_dir, json.dumps(spec)])
    else:
        info = _child(["_write", args.hf_dir, args.layers, args.hidden, args.ffn, args.heads, args.kv_heads,
                       args.vocab, _size(args.shard_size)])
    print(f"synthetic checkpoint: {info['total_bytes'] / 1e9:.2f} GB in {info['shards']} shards, largest "
          f"{info['largest_shard'] / 1e6:.0f} MB ({time.perf_counter() - t0:.0f} s to write)", flush=True)
    hf_files = files_of(args.hf_dir)
    plain_hot = plain_read(hf_files)
    evict(hf_files)
    plain_cold = plain_read(hf_files)
    results = {"input": info, "plain_read_hot_s": plain_hot, "plain_read_cold_s": plain_cold, "runs": []}
    print(f"plain read of the HF shards: {plain_cold:.2f} s cold, {plain_hot:.2f} s hot", flush=True)
    mcore, back = os.path.join(work, "mcore"), os.path.join(work, "hf_out")
    plan = [("hf_to_mcore", args.hf_dir, mcore), ("mcore_to_hf", mcore, back)]
    if not args.skip_naive and args.family == "llama":  # the naive loaders know Llama's layout only
        plan += [("naive_hf_to_mcore", args.hf_dir, os.path.join(work, "mcore_naive")),
                 ("naive_mcore_to_hf", mcore, os.path.join(work, "hf_naive"))]
    for op, src, dst in plan:
        files = files_of(src)
        evict(files)
        r = run_measure(args, op, src, dst)
        r["input_bytes"] = sum(os.path.getsize(f) for f in files)
        evict(files)
        r["plain_read_cold_s"] = plain_read(files)
        evict(files)
        r["plain_copy_cold_s"] = plain_copy(files, os.path.join(work, "copy"))
        results["runs"].append(r)
        print(f"{op}: {r['wall_s']:.1f} s, peak RSS above idle {(r['peak_rss'] - r['idle_rss']) / 1e6:.0f} MB "
              f"(idle {r['idle_rss'] / 1e6:.0f} MB); plain read of its input {r['plain_read_cold_s']:.1f} s",
              flush=True)
        if op in ("naive_hf_to_mcore", "naive_mcore_to_hf"):
            shutil.rmtree(dst, ignore_errors=True)
    # the streaming round trip must be exact
    same = _child(["_verify", args.hf_dir, back])["bit_exact"]
    results["round_trip_bit_exact"] = same
    largest = info["largest_shard"]
    print()
    print("| conversion | wall (s) | plain read of input (s) | wall / read | plain copy + fsync (s) | wall / copy "
          "| peak RSS above idle (MB) | / largest shard |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results["runs"]:
        above = r["peak_rss"] - r["idle_rss"]
        print(f"| {r['op']} | {r['wall_s']:.1f} | {r['plain_read_cold_s']:.1f} | "
              f"{r['wall_s'] / r['plain_read_cold_s']:.1f}x | {r['plain_copy_cold_s']:.1f} | "
              f"{r['wall_s'] / r['plain_copy_cold_s']:.1f}x | {above / 1e6:.0f} | {above / largest:.2f}x |")
    print(f"\nround trip bit-exact: {same}; largest input shard {largest / 1e6:.0f} MB")
    with open(os.path.join(work, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    if not args.keep:
        for d in (mcore, back, args.hf_dir):
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
