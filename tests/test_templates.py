"""Chat templates. Oracles, on tiny real tokenizers built by ``make_tiny_tokenizer`` with each family's
published chat template (``megatron_swift/template/chat_templates/*.jinja``):

* ids: a whole training conversation encodes to exactly ``tokenizer.apply_chat_template(messages,
  tokenize=True)``, a prompt to the same with ``add_generation_prompt=True``;
* loss mask: exactly the tokens of the assistant spans of that official rendering, found here by
  text search (the family's assistant header, then up to and including its end-of-turn text),
  written independently of the renderers. The end-of-turn text is ms-swift's (its templates'
  ``suffix`` / ``chat_sep``): for ChatML ``<|im_end|>\\n``, the trailing newline trained too.
"""

from __future__ import annotations

import json

import pytest

from megatron_swift.template import (TEMPLATES, MaxLengthError, TemplateError, get_template, make_tiny_tokenizer,
                                     template_for_model)

IGNORE = -100
DATE = "26 Jul 2024"  # the fixed Llama-3.1+ "Today Date"
EMPTY_THINK = "<think>\n\n</think>\n\n"

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

# Where a response starts in the official rendering (text right after one of these) and the
# end-of-turn text that closes it; both carry loss (ms-swift: response + suffix / chat_sep).
_CHATML = (("<|im_start|>assistant\n",), "<|im_end|>\n")
_LLAMA3 = (("<|start_header_id|>assistant<|end_header_id|>\n\n",), "<|eot_id|>")
ASSISTANT_SPANS = {
    "chatml": _CHATML, "qwen": _CHATML, "qwen2_5": _CHATML, "qwen3": _CHATML,
    "llama3": _LLAMA3, "llama3_1": _LLAMA3, "llama3_2": _LLAMA3,
    "llama": ((" [/INST]",), " </s>"),
    "mistral": ((" [/INST]",), "</s>"),
    "deepseek": (("Assistant:",), "<｜end▁of▁sentence｜>"),
    "deepseek_r1": (("<｜Assistant｜>", "<｜tool▁outputs▁end｜>"), "<｜end▁of▁sentence｜>"),
}
# The trained tokens of CONVERSATIONS["single"], spelled out: the last tokens of the sample.
SINGLE_TRAINED = {
    "chatml": "I am a helpful model.<|im_end|>\n", "qwen": "I am a helpful model.<|im_end|>\n",
    "qwen2_5": "I am a helpful model.<|im_end|>\n", "qwen3": "I am a helpful model.<|im_end|>\n",
    "llama3": "I am a helpful model.<|eot_id|>", "llama3_1": "I am a helpful model.<|eot_id|>",
    "llama3_2": "I am a helpful model.<|eot_id|>", "llama": " I am a helpful model. </s>",
    "mistral": " I am a helpful model.</s>", "deepseek": " I am a helpful model.<｜end▁of▁sentence｜>",
    "deepseek_r1": "I am a helpful model.<｜end▁of▁sentence｜>",
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


def _kwargs(name):
    return {"date_string": DATE} if name == "llama3_2" else {}  # 3.2 would print today's date


def jinja_ids(tok, messages, add_generation_prompt=False, tools=None, name=None):
    return tok.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=False,
                                   add_generation_prompt=add_generation_prompt, **_kwargs(name))


def jinja_text(tok, messages, tools=None, name=None):
    return tok.apply_chat_template(messages, tools=tools, tokenize=False, **_kwargs(name))


def loss_text(tok, enc) -> str:
    return tok.decode([t for t, lab in zip(enc["input_ids"], enc["labels"]) if lab != IGNORE])


# ms-swift appends "+ignore_empty_think" to the loss scale of hybrid-thinking templates
# (swift/arguments/base_args/template_args.py, _set_loss_scale)
HYBRID_THINKING = {"qwen3"}


def expected_encoding(tok, name, messages, tools=None, loss_scale="default", train_empty_think=False):
    """(ids, labels) from the official rendering: tokens inside an assistant span carry loss."""
    skip_empty_think = loss_scale == "ignore_empty_think" or (
        name in HYBRID_THINKING and loss_scale != "all" and not train_empty_think)
    text = jinja_text(tok, messages, tools, name)
    starts, eot = ASSISTANT_SPANS[name]
    spans, pos = [], 0
    while True:
        hits = sorted((text.find(s, pos), s) for s in starts if text.find(s, pos) >= 0)
        if not hits:
            break
        begin = hits[0][0] + len(hits[0][1])
        end = text.index(eot, begin) + len(eot)
        if skip_empty_think and text.startswith(EMPTY_THINK, begin):
            begin += len(EMPTY_THINK)
        spans.append((begin, end))
        pos = end
    if loss_scale == "last_round":
        spans = spans[-1:]
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = []
    for tid, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
        assert not any(a < x < b for span in spans for x in span), "a token straddles a span boundary"
        inside = loss_scale == "all" or any(s <= a and b <= e for s, e in spans)
        labels.append(tid if inside else IGNORE)
    return enc["input_ids"], labels


