"""The built-in templates. Each renderer reproduces the hub's chat template of its family (the
jinja strings in ``chat_templates/``) as segments; see ``base.py`` for what a segment is.

=============  ==========================================  ====================================
name           models                                      hub chat template reproduced
=============  ==========================================  ====================================
chatml         any ChatML model without a default system   chatml.jinja
qwen           Qwen1.5 / Qwen2 chat                        qwen.jinja (Qwen2-Instruct)
qwen2_5        Qwen2.5 instruct (tools: hermes)            qwen2_5.jinja (Qwen2.5-Instruct)
qwen3          Qwen3 (thinking, empty-think, tools)        qwen3.jinja (Qwen3)
llama3         Llama-3 instruct                            llama3.jinja (Meta-Llama-3-Instruct)
llama3_1       Llama-3.1 / 3.3 instruct (tools: JSON)      llama3_1.jinja (Llama-3.1-8B-Instruct)
llama3_2       Llama-3.2 instruct (tools: JSON)            llama3_2.jinja (Llama-3.2-1B-Instruct)
llama          Llama-2 chat                                llama.jinja (Llama-2-chat)
mistral        Mistral-7B-Instruct v0.1/v0.2, Mixtral      mistral.jinja (Mixtral-8x7B-Instruct-v0.1)
deepseek       DeepSeek-LLM chat (v1/V2-Lite)              deepseek.jinja (deepseek-llm-7b-chat)
deepseek_r1    DeepSeek-R1 (distill)                       deepseek_r1.jinja (DeepSeek-R1)
=============  ==========================================  ====================================

Tool calls: the ChatML family renders them the way Qwen2.5/Qwen3 do (hermes ``<tool_call>`` blocks,
tool responses as a user turn of ``<tool_response>`` blocks, the tool list in the system prompt).
Llama-3.1/3.2 render them the way their hub template does (the tool list in the first user turn,
one ``{"name": ..., "parameters": ...}`` call per assistant turn, tool responses as ``ipython``
turns holding the JSON-encoded content). The other families have no tool syntax in their hub
templates; there a tool call is the JSON object as the assistant's text and a tool response is a
user-side turn.

Llama-3.1+ "Today Date": the hub templates print ``Cutting Knowledge Date: December 2023`` and
``Today Date: <date_string>`` in the system header; 3.1/3.3 default ``date_string`` to
``26 Jul 2024``, 3.2 to the day the template is rendered (``strftime_now``), and ms-swift's
``llama3_2`` uses the day the process started. Here it is always ``26 Jul 2024`` (``date_string``
in the template's ``extra``): a training sample must not change with the calendar (dataset caches,
resumed runs, comparisons between runs). Pass ``date_string="26 Jul 2024"`` to a Llama-3.2
tokenizer's ``apply_chat_template`` to reproduce our ids.

Mistral: the template of Mistral-7B-Instruct-v0.1/v0.2 and Mixtral-8x7B-Instruct-v0.1 (system
message folded into the first user turn, ``" [INST] ... [/INST]"``, ``" " + response + "</s>"``).
Later Mistral templates (v0.3 control tokens, ``[SYSTEM_PROMPT]``, ``[AVAILABLE_TOOLS]``) differ
in spacing and are not reproduced; use ``--template_backend jinja`` for them.
"""

from __future__ import annotations

import json
from typing import Dict, List, Optional

from .base import (EMPTY_THINK, EMPTY_THINK_TEXT, EOT, RESPONSE, Conversation, Segment, TemplateError,
                   TemplateMeta, tool_call_json)

QWEN_TOOLS_HEADER = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                     "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
QWEN_TOOLS_FOOTER = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                     "within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, "
                     "\"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n")


def _response(segs: List[Segment], text: str, turn: int) -> None:
    """A response; a leading empty think block becomes its own segment (ignore_empty_think)."""
    if text.startswith(EMPTY_THINK_TEXT):
        segs.append(Segment(EMPTY_THINK_TEXT, EMPTY_THINK, turn))
        text = text[len(EMPTY_THINK_TEXT):]
    if text:
        segs.append(Segment(text, RESPONSE, turn))


def _tools_text(tools) -> str:
    return "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools)


