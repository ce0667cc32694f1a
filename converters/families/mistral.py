"""Mistral: Llama's architecture (no qkv bias); sliding-window configs are refused by the model
layer (megatron-core's local attention has no sliding window here)."""

from megatron_swift.model.families import ModelFamily

from ..mapping import attention, dense_mlp, embeddings


def _check(hf):
    if getattr(hf, "sliding_window", None):
        raise ValueError(f"config.json: sliding_window={hf.sliding_window} is not supported (Mistral-7B-v0.1 style "
                         f"sliding-window attention); v0.2+ and Mistral-Nemo/Small set it to null")


FAMILY = ModelFamily(
    "mistral", ("mistral",), architectures=("MistralForCausalLM",), qkv_bias=False, check_config=_check,
    rules=embeddings() + attention() + dense_mlp(),
    tiny=dict(rope_theta=1000000.0, sliding_window=None, head_dim=16), template="mistral",
    hf_ids="mistralai/Mistral-7B-v0.2/v0.3(-Instruct), Mistral-Nemo, Mistral-Small",
)