def assert_matches_official(tok, name, swift_messages, official_messages=None, tools=None, loss_scale="default",
                            train_empty_think=False):
    official_messages = official_messages or swift_messages
    enc = get_template(tok, name, loss_scale=loss_scale, disable_ignore_empty_think=train_empty_think).encode(
        {"messages": swift_messages, "tools": json.dumps(tools) if tools else None})
    assert enc["input_ids"] == jinja_ids(tok, official_messages, tools=tools, name=name)
    ids, labels = expected_encoding(tok, name, official_messages, tools, loss_scale, train_empty_think)
    assert enc["input_ids"] == ids
    assert enc["labels"] == labels, (loss_text(tok, enc), loss_text(tok, {"input_ids": ids, "labels": labels}))
    return enc


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_full_conversation_equals_apply_chat_template(tokenizers, name):
    """Single turn, multi-turn, system message: full ids == apply_chat_template, prompt ids ==
    apply_chat_template(add_generation_prompt=True), loss mask == the official assistant spans."""
    tok = tokenizers[name]
    template = get_template(tok, name)
    for conv in CONVERSATIONS.values():
        assert_matches_official(tok, name, conv)
        assert template.encode_prompt(conv[:-1]) == jinja_ids(tok, conv[:-1], add_generation_prompt=True, name=name)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_end_of_sample_tokens(tokenizers, name):
    """A known row: the trained tokens are the response and the family's end of turn, at the very end
    of the sample (ChatML: <|im_end|> and then "\\n", both trained)."""
    tok = tokenizers[name]
    enc = get_template(tok, name).encode({"messages": CONVERSATIONS["single"]})
    trained = tok(SINGLE_TRAINED[name], add_special_tokens=False)["input_ids"]
    n = len(trained)
    assert sum(lab != IGNORE for lab in enc["labels"]) == n
    assert enc["input_ids"][-n:] == trained and enc["labels"][-n:] == trained
    if name in ("chatml", "qwen", "qwen2_5", "qwen3"):
        assert enc["input_ids"][-2:] == tok.convert_tokens_to_ids(["<|im_end|>", "Ċ"])


@pytest.mark.parametrize("name", ["chatml", "qwen2_5", "qwen3", "llama3_1", "deepseek_r1"])
@pytest.mark.parametrize("loss_scale", ["last_round", "all", "ignore_empty_think"])
def test_loss_scales_match_official_spans(tokenizers, name, loss_scale):
    tok = tokenizers[name]
    for conv in CONVERSATIONS.values():
        assert_matches_official(tok, name, conv, loss_scale=loss_scale)


def test_loss_scale_variants(tokenizers):
    tok = tokenizers["qwen2_5"]
    conv = CONVERSATIONS["three_turns"]
    texts = {ls: loss_text(tok, get_template(tok, "qwen2_5", loss_scale=ls).encode({"messages": conv}))
             for ls in ("default", "last_round", "all")}
    assert texts["default"] == "4 5<|im_end|>\nbecause.<|im_end|>\nyou are welcome!<|im_end|>\n"
    assert texts["last_round"] == "you are welcome!<|im_end|>\n"
    enc_all = get_template(tok, "qwen2_5", loss_scale="all").encode({"messages": conv})
    assert all(lab != IGNORE for lab in enc_all["labels"])
    with pytest.raises(ValueError, match="not supported yet"):
        get_template(tok, "qwen2_5", loss_scale="hermes")


