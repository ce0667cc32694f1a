"""``megatron rollout``: a vLLM engine behind HTTP, for ``megatron rlhf --vllm_mode server``.

The shape of ms-swift's ``swift rollout`` (a FastAPI app with ``/health/``, ``/get_world_size/``,
``/infer/``, weight-update and ``/reset_prefix_cache/`` endpoints), speaking the RolloutEngine
contract: token ids in, token ids and processed log-probs out.

Weights travel as safetensors bytes in HTTP request bodies, in buckets:
``/update_weights/begin/``, ``/update_weights/bucket/`` (repeated), ``/update_weights/end/``. The server
keeps the buckets until ``end`` and then reloads the whole model in one ``reload_weights`` pass (vLLM
processes a layer once all of its tensors arrived; a layer split over two passes would be processed
half-loaded). Why HTTP rather than a gloo/NCCL group (ms-swift's PyNccl path): it needs no second
process group between the trainer and the server, works on CPU and across hosts, and the cost on a
real model is one host copy of the weights per sync on the server; a collective transport is the
next step for large models on GPUs.
"""

# no `from __future__ import annotations`: FastAPI reads the endpoints' annotations (Request, dict)
import dataclasses
import threading

from .engine import SamplingSettings


def build_app(engine):
    """The FastAPI app over ``engine`` (a VLLMColocateEngine: vLLM in this process)."""
    import torch
    from fastapi import FastAPI, HTTPException, Request
    from safetensors.torch import load as load_safetensors

    app = FastAPI(title="megatron rollout")
    lock = threading.Lock()  # one engine call at a time (FastAPI runs sync endpoints in a thread pool)
    pending: dict = {"tensors": None}

    @app.get("/health/")
    def health():
        return {"status": "ok"}

    @app.get("/get_world_size/")
    def world_size():
        return {"world_size": 1}

    @app.post("/infer/")
    def infer(body: dict):
        try:
            sampling = SamplingSettings(**{k: tuple(v) if k == "stop_token_ids" else v
                                           for k, v in body.get("sampling", {}).items()})
            prompts = body["prompts"]
        except (TypeError, KeyError) as e:
            raise HTTPException(status_code=422, detail=f"bad /infer/ request: {e}")
        with lock:
            try:
                completions = engine.generate(prompts, sampling, int(body.get("n", 1)))
            except ValueError as e:
                raise HTTPException(status_code=422, detail=str(e))
        return {"completions": [dataclasses.asdict(c) for c in completions]}

    @app.post("/update_weights/begin/")
    def begin():
        pending["tensors"] = []
        return {"ok": True}

    @app.post("/update_weights/bucket/")
    async def bucket(request: Request):
        if pending["tensors"] is None:
            raise HTTPException(status_code=409, detail="POST /update_weights/begin/ first")
        tensors = load_safetensors(await request.body())
        pending["tensors"].extend(tensors.items())
        return {"received": len(tensors)}

    @app.post("/update_weights/end/")
    def end():
        tensors, pending["tensors"] = pending["tensors"], None
        if tensors is None:
            raise HTTPException(status_code=409, detail="no weight update in progress")
        with lock, torch.no_grad():
            seconds = engine.update_weights(iter(tensors))
        return {"seconds": seconds, "tensors": len(tensors)}

    @app.post("/reset_prefix_cache/")
    def reset_prefix_cache():
        with lock:
            engine.llm.reset_prefix_cache()
        return {"ok": True}

    return app


def run_server(args) -> int:
    import sys

    from .vllm_colocate import VLLMColocateEngine, import_vllm

    try:
        import_vllm()
    except ImportError as e:
        print(f"megatron rollout: error: {e}", file=sys.stderr)
        return 1
    import uvicorn  # comes with vLLM (its OpenAI server)

    engine = VLLMColocateEngine(
        args.model, max_model_len=args.vllm_max_model_len, gpu_memory_utilization=args.vllm_gpu_memory_utilization,
        tensor_parallel_size=args.vllm_tensor_parallel_size, enforce_eager=args.vllm_enforce_eager,
        seed=args.seed, dtype=args.torch_dtype or "auto", max_num_seqs=args.vllm_max_num_seqs)
    print(f"megatron rollout: {args.model} loaded in {engine.load_seconds:.1f}s; serving on "
          f"http://{args.host}:{args.port}", flush=True)
    try:
        uvicorn.run(build_app(engine), host=args.host, port=args.port, log_level="warning")
    finally:
        engine.close()
    return 0