# ---------------------------------------------------------------------------------------- ChatML
def render_chatml(meta: TemplateMeta, conv: Conversation, system: Optional[str], add_generation_prompt: bool,
                  response_prefix: str) -> List[Segment]:
    style = meta.extra.get("style", "qwen2_5")  # qwen2_5 | qwen3
    segs: List[Segment] = []
    turns = conv.turns
    if conv.tools:
        text = "<|im_start|>system\n"
        if style == "qwen3":
            text += (system + "\n\n") if system is not None else ""
        else:
            text += (system or "") + "\n\n"
        segs.append(Segment(text + QWEN_TOOLS_HEADER + _tools_text(conv.tools) + QWEN_TOOLS_FOOTER))
    elif system is not None:
        segs.append(Segment(f"<|im_start|>system\n{system}<|im_end|>\n"))

    last_query = len(turns) - 1  # Qwen3: assistant turns after the last real user query keep reasoning
    if style == "qwen3":
        for i in range(len(turns) - 1, -1, -1):
            t = turns[i]
            if t.role == "user" and not (t.content.startswith("<tool_response>")
                                         and t.content.endswith("</tool_response>")):
                last_query = i
                break

    turn_no = 0
    for i, t in enumerate(turns):
        if t.role == "user":
            segs.append(Segment(f"<|im_start|>user\n{t.content}<|im_end|>\n"))
        elif t.role == "tool":
            first = i == 0 or turns[i - 1].role != "tool"
            last = i == len(turns) - 1 or turns[i + 1].role != "tool"
            segs.append(Segment(("<|im_start|>user" if first else "") + "\n<tool_response>\n" + t.content
                                + "\n</tool_response>" + ("<|im_end|>\n" if last else "")))
        else:  # assistant
            segs.append(Segment("<|im_start|>assistant\n"))
            content = t.content
            if style == "qwen3":
                reasoning = ""
                if "</think>" in content:
                    reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
                    content = content.split("</think>")[-1].lstrip("\n")
                body = content
                if i > last_query and (i == len(turns) - 1 or reasoning):
                    body = "<think>\n" + reasoning.strip("\n") + "\n</think>\n\n" + content.lstrip("\n")
                for j, call in enumerate(t.tool_calls or []):
                    if (j == 0 and content) or j > 0:
                        body += "\n"
                    body += "<tool_call>\n" + tool_call_json(call, arguments_as_is=True) + "\n</tool_call>"
            elif t.tool_calls:
                body = ("\n" + content if content else "")
                for call in t.tool_calls:
                    body += "\n<tool_call>\n" + tool_call_json(call) + "\n</tool_call>"
                body = body[1:]  # the leading "\n" belongs to the "assistant\n" header
            else:
                body = content
            _response(segs, body, turn_no)
            # the "\n" after <|im_end|> is part of the end of turn: the hub template ends a full
            # conversation with it and ms-swift's ChatML suffix / chat_sep ("<|im_end|>\n") train it
            segs.append(Segment("<|im_end|>\n", EOT, turn_no))
            turn_no += 1
    if add_generation_prompt:
        segs.append(Segment("<|im_start|>assistant\n" + response_prefix))
    return segs


# ---------------------------------------------------------------------------------------- Llama-3
def render_llama3(meta, conv, system, add_generation_prompt, response_prefix) -> List[Segment]:
    segs: List[Segment] = []
    bos = meta.bos_token or ""
    first = True

    def header(role):
        nonlocal first
        text = (bos if first else "") + f"<|start_header_id|>{role}<|end_header_id|>\n\n"
        first = False
        return text

    if system is not None:
        segs.append(Segment(header("system") + system.strip() + "<|eot_id|>"))
    turn_no = 0
    for t in conv.turns:
        if t.role in ("user", "tool"):
            role = "user" if t.role == "user" else "ipython"
            segs.append(Segment(header(role) + t.content.strip() + "<|eot_id|>"))
        else:
            segs.append(Segment(header("assistant")))
            body = _with_json_tool_calls(t)
            _response(segs, body.strip(), turn_no)
            segs.append(Segment("<|eot_id|>", EOT, turn_no))
            turn_no += 1
    if add_generation_prompt:
        segs.append(Segment(header("assistant") + response_prefix))
    return segs