def test_tiny_tokenizer_fits_tiny_model(tokenizers):
    from megatron_swift.model.tiny import TINY_VOCAB

    for name, tok in tokenizers.items():
        assert len(tok) <= TINY_VOCAB, name
        assert tok.chat_template and tok.eos_token
    for name in ("llama3", "llama3_1", "llama3_2", "llama", "mistral", "deepseek"):  # these add BOS
        assert tokenizers[name]("hi")["input_ids"][0] == tokenizers[name].bos_token_id, name
    assert tokenizers["qwen2_5"]("hi")["input_ids"][0] != tokenizers["qwen2_5"].eos_token_id
    assert tokenizers["llama3_1"].eos_token == "<|eot_id|>" and tokenizers["llama3_1"].pad_token is None
    assert tokenizers["mistral"].eos_token == "</s>" and tokenizers["mistral"].bos_token == "<s>"
    assert len(tokenizers["llama3_1"].tokenize("<|eom_id|><|python_tag|>")) == 2  # special tokens


# ------------------------------------------------------------------------------------- tool calls
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Get the weather",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]


def _call(args):
    return {"role": "tool_call", "content": json.dumps({"name": "get_weather", "arguments": args}, ensure_ascii=False)}


# hermes (Qwen2.5 / Qwen3): text + two parallel calls, two responses
SWIFT_TOOL_CONV = [
    {"role": "user", "content": "what is the weather in 北京?"},
    {"role": "assistant", "content": "Let me check."},
    _call({"city": "北京"}),
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
# Llama-3.1/3.2: one call per turn, no text next to it (what their template renders)
SWIFT_LLAMA_TOOL_CONV = [
    {"role": "system", "content": "You are a data model."},
    {"role": "user", "content": "what is the weather in 北京?"},
    _call({"city": "北京"}),
    {"role": "tool_response", "content": "hot"},
    {"role": "assistant", "content": "It is hot in 北京."},
    {"role": "user", "content": "and 上海?"},
    _call({"city": "上海"}),
    {"role": "tool_response", "content": "cold"},
    {"role": "assistant", "content": "Cold."},
]
OPENAI_LLAMA_TOOL_CONV = [
    {"role": "system", "content": "You are a data model."},
    {"role": "user", "content": "what is the weather in 北京?"},
    {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京"}}}]},
    {"role": "tool", "content": "hot"},
    {"role": "assistant", "content": "It is hot in 北京."},
    {"role": "user", "content": "and 上海?"},
    {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "上海"}}}]},
    {"role": "tool", "content": "cold"},
    {"role": "assistant", "content": "Cold."},
]


@pytest.mark.parametrize("name", ["qwen2_5", "qwen3"])
def test_tool_calls_match_hub_template(tokenizers, name):
    """tool_call / tool_response rows (+ tools) render as the hub's hermes-style tool template; the
    tool calls carry loss (with their <|im_end|>\\n), the tool responses do not."""
    tok = tokenizers[name]
    enc = assert_matches_official(tok, name, SWIFT_TOOL_CONV, OPENAI_TOOL_CONV, tools=TOOLS)
    prompt = get_template(tok, name).encode_prompt(SWIFT_TOOL_CONV[:-1], tools=TOOLS)
    assert prompt == jinja_ids(tok, OPENAI_TOOL_CONV[:-1], add_generation_prompt=True, tools=TOOLS)
    trained = loss_text(tok, enc)
    assert '"get_weather"' in trained and "Hot in" in trained and "</tool_call><|im_end|>\n" in trained
    assert "hot\n</tool_response>" not in trained and "<tool_response>" not in trained


@pytest.mark.parametrize("name", ["llama3_1", "llama3_2"])
def test_llama3_1_tool_calls_match_hub_template(tokenizers, name):
    """Tools in the first user turn, {"name", "parameters"} calls, ipython tool turns (JSON-encoded
    content, as the hub template writes it); calls trained, tool responses not."""
    tok = tokenizers[name]
    enc = assert_matches_official(tok, name, SWIFT_LLAMA_TOOL_CONV, OPENAI_LLAMA_TOOL_CONV, tools=TOOLS)
    prompt = get_template(tok, name).encode_prompt(SWIFT_LLAMA_TOOL_CONV[:-1], tools=TOOLS)
    assert prompt == jinja_ids(tok, OPENAI_LLAMA_TOOL_CONV[:-1], add_generation_prompt=True, tools=TOOLS, name=name)
    text, trained = tok.decode(enc["input_ids"]), loss_text(tok, enc)
    assert "Environment: ipython\n" in text and '<|start_header_id|>ipython<|end_header_id|>\n\n"hot"' in text
    assert trained == ('{"name": "get_weather", "parameters": {"city": "北京"}}<|eot_id|>It is hot in 北京.<|eot_id|>'
                       '{"name": "get_weather", "parameters": {"city": "上海"}}<|eot_id|>Cold.<|eot_id|>')
    with pytest.raises(TemplateError, match="one tool call"):  # the hub template raises too
        get_template(tok, name).encode({"messages": SWIFT_TOOL_CONV, "tools": json.dumps(TOOLS)})


