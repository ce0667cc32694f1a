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
llama          Llama-2 chat                                llama.jinja (Llama-2-chat)
deepseek       DeepSeek-LLM chat (v1/V2-Lite)              deepseek.jinja (deepseek-llm-7b-chat)
deepseek_r1    DeepSeek-R1 (distill)                       deepseek_r1.jinja (DeepSeek-R1)
=============  ==========================================  ====================================

Tool calls: the ChatML family renders them the way Qwen2.5/Qwen3 do (hermes ``<tool_call>`` blocks,
tool responses as a user turn of ``<tool_response>`` blocks, the tool list in the system prompt).
The other families have no tool syntax in their hub templates; there a tool call is the JSON
object as the assistant's text and a tool response is a user-side turn.
"""

from __future__ import annotations

import json
from typing import Dict, List, Optional

from .base import (EMPTY_THINK, EMPTY_THINK_TEXT, EOT, RESPONSE, SEP, Conversation, Segment, TemplateError,
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
            segs.append(Segment("<|im_end|>", EOT, turn_no))
            segs.append(Segment("\n", SEP, turn_no))
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

TEMPLATES: Dict[str, TemplateMeta] = {
    "chatml": TemplateMeta("chatml", render_chatml, jinja_file="chatml.jinja", **_QWEN_TOKENS),
    "qwen": TemplateMeta("qwen", render_chatml, default_system="You are a helpful assistant.",
                         jinja_file="qwen.jinja", **_QWEN_TOKENS),
    "qwen2_5": TemplateMeta("qwen2_5", render_chatml,
                            default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
                            jinja_file="qwen2_5.jinja", **_QWEN_TOKENS),
    "qwen3": TemplateMeta("qwen3", render_chatml, jinja_file="qwen3.jinja", extra={"style": "qwen3"},
                          **_QWEN_TOKENS),
    "llama3": TemplateMeta(
        "llama3", render_llama3, jinja_file="llama3.jinja", bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
        special_tokens=("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                        "<|eot_id|>"),
        add_bos=True, stop_words=("<|eot_id|>", "<|end_of_text|>"),
    ),
    "llama": TemplateMeta(
        "llama", render_llama2, jinja_file="llama.jinja", bos_token="<s>", eos_token="</s>", pad_token=None,
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
        if "<|start_header_id|>" in ct:
            return "llama3"
        if "[INST]" in ct and "<<SYS>>" in ct:
            return "llama"
        if "<|im_start|>" in ct:
            if "enable_thinking" in ct or "reasoning_content" in ct:
                return "qwen3"
            if "You are Qwen, created by Alibaba Cloud" in ct:
                return "qwen2_5"
            if "You are a helpful assistant" in ct:
                return "qwen"
            return "chatml"
    by_type = {"qwen3": "qwen3", "qwen3_moe": "qwen3", "qwen2": "qwen2_5", "qwen2_moe": "qwen", "llama": "llama3"}
    if model_type in by_type:
        return by_type[model_type]
    raise ValueError(
        f"cannot choose a chat template for model_type {model_type!r}"
        + (" (its tokenizer's chat_template matches no built-in family)" if ct else " (its tokenizer has no chat_template)")
        + f"; pass --template (one of: {', '.join(template_names())})"
    )