LLAMA3_1_TOOLS_PREAMBLE = (
    "Given the following functions, please respond with a JSON for a function call with its proper arguments "
    "that best answers the given prompt.\n\nRespond in the format {\"name\": function name, \"parameters\": "
    "dictionary of argument name and its value}.Do not use variables.\n\n")


def render_llama3_1(meta, conv, system, add_generation_prompt, response_prefix) -> List[Segment]:
    """Llama-3.1 / 3.2 / 3.3: a system header is always written (knowledge cutoff, a fixed "Today
    Date", then the system text); tools go into the first user turn."""
    segs: List[Segment] = []
    turns = list(conv.turns)
    head = (meta.bos_token or "") + "<|start_header_id|>system<|end_header_id|>\n\n"
    if conv.tools:
        head += "Environment: ipython\n"
    head += "Cutting Knowledge Date: December 2023\nToday Date: " + meta.extra["date_string"] + "\n\n"
    segs.append(Segment(head + (system or "").strip() + "<|eot_id|>"))
    if conv.tools:
        if not turns or turns[0].role != "user":
            raise TemplateError(f"{meta.name} template: tools need a first user message to go into")
        first = turns.pop(0)
        segs.append(Segment("<|start_header_id|>user<|end_header_id|>\n\n" + LLAMA3_1_TOOLS_PREAMBLE
                            + "".join(json.dumps(t, ensure_ascii=False, indent=4) + "\n\n" for t in conv.tools)
                            + first.content.strip() + "<|eot_id|>"))
    turn_no = 0
    for t in turns:
        if t.role == "user":
            segs.append(Segment("<|start_header_id|>user<|end_header_id|>\n\n" + t.content.strip() + "<|eot_id|>"))
        elif t.role == "tool":  # the hub template JSON-encodes the content (a string gets quotes)
            segs.append(Segment("<|start_header_id|>ipython<|end_header_id|>\n\n"
                                + json.dumps(t.content, ensure_ascii=False) + "<|eot_id|>"))
        else:
            segs.append(Segment("<|start_header_id|>assistant<|end_header_id|>\n\n"))
            if t.tool_calls:
                if len(t.tool_calls) != 1:
                    raise TemplateError(f"{meta.name} template: one tool call per assistant turn "
                                        "(the model's template supports no parallel calls)")
                call = t.tool_calls[0]
                body = '{"name": "' + str(call["name"]) + '", "parameters": ' \
                    + json.dumps(call["arguments"], ensure_ascii=False) + "}"
                # the hub template drops the text of a turn with a tool call; we keep it in front
                # (a row the hub template cannot render faithfully either way)
                if t.content.strip():
                    body = t.content.strip() + "\n" + body
            else:
                body = t.content.strip()
            _response(segs, body, turn_no)
            segs.append(Segment("<|eot_id|>", EOT, turn_no))
            turn_no += 1
    if add_generation_prompt:
        segs.append(Segment("<|start_header_id|>assistant<|end_header_id|>\n\n" + response_prefix))
    return segs


def _with_json_tool_calls(t) -> str:
    body = t.content
    for call in t.tool_calls or []:
        body += ("\n" if body else "") + tool_call_json(call)
    return body


# ---------------------------------------------------------------------------------------- Llama-2
def render_llama2(meta, conv, system, add_generation_prompt, response_prefix) -> List[Segment]:
    segs: List[Segment] = []
    bos, eos = meta.bos_token or "", meta.eos_token
    turn_no = 0
    for i, t in enumerate(conv.turns):
        is_user = t.role in ("user", "tool")
        if is_user != (i % 2 == 0):
            raise TemplateError("llama template: roles must alternate user/assistant/user/assistant/...")
        if is_user:
            content = t.content
            if i == 0 and system is not None:
                content = "<<SYS>>\n" + system + "\n<</SYS>>\n\n" + content
            segs.append(Segment(bos + "[INST] " + content.strip() + " [/INST]"))
        else:
            _response(segs, " " + _with_json_tool_calls(t).strip(), turn_no)
            segs.append(Segment(" " + eos, EOT, turn_no))
            turn_no += 1
    if add_generation_prompt and response_prefix:
        segs.append(Segment(response_prefix))
    return segs


