"""InternLM3: transformers runs it with the Llama implementation (``qkv_bias`` / ``bias`` are
aliases of ``attention_bias`` / ``mlp_bias``, which put a bias on q/k/v AND o_proj / the MLP: not
supported; the published InternLM3 models have none)."""

from megatron_swift.model.families import ModelFamily

from ..mapping import attention, dense_mlp, embeddings


def _check(hf):
    for key in ("attention_bias", "mlp_bias"):
        if getattr(hf, key, False):
            raise ValueError(f"config.json: {key}=true (qkv_bias/bias) is not supported for internlm3")


FAMILY = ModelFamily(
    "internlm3", ("internlm3",), architectures=("InternLM3ForCausalLM",), qkv_bias=False, check_config=_check,
    rules=embeddings() + attention() + dense_mlp(),
    tiny=dict(rope_theta=50000000.0, head_dim=16), template="chatml",
    hf_ids="internlm/internlm3-8b-instruct",
    notes="default template chatml (its tokenizer's template also writes a BOS first)",
)
