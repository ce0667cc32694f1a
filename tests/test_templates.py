"""Chat templates. Oracle: the tokenizer's own ``apply_chat_template`` with each family's published
chat template (``megatron_swift/template/chat_templates/*.jinja``) on tiny real tokenizers built by
``make_tiny_tokenizer``: prompt ids must be identical, full training conversations identical up to
the separator after the final end-of-turn token."""

from __future__ import annotations

import json

import pytest

from megatron_swift.template import (TEMPLATES, MaxLengthError, TemplateError, get_template, make_tiny_tokenizer,
                                     template_for_model)

IGNORE = -100

CONVERSATIONS = {
    "single": [{"role": "user", "content": "hello who are you?"},
               {"role": "assistant", "content": "I am a helpful model."}],
    "system_multi": [{"role": "system", "content": "You are a data model."},
                     {"role": "user", "content": "what is the weather today?"},
                     {"role": "assistant", "content": "It is hot."},
                     {"role": "user", "content": "and tomorrow in 北京?"},
                     {"role": "assistant", "content": "Some water, 你好."}],
    "three_turns": [{"role": "user", "content": "1 2 3"}, {"role": "assistant", "content": "4 5"},
                    {"role": "user", "content": "why?"}, {"role": "assistant", "content": "because."},
                    {"role": "user", "content": "thanks"}, {"role": "assistant", "content": "you are welcome!"}],
}


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("tok")
    out = {}
    for name in TEMPLATES:
        make_tiny_tokenizer(str(root / name), name)
        out[name] = AutoTokenizer.from_pretrained(str(root / name))  # what a user's model dir gives
    return out


def jinja_ids(tok, messages, add_generation_prompt=False, tools=None):
    return tok.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=False,
                                   add_generation_prompt=add_generation_prompt)


def loss_text(tok, enc) -> str:
    return tok.decode([t for t, lab in zip(enc["input_ids"], enc["labels"]) if lab != IGNORE])


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_token_ids_equal_apply_chat_template(tokenizers, name):
    """Prompt ids == apply_chat_template(add_generation_prompt=True); full conversations equal too."""
    tok = tokenizers[name]
    template = get_template(tok, name)
    for conv in CONVERSATIONS.values():
        assert template.encode_prompt(conv[:-1]) == jinja_ids(tok, conv[:-1], add_generation_prompt=True), conv
        enc = template.encode({"messages": conv})
        full = jinja_ids(tok, conv)
        n = len(enc["input_ids"])
        assert enc["input_ids"] == full[:n]
        assert tok.decode(full[n:]).strip() == ""  # only the trailing "\n" after the last end-of-turn
        assert len(enc["labels"]) == n


def test_tiny_tokenizer_fits_tiny_model(tokenizers):
    from megatron_swift.model.tiny import TINY_VOCAB

    for name, tok in tokenizers.items():
        assert len(tok) <= TINY_VOCAB, name
        assert tok.chat_template and tok.eos_token
    assert tokenizers["llama3"]("hi")["input_ids"][0] == tokenizers["llama3"].bos_token_id  # adds BOS
    assert tokenizers["qwen2_5"]("hi")["input_ids"][0] != tokenizers["qwen2_5"].eos_token_id


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Get the weather",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]
SWIFT_TOOL_CONV = [
    {"role": "user", "content": "what is the weather in 北京?"},
    {"role": "assistant", "content": "Let me check."},
    {"role": "tool_call", "content": json.dumps({"name": "get_weather", "arguments": {"city": "北京"}},
                                                ensure_ascii=False)},
    {"role": "tool_call", "content": json.dumps({"name": "get_weather", "arguments": "{\"city\": \"上海\"}"})},
    {"role": "tool_response", "content": "hot"},
    {"role": "tool_response", "content": "cold"},
    {"role": "assistant", "content": "Hot in 北京, cold in 上海."},
]
OPENAI_TOOL_CONV = [
    {"role": "user", "content": "what is the weather in 北京?"},
    {"role": "assistant", "content": "Let me check.", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京"}}},
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "上海"}}}]},
    {"role": "tool", "content": "hot"}, {"role": "tool", "content": "cold"},
    {"role": "assistant", "content": "Hot in 北京, cold in 上海."},
]


