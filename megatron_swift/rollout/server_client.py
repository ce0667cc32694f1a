"""The RolloutEngine of ``--vllm_mode server``: a client of ``megatron rollout`` (server.py).

Standard library HTTP only (the trainer's environment needs no web framework). One trainer rank talks
to the server (gathering the prompts of the others is the trainer's business); every request has a
timeout, so a dead or unreachable server is an error naming it, never a hang.
"""

from __future__ import annotations

import dataclasses
import json
import time
import urllib.error
import urllib.request
from typing import Iterable, Optional

from .engine import Completion, SamplingSettings


class RolloutServerError(RuntimeError):
    pass


class VLLMServerEngine:
    """``RolloutEngine`` over HTTP. ``base_url`` (e.g. ``http://10.0.0.5:8000``) or ``host`` + ``port``;
    ``timeout``: seconds to wait for the server to come up, and for any one request.
    ``bucket_bytes``: weights are posted in safetensors buckets of about this size."""

    def __init__(self, host: Optional[str] = None, port: int = 8000, base_url: Optional[str] = None,
                 timeout: float = 240.0, bucket_bytes: int = 128 << 20):
        if base_url is None:
            if not host:
                raise ValueError("--vllm_server_host or --vllm_server_base_url is required with --vllm_mode server")
            base_url = f"http://{host}:{port}"
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.bucket_bytes = bucket_bytes
        self._wait_until_up()

    # ------------------------------------------------------------------ RolloutEngine

    def generate(self, prompts: list, sampling: SamplingSettings, n: int = 1) -> list:
        body = {"prompts": [list(map(int, p)) for p in prompts], "sampling": dataclasses.asdict(sampling), "n": n}
        out = self._post_json("/infer/", body)
        return [Completion(**c) for c in out["completions"]]

    def update_weights(self, weights: Iterable[tuple]) -> float:
        from safetensors.torch import save as save_safetensors

        started = time.perf_counter()
        self._post_json("/update_weights/begin/", {})
        bucket, size = {}, 0
        for name, tensor in weights:
            t = tensor.detach().to("cpu").contiguous()
            bucket[name] = t
            size += t.numel() * t.element_size()
            if size >= self.bucket_bytes:
                self._post("/update_weights/bucket/", save_safetensors(bucket), "application/octet-stream")
                bucket, size = {}, 0
        if bucket:
            self._post("/update_weights/bucket/", save_safetensors(bucket), "application/octet-stream")
        self._post_json("/update_weights/end/", {})
        return time.perf_counter() - started

    def close(self) -> None:
        pass  # the server outlives its clients

    # ------------------------------------------------------------------ HTTP

    def _wait_until_up(self) -> None:
        deadline = time.monotonic() + self.timeout
        last = None
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.base_url + "/health/", timeout=min(5.0, self.timeout)) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError) as e:
                last = e
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        raise RolloutServerError(f"no rollout server answered at {self.base_url}/health/ within "
                                 f"--vllm_server_timeout {self.timeout:g}s (last error: {last}); start one with "
                                 f"`megatron rollout --model M --port P`")

    def _post(self, path: str, data: bytes, content_type: str) -> dict:
        request = urllib.request.Request(self.base_url + path, data=data, method="POST",
                                         headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as r:
                return json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:2000]
            raise RolloutServerError(f"rollout server {self.base_url}{path}: HTTP {e.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as e:
            raise RolloutServerError(f"rollout server {self.base_url}{path}: no answer within "
                                     f"--vllm_server_timeout {self.timeout:g}s ({e})") from None

    def _post_json(self, path: str, body: dict) -> dict:
        return self._post(path, json.dumps(body).encode(), "application/json")