def test_deepseek_r1_tool_outputs_match_hub_template(tokenizers):
    """DeepSeek-R1 tool outputs (<｜tool▁outputs▁begin｜> ...) as its template renders them; the call
    itself is the JSON text of the assistant turn (the template's own call syntax is not reproduced)."""
    tok = tokenizers["deepseek_r1"]
    call_text = "Let me check.\n" + json.dumps({"name": "get_weather", "arguments": {"city": "北京"}}, ensure_ascii=False)
    swift = [SWIFT_TOOL_CONV[0], SWIFT_TOOL_CONV[1], SWIFT_TOOL_CONV[2], SWIFT_TOOL_CONV[4], SWIFT_TOOL_CONV[5],
             SWIFT_TOOL_CONV[6]]
    official = [OPENAI_TOOL_CONV[0], {"role": "assistant", "content": call_text}, OPENAI_TOOL_CONV[2],
                OPENAI_TOOL_CONV[3], OPENAI_TOOL_CONV[4]]
    enc = assert_matches_official(tok, "deepseek_r1", swift, official)
    assert loss_text(tok, enc) == call_text + "<｜end▁of▁sentence｜>Hot in 北京, cold in 上海.<｜end▁of▁sentence｜>"


@pytest.mark.parametrize("name", ["chatml", "qwen", "llama3", "llama", "mistral", "deepseek"])
def test_tool_rows_without_hub_tool_syntax(tokenizers, name):
    """Families whose hub template has no tools: the call is the JSON text of the assistant turn
    (trained), the tool response a user-side turn (not trained)."""
    tok = tokenizers[name]
    conv = [SWIFT_TOOL_CONV[0], _call({"city": "北京"}), {"role": "tool_response", "content": "hot weather"},
            {"role": "assistant", "content": "It is hot."}]
    enc = get_template(tok, name).encode({"messages": conv})
    trained = loss_text(tok, enc)
    assert '{"name": "get_weather", "arguments": {"city": "北京"}}' in trained and "It is hot." in trained
    assert "hot weather" in tok.decode(enc["input_ids"]) and "hot weather" not in trained


# ------------------------------------------------------------------------------------- reasoning
def test_qwen3_thinking_and_empty_think(tokenizers):
    """History turns lose their reasoning, the last keeps it; a response without reasoning gets the
    empty think block (like the hub template), which carries no loss unless
    --disable_ignore_empty_think (ms-swift's default for hybrid-thinking templates)."""
    tok = tokenizers["qwen3"]
    conv = [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": "<think>\nstep one\n</think>\n\nhello"},
            {"role": "user", "content": "again"},
            {"role": "assistant", "content": "<think>\nstep two\n</think>\n\nfinal"}]
    enc = assert_matches_official(tok, "qwen3", conv)
    text = tok.decode(enc["input_ids"])
    assert "step one" not in text and "step two" in text
    assert loss_text(tok, enc) == "hello<|im_end|>\n<think>\nstep two\n</think>\n\nfinal<|im_end|>\n"

    plain = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    trained = assert_matches_official(tok, "qwen3", plain, train_empty_think=True)
    assert loss_text(tok, trained) == "<think>\n\n</think>\n\nhello<|im_end|>\n"
    for loss_scale in ("default", "ignore_empty_think", "last_round"):
        ignored = assert_matches_official(tok, "qwen3", plain, loss_scale=loss_scale)
        assert ignored["input_ids"] == trained["input_ids"]
        assert loss_text(tok, ignored) == "hello<|im_end|>\n"


def test_deepseek_r1_keeps_final_reasoning(tokenizers):
    """R1's template drops reasoning from every assistant turn of a full rendering; we drop it from
    history turns only and train the final turn's (what the model generates after <think>\\n)."""
    tok = tokenizers["deepseek_r1"]
    conv = [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": "<think>\nstep one\n</think>\n\nhello"},
            {"role": "user", "content": "again"},
            {"role": "assistant", "content": "<think>\nstep two\n</think>\n\nfinal"}]
    enc = get_template(tok, "deepseek_r1").encode({"messages": conv})
    expected = jinja_text(tok, conv[:-1]) + "<｜Assistant｜>" + conv[-1]["content"] + "<｜end▁of▁sentence｜>"
    assert enc["input_ids"] == tok(expected, add_special_tokens=False)["input_ids"]
    assert loss_text(tok, enc) == "\n\nhello<｜end▁of▁sentence｜>" + conv[-1]["content"] + "<｜end▁of▁sentence｜>"