@pytest.mark.parametrize("name", ["qwen2_5", "qwen3"])
def test_tool_calls_match_hub_template(tokenizers, name):
    """tool_call / tool_response rows (+ tools) render as the hub's hermes-style tool template; the
    tool calls carry loss, the tool responses do not."""
    tok = tokenizers[name]
    template = get_template(tok, name)
    enc = template.encode({"messages": SWIFT_TOOL_CONV, "tools": json.dumps(TOOLS)})
    full = jinja_ids(tok, OPENAI_TOOL_CONV, tools=TOOLS)
    assert enc["input_ids"] == full[:len(enc["input_ids"])]
    prompt = template.encode_prompt(SWIFT_TOOL_CONV[:-1], tools=TOOLS)
    assert prompt == jinja_ids(tok, OPENAI_TOOL_CONV[:-1], add_generation_prompt=True, tools=TOOLS)
    trained = loss_text(tok, enc)
    assert '"get_weather"' in trained and "Hot in" in trained
    assert "hot\n</tool_response>" not in trained and "<tool_response>" not in trained


def test_qwen3_thinking_and_empty_think(tokenizers):
    """History turns lose their reasoning, the last keeps it; a response without reasoning gets the
    empty think block (like the hub template), which ignore_empty_think leaves out of the loss."""
    tok = tokenizers["qwen3"]
    conv = [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": "<think>\nstep one\n</think>\n\nhello"},
            {"role": "user", "content": "again"},
            {"role": "assistant", "content": "<think>\nstep two\n</think>\n\nfinal"}]
    enc = get_template(tok, "qwen3").encode({"messages": conv})
    assert enc["input_ids"] == jinja_ids(tok, conv)[:len(enc["input_ids"])]
    text = tok.decode(enc["input_ids"])
    assert "step one" not in text and "step two" in text

    plain = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    default = get_template(tok, "qwen3").encode({"messages": plain})
    assert default["input_ids"] == jinja_ids(tok, plain)[:len(default["input_ids"])]
    assert loss_text(tok, default) == "<think>\n\n</think>\n\nhello<|im_end|>"
    ignored = get_template(tok, "qwen3", loss_scale="ignore_empty_think").encode({"messages": plain})
    assert ignored["input_ids"] == default["input_ids"]
    assert loss_text(tok, ignored) == "hello<|im_end|>"


def test_loss_scale_variants(tokenizers):
    tok = tokenizers["qwen2_5"]
    conv = CONVERSATIONS["three_turns"]
    texts = {ls: loss_text(tok, get_template(tok, "qwen2_5", loss_scale=ls).encode({"messages": conv}))
             for ls in ("default", "last_round", "all")}
    assert texts["default"] == "4 5<|im_end|>because.<|im_end|>you are welcome!<|im_end|>"
    assert texts["last_round"] == "you are welcome!<|im_end|>"
    enc_all = get_template(tok, "qwen2_5", loss_scale="all").encode({"messages": conv})
    assert all(lab != IGNORE for lab in enc_all["labels"])
    with pytest.raises(ValueError, match="not supported yet"):
        get_template(tok, "qwen2_5", loss_scale="hermes")


def test_truncation_strategies(tokenizers):
    tok = tokenizers["chatml"]
    conv = CONVERSATIONS["system_multi"]
    full = get_template(tok, "chatml").encode({"messages": conv})
    n = len(full["input_ids"])
    with pytest.raises(MaxLengthError):
        get_template(tok, "chatml", max_length=n - 1).encode({"messages": conv})
    left = get_template(tok, "chatml", max_length=10, truncation_strategy="left").encode({"messages": conv})
    right = get_template(tok, "chatml", max_length=n - 5, truncation_strategy="right").encode({"messages": conv})
    assert left["input_ids"] == full["input_ids"][-10:] and left["labels"] == full["labels"][-10:]
    assert right["input_ids"] == full["input_ids"][:n - 5] and right["labels"] == full["labels"][:n - 5]
    with pytest.raises(TemplateError, match="no token carries loss"):  # right-truncated before any response
        get_template(tok, "chatml", max_length=5, truncation_strategy="right").encode({"messages": conv})