# ---------------------------------------------------------------------------------------- Mistral
def render_mistral(meta, conv, system, add_generation_prompt, response_prefix) -> List[Segment]:
    """One BOS, then " [INST] " + query + " [/INST]" and " " + response + EOS per round (no
    stripping); the system text goes in front of the first query."""
    segs: List[Segment] = [Segment(meta.bos_token or "")]
    turn_no = 0
    for i, t in enumerate(conv.turns):
        is_user = t.role in ("user", "tool")
        if is_user != (i % 2 == 0):
            raise TemplateError("mistral template: roles must alternate user/assistant/user/assistant/...")
        if is_user:
            content = t.content if i > 0 or system is None else system + "\n\n" + t.content
            segs.append(Segment(" [INST] " + content + " [/INST]"))
        else:
            _response(segs, " " + _with_json_tool_calls(t), turn_no)
            segs.append(Segment(meta.eos_token, EOT, turn_no))
            turn_no += 1
    if add_generation_prompt and response_prefix:
        segs.append(Segment(response_prefix))
    return segs


# ---------------------------------------------------------------------------------------- DeepSeek
def render_deepseek(meta, conv, system, add_generation_prompt, response_prefix) -> List[Segment]:
    segs: List[Segment] = [Segment(meta.bos_token or "")]
    if system is not None:
        segs.append(Segment(system + "\n\n"))
    turn_no = 0
    for t in conv.turns:
        if t.role in ("user", "tool"):
            segs.append(Segment("User: " + t.content + "\n\n"))
        else:
            segs.append(Segment("Assistant:"))
            _response(segs, " " + _with_json_tool_calls(t), turn_no)
            segs.append(Segment(meta.eos_token, EOT, turn_no))
            turn_no += 1
    if add_generation_prompt:
        segs.append(Segment("Assistant:" + response_prefix))
    return segs


def render_deepseek_r1(meta, conv, system, add_generation_prompt, response_prefix) -> List[Segment]:
    segs: List[Segment] = [Segment((meta.bos_token or "") + (system or ""))]
    eos = meta.eos_token
    turns = conv.turns
    last_asst = max((i for i, t in enumerate(turns) if t.role == "assistant"), default=-1)
    turn_no = 0
    in_tool = False
    for i, t in enumerate(turns):
        if t.role == "user":
            in_tool = False
            segs.append(Segment("<｜User｜>" + t.content))
        elif t.role == "tool":
            segs.append(Segment(("\n" if in_tool else "<｜tool▁outputs▁begin｜>") + "<｜tool▁output▁begin｜>"
                                + t.content + "<｜tool▁output▁end｜>"))
            in_tool = True
        else:
            content = _with_json_tool_calls(t)
            if i != last_asst and "</think>" in content:  # history turns lose their reasoning
                content = content.split("</think>")[-1]
            segs.append(Segment("<｜tool▁outputs▁end｜>" if in_tool else "<｜Assistant｜>"))
            in_tool = False
            _response(segs, content, turn_no)
            segs.append(Segment(eos, EOT, turn_no))
            turn_no += 1
    if in_tool:
        segs.append(Segment("<｜tool▁outputs▁end｜>"))
    elif add_generation_prompt:
        segs.append(Segment("<｜Assistant｜>" + response_prefix))
    return segs


# ---------------------------------------------------------------------------------------- registry
_QWEN_TOKENS = dict(
    eos_token="<|im_end|>", pad_token="<|endoftext|>",
    special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
    added_tokens=("<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"),
    stop_words=("<|im_end|>", "<|endoftext|>"),
)

# Llama-3.1/3.2 instruct tokenizer_config.json: bos <|begin_of_text|>, eos <|eot_id|>, no pad; the
# tokenizer adds BOS. <|eom_id|> ends a built-in (ipython) tool call; date_string: see the module doc.
_LLAMA3_1_TOKENS = dict(
    bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
    special_tokens=("<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|start_header_id|>",
                    "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"),
    add_bos=True, stop_words=("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"), extra={"date_string": "26 Jul 2024"},
)