# ------------------------------------------------------------------------------------- Llama-3.1+ / Mistral
@pytest.mark.parametrize("name", ["llama3_1", "llama3_2"])
def test_llama3_1_system_header_has_fixed_date(tokenizers, name):
    tok = tokenizers[name]
    text = tok.decode(get_template(tok, name).encode({"messages": CONVERSATIONS["single"]})["input_ids"])
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                           "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>")


def test_mistral_system_and_spacing(tokenizers):
    tok = tokenizers["mistral"]
    enc = get_template(tok, "mistral").encode({"messages": CONVERSATIONS["system_multi"]})
    assert tok.decode(enc["input_ids"]) == (
        "<s> [INST] You are a data model.\n\nwhat is the weather today? [/INST] It is hot.</s>"
        " [INST] and tomorrow in 北京? [/INST] Some water, 你好.</s>")
    assert loss_text(tok, enc) == " It is hot.</s> Some water, 你好.</s>"


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_roles_must_alternate(tokenizers, name):
    tok = tokenizers[name]
    bad = [{"role": "assistant", "content": "hi"}, {"role": "assistant", "content": "again"}]
    with pytest.raises(TemplateError, match="alternate"):
        get_template(tok, name).encode({"messages": bad})


def test_template_chosen_from_model(tokenizers):
    for name in ("qwen", "qwen2_5", "qwen3", "llama3", "llama3_1", "llama3_2", "llama", "mistral", "deepseek",
                 "deepseek_r1"):
        assert template_for_model(None, tokenizers[name].chat_template) == name
    assert template_for_model("qwen3", None) == "qwen3"
    assert template_for_model("llama", None) == "llama3"
    assert template_for_model("mistral", None) == "mistral" and template_for_model("mixtral", None) == "mistral"
    with pytest.raises(ValueError, match="--template"):
        template_for_model("gemma", None)
    assert get_template(tokenizers["llama3"], None).meta.name == "llama3"
    assert get_template(tokenizers["mistral"], None, model_type="mixtral").meta.name == "mistral"


# ------------------------------------------------------------------------------------- options
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
    are the swift backend's (trailing newline included)."""
    tok = tokenizers["chatml"]
    conv = CONVERSATIONS["system_multi"]
    jinja = get_template(tok, "chatml", template_backend="jinja")
    assert jinja.encode_prompt(conv[:-1]) == jinja_ids(tok, conv[:-1], add_generation_prompt=True)
    enc = jinja.encode({"messages": conv})
    assert enc == get_template(tok, "chatml").encode({"messages": conv})
    assert loss_text(tok, enc) == "It is hot.<|im_end|>\nSome water, 你好.<|im_end|>\n"


def test_preference_and_kto_encoding(tokenizers):
    tok = tokenizers["qwen2_5"]
    template = get_template(tok, "qwen2_5")
    row = {"messages": CONVERSATIONS["single"], "rejected_response": "No idea."}
    pair = template.encode(row, mode="pair")
    assert loss_text(tok, {"input_ids": pair["chosen_input_ids"], "labels": pair["chosen_labels"]}) == \
        "I am a helpful model.<|im_end|>\n"
    assert loss_text(tok, {"input_ids": pair["rejected_input_ids"], "labels": pair["rejected_labels"]}) == \
        "No idea.<|im_end|>\n"
    kto = template.encode({"messages": CONVERSATIONS["single"], "label": False}, mode="kto")
    assert kto["label"] is False and "input_ids" in kto
    with pytest.raises(TemplateError, match="rejected_response"):
        template.encode({"messages": CONVERSATIONS["single"]}, mode="pair")


def test_fingerprint_changes_with_what_changes_the_labels(tokenizers):
    """Dataset caches are keyed by the template's fingerprint: a setting that changes the labels
    must change it (a stale cache trained the empty think block after the default changed)."""
    tok = tokenizers["qwen3"]
    base = get_template(tok, "qwen3").fingerprint()
    assert get_template(tok, "qwen3").fingerprint() == base
    assert get_template(tok, "qwen3", disable_ignore_empty_think=True).fingerprint() != base
    assert get_template(tok, "qwen3", loss_scale="last_round").fingerprint() != base