def test_system_priority(tokenizers):
    """Data system > --system > the template's default system."""
    tok = tokenizers["qwen2_5"]
    conv = CONVERSATIONS["single"]
    default = tok.decode(get_template(tok, "qwen2_5").encode({"messages": conv})["input_ids"])
    assert "You are Qwen, created by Alibaba Cloud" in default
    arg = tok.decode(get_template(tok, "qwen2_5", system="Be brief.").encode({"messages": conv})["input_ids"])
    assert "<|im_start|>system\nBe brief.<|im_end|>" in arg
    data = [{"role": "system", "content": "From data."}] + conv
    both = tok.decode(get_template(tok, "qwen2_5", system="Be brief.").encode({"messages": data})["input_ids"])
    assert "From data." in both and "Be brief." not in both


def test_template_chosen_from_model(tokenizers):
    for name in ("qwen", "qwen2_5", "qwen3", "llama3", "llama", "deepseek", "deepseek_r1"):
        assert template_for_model(None, tokenizers[name].chat_template) == name
    assert template_for_model("qwen3", None) == "qwen3"
    assert template_for_model("llama", None) == "llama3"
    with pytest.raises(ValueError, match="--template"):
        template_for_model("mixtral", None)
    assert get_template(tokenizers["llama3"], None).meta.name == "llama3"


def test_generation_template_for_pt(tokenizers):
    """--use_chat_template false (megatron pt): BOS (if the tokenizer adds one) + text + EOS."""
    tok = tokenizers["llama3"]
    template = get_template(tok, "llama3", use_chat_template=False, loss_scale="all")
    enc = template.encode({"messages": [{"role": "assistant", "content": "Some long text."}]})
    assert enc["input_ids"] == [tok.bos_token_id] + tok("Some long text.", add_special_tokens=False)["input_ids"] \
        + [tok.eos_token_id]
    assert all(lab != IGNORE for lab in enc["labels"])


def test_response_prefix(tokenizers):
    tok = tokenizers["deepseek_r1"]
    conv = CONVERSATIONS["single"][:1]
    assert tok.decode(get_template(tok, "deepseek_r1").encode_prompt(conv)).endswith("<｜Assistant｜><think>\n")
    assert tok.decode(get_template(tok, "deepseek_r1", response_prefix="").encode_prompt(conv)).endswith(
        "<｜Assistant｜>")
    qwen = tokenizers["qwen3"]
    nothink = get_template(qwen, "qwen3", response_prefix="<think>\n\n</think>\n\n").encode_prompt(conv)
    assert nothink == qwen.apply_chat_template(conv, tokenize=True, return_dict=False, add_generation_prompt=True,
                                               enable_thinking=False)


def test_jinja_backend(tokenizers):
    """--template_backend jinja: prompts are the tokenizer's own; training loss spans from prefix renders
    cover the same response tokens as the swift backend (plus the template's trailing newline)."""
    tok = tokenizers["chatml"]
    conv = CONVERSATIONS["system_multi"]
    jinja = get_template(tok, "chatml", template_backend="jinja")
    assert jinja.encode_prompt(conv[:-1]) == jinja_ids(tok, conv[:-1], add_generation_prompt=True)
    enc = jinja.encode({"messages": conv})
    assert enc["input_ids"] == jinja_ids(tok, conv)
    assert loss_text(tok, enc) == "It is hot.<|im_end|>\nSome water, 你好.<|im_end|>\n"


def test_preference_and_kto_encoding(tokenizers):
    tok = tokenizers["qwen2_5"]
    template = get_template(tok, "qwen2_5")
    row = {"messages": CONVERSATIONS["single"], "rejected_response": "No idea."}
    pair = template.encode(row, mode="pair")
    assert loss_text(tok, {"input_ids": pair["chosen_input_ids"], "labels": pair["chosen_labels"]}) == \
        "I am a helpful model.<|im_end|>"
    assert loss_text(tok, {"input_ids": pair["rejected_input_ids"], "labels": pair["rejected_labels"]}) == \
        "No idea.<|im_end|>"
    kto = template.encode({"messages": CONVERSATIONS["single"], "label": False}, mode="kto")
    assert kto["label"] is False and "input_ids" in kto
    with pytest.raises(TemplateError, match="rejected_response"):
        template.encode({"messages": CONVERSATIONS["single"]}, mode="pair")


def test_llama2_roles_must_alternate(tokenizers):
    tok = tokenizers["llama"]
    bad = [{"role": "assistant", "content": "hi"}, {"role": "assistant", "content": "again"}]
    with pytest.raises(TemplateError, match="alternate"):
        get_template(tok, "llama").encode({"messages": bad})
