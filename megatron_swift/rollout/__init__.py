"""Rollout engines for online RL (GRPO): generation delegated to vLLM, in-process or over HTTP."""