TEMPLATES: Dict[str, TemplateMeta] = {
    "chatml": TemplateMeta("chatml", render_chatml, jinja_file="chatml.jinja", **_QWEN_TOKENS),
    "qwen": TemplateMeta("qwen", render_chatml, default_system="You are a helpful assistant.",
                         jinja_file="qwen.jinja", **_QWEN_TOKENS),
    "qwen2_5": TemplateMeta("qwen2_5", render_chatml,
                            default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
                            jinja_file="qwen2_5.jinja", **_QWEN_TOKENS),
    "qwen3": TemplateMeta("qwen3", render_chatml, jinja_file="qwen3.jinja",
                          extra={"style": "qwen3", "hybrid_thinking": True},
                          **_QWEN_TOKENS),
    "llama3": TemplateMeta(
        "llama3", render_llama3, jinja_file="llama3.jinja", bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
        special_tokens=("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                        "<|eot_id|>"),
        add_bos=True, stop_words=("<|eot_id|>", "<|end_of_text|>"),
    ),
    "llama3_1": TemplateMeta("llama3_1", render_llama3_1, jinja_file="llama3_1.jinja", **_LLAMA3_1_TOKENS),
    "llama3_2": TemplateMeta("llama3_2", render_llama3_1, jinja_file="llama3_2.jinja", **_LLAMA3_1_TOKENS),
    "llama": TemplateMeta(
        "llama", render_llama2, jinja_file="llama.jinja", bos_token="<s>", eos_token="</s>", pad_token=None,
        special_tokens=("<unk>", "<s>", "</s>"), add_bos=True, stop_words=("</s>",),
    ),
    "mistral": TemplateMeta(
        "mistral", render_mistral, jinja_file="mistral.jinja", bos_token="<s>", eos_token="</s>", pad_token=None,
        special_tokens=("<unk>", "<s>", "</s>"), add_bos=True, stop_words=("</s>",),
    ),
    "deepseek": TemplateMeta(
        "deepseek", render_deepseek, jinja_file="deepseek.jinja", bos_token="<｜begin▁of▁sentence｜>",
        eos_token="<｜end▁of▁sentence｜>", pad_token="<｜end▁of▁sentence｜>",
        special_tokens=("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"), add_bos=True,
        stop_words=("<｜end▁of▁sentence｜>",),
    ),
    "deepseek_r1": TemplateMeta(
        "deepseek_r1", render_deepseek_r1, jinja_file="deepseek_r1.jinja", response_prefix="<think>\n",
        bos_token="<｜begin▁of▁sentence｜>", eos_token="<｜end▁of▁sentence｜>", pad_token="<｜end▁of▁sentence｜>",
        special_tokens=("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
                        "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>",
                        "<｜tool▁output▁end｜>"),
        added_tokens=("<think>", "</think>"), add_bos=True, stop_words=("<｜end▁of▁sentence｜>",),
    ),
}


def template_names() -> List[str]:
    return sorted(TEMPLATES)


def template_for_model(model_type: Optional[str] = None, chat_template: Optional[str] = None) -> str:
    """Picks the built-in template of a model: from its tokenizer's chat template when it has one
    (the signature strings of each family), else from config.json's model_type."""
    ct = chat_template or ""
    if isinstance(ct, dict):  # several named templates
        ct = ct.get("default", "") or ""
    if ct:
        if "<｜Assistant｜>" in ct:
            return "deepseek_r1"
        if "'User: '" in ct and "Assistant:" in ct:
            return "deepseek"
        if "Cutting Knowledge Date" in ct:  # Llama-3.1+; 3.2 dates the header with strftime_now
            return "llama3_2" if "strftime_now" in ct else "llama3_1"
        if "<|start_header_id|>" in ct:
            return "llama3"
        if "[INST]" in ct:
            return "llama" if "<<SYS>>" in ct else "mistral"
        if "<|im_start|>" in ct:
            if "enable_thinking" in ct or "reasoning_content" in ct:
                return "qwen3"
            if "You are Qwen, created by Alibaba Cloud" in ct:
                return "qwen2_5"
            if "You are a helpful assistant" in ct:
                return "qwen"
            return "chatml"
    from megatron_swift.model.families import family_for

    try:
        default = family_for(model_type).template if model_type else None
    except ValueError:
        default = None
    if default is not None:  # the family's declared default template
        return default
    raise ValueError(
        f"cannot choose a chat template for model_type {model_type!r}"
        + (" (its tokenizer's chat_template matches no built-in family)" if ct else " (its tokenizer has no chat_template)")
        + f"; pass --template (one of: {', '.join(template_names())})"
    )
