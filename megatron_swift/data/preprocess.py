"""Row formats -> one normalized row (what the templates read).

Accepted rows (after ``--columns`` renames):
  messages       ``[{"role": "system"|"user"|"assistant"|"tool_call"|"tool_response"|"tool", "content": ...}]``;
                 OpenAI ``tool_calls`` on an assistant message and role ``tool`` are accepted too
  conversations  ShareGPT ``[{"from": "system"|"human"|"gpt"|"function_call"|"observation", "value": ...}]``
  alpaca         ``instruction`` [+ ``input``] + ``output`` (+ ``system``, ``history``)
  query          ``query`` + ``response`` (+ ``history`` = [[q, r], ...], ``system``)
  text           ``text`` (continued pre-training: the whole text is the "response")
plus ``system``, ``tools`` (list or JSON), ``rejected_response`` (DPO/RM/...), ``label`` (KTO),
``chosen``/``rejected`` (strings, or message lists as in HH-RLHF), ``margin`` (a number: the reward
model's Bradley-Terry margin of the pair, as TRL's RewardTrainer).

Normalized row::

    {"messages": [{"role", "content"}], "tools": str | None,
     "rejected_response": str | None, "label": bool | None, "margin": float | None}

A row that cannot be normalized raises :class:`RowError` with a short ``kind`` (for the drop
counts in the log) and a readable reason. A row with media (non-empty ``images``/``audios``/
``videos``) raises :class:`UnsupportedRowError` instead: multimodal training is not built, and such a
row is a configuration mistake that stops the run, not a bad row to drop.
"""

from __future__ import annotations

import json
import re
from typing import Any, Dict, List, Optional

ROLES = ("system", "user", "assistant", "tool_call", "tool_response")
_ROLE_ALIASES = {
    "human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant", "chatgpt": "assistant",
    "function_call": "tool_call", "observation": "tool_response", "function": "tool_response",
    "tool": "tool_response", "ipython": "tool_response",
}
# extra column names (ms-swift's standard aliases) -> the names the formats use
_COLUMN_ALIASES = {
    "prompt": "query", "question": "query", "problem": "query",
    "answer": "response", "completion": "response", "solution": "response",
    "rejected": "rejected_response",
}
_CJK = re.compile(r"[\u4e00-\u9fff]")
MEDIA_COLUMNS = ("images", "audios", "videos")
# what a prompt row's conversation is made of; its other columns (``solution``...) travel to the GRPO
# reward functions as keyword arguments (``extra``, JSON)
PROMPT_COLUMNS = ("messages", "conversations", "system", "tools", "query", "prompt", "question", "problem",
                  "instruction", "input", "history") + MEDIA_COLUMNS


class RowError(ValueError):
    def __init__(self, kind: str, detail: str = ""):
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind
        self.detail = detail


class UnsupportedRowError(ValueError):
    """A row this stack cannot train on at all (media columns): stops preprocessing at its file:line."""


def _text(value, where: str, allow_none: bool = False) -> Optional[str]:
    if value is None:
        if allow_none:
            return None
        raise RowError("wrong type", f"{where} is missing (null)")
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):  # OpenAI content parts
        parts = []
        for p in value:
            if p.get("type", "text") != "text" or not isinstance(p.get("text"), str):
                raise RowError("wrong type", f"{where}: only text content parts are supported")
            parts.append(p["text"])
        return "".join(parts)
    raise RowError("wrong type", f"{where} must be a string, got {type(value).__name__}")


def _messages_from_openai(msgs: Any, key: str = "messages") -> List[dict]:
    if not isinstance(msgs, list):
        raise RowError("wrong type", f"'{key}' must be a list, got {type(msgs).__name__}")
    if not msgs:
        raise RowError("empty conversation", f"'{key}' is empty")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise RowError("wrong type", f"{key}[{i}] must be an object, got {type(m).__name__}")
        role_key = "role" if "role" in m else "from" if "from" in m else None
        content_key = "content" if "content" in m else "value" if "value" in m else None
        if role_key is None:
            raise RowError("missing role", f"{key}[{i}] has no 'role'")
        role = m[role_key]
        if not isinstance(role, str):
            raise RowError("wrong type", f"{key}[{i}].{role_key} must be a string")
        role = _ROLE_ALIASES.get(role.lower(), role.lower())
        if role not in ROLES:
            raise RowError("unknown role", f"{key}[{i}] has role {m[role_key]!r}")
        tool_calls = m.get("tool_calls")
        if content_key is None and not tool_calls:
            raise RowError("missing content", f"{key}[{i}] has no 'content'")
        content = _text(m.get(content_key) if content_key else None, f"{key}[{i}].{content_key or 'content'}",
                        allow_none=bool(tool_calls) or role == "tool_call")
        if role == "tool_call" and not isinstance(content, str):
            if isinstance(m.get(content_key), dict):
                content = json.dumps(m[content_key], ensure_ascii=False)
            else:
                raise RowError("wrong type", f"{key}[{i}]: tool_call content must be a JSON object or string")
        if content is not None or not tool_calls:
            out.append({"role": role, "content": content if content is not None else ""})
        if tool_calls:
            if role != "assistant" or not isinstance(tool_calls, list):
                raise RowError("wrong type", f"{key}[{i}].tool_calls must be a list on an assistant message")
            for call in tool_calls:
                fn = call.get("function", call) if isinstance(call, dict) else None
                if not isinstance(fn, dict) or "name" not in fn:
                    raise RowError("wrong type", f"{key}[{i}].tool_calls: each call needs a function name")
                out.append({"role": "tool_call", "content": json.dumps(
                    {"name": fn["name"], "arguments": fn.get("arguments", {})}, ensure_ascii=False)})
    return out


def _history_messages(history: Any) -> List[dict]:
    if history is None:
        return []
    if isinstance(history, str):
        try:
            history = json.loads(history)
        except json.JSONDecodeError:
            raise RowError("wrong type", "'history' must be a list of [query, response] pairs") from None
    if not isinstance(history, list):
        raise RowError("wrong type", "'history' must be a list of [query, response] pairs")
    out = []
    for i, pair in enumerate(history):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise RowError("wrong type", f"history[{i}] must be a [query, response] pair")
        out.append({"role": "user", "content": _text(pair[0], f"history[{i}][0]")})
        out.append({"role": "assistant", "content": _text(pair[1], f"history[{i}][1]")})
    return out


def _check_conversation(messages: List[dict], require_response: bool) -> None:
    prev = None
    n = len(messages)
    for i, m in enumerate(messages):
        role = m["role"]
        if role == "system":
            if i != 0:
                raise RowError("misplaced system", f"messages[{i}]: a system message must come first")
        elif role == "user":
            if prev == "user":
                raise RowError("roles out of order", f"messages[{i}]: two user messages in a row")
        elif role == "tool_response":
            if prev not in ("tool_call", "tool_response"):
                raise RowError("roles out of order", f"messages[{i}]: a tool_response must follow a tool_call")
        elif role == "assistant":
            if prev == "assistant":
                raise RowError("roles out of order", f"messages[{i}]: two assistant messages in a row")
            followed_by_call = i + 1 < n and messages[i + 1]["role"] == "tool_call"
            if not m["content"].strip() and not followed_by_call:
                raise RowError("empty assistant turn", f"messages[{i}] has empty content")
        elif role == "tool_call":
            if not m["content"].strip():
                raise RowError("empty assistant turn", f"messages[{i}]: empty tool_call")
        prev = role
    if require_response:
        if not any(m["role"] in ("assistant", "tool_call") for m in messages):
            raise RowError("no response", "the conversation has no assistant message")
        if messages[-1]["role"] not in ("assistant", "tool_call"):
            raise RowError("no response", "the conversation does not end with an assistant message")


def _replace_self_cognition(messages: List[dict], row: dict, model_name, model_author) -> None:
    def pick(names, zh: bool):
        if not names:
            return None
        names = [names] if isinstance(names, str) else list(names)
        return names[0] if zh or len(names) == 1 else names[1]

    tag = row.get("tag")
    for m in messages:
        c = m["content"]
        if "{{NAME}}" not in c and "{{AUTHOR}}" not in c:
            continue
        zh = tag == "zh" if tag in ("zh", "en") else bool(_CJK.search(c))
        name, author = pick(model_name, zh), pick(model_author, zh)
        if name is not None:
            c = c.replace("{{NAME}}", name)
        if author is not None:
            c = c.replace("{{AUTHOR}}", author)
        m["content"] = c


def _columns(row: dict) -> str:
    keys = ", ".join(sorted(k for k in row if not k.startswith("__"))) or "none"
    return f"columns: {keys}; rename with --columns"


def normalize_row(row: Any, *, columns: Optional[Dict[str, str]] = None, model_name=None, model_author=None,
                  require_response: bool = True) -> dict:
    """One raw row (dict or JSON text) -> the normalized row; raises RowError."""
    if isinstance(row, str):
        try:
            row = json.loads(row)
        except json.JSONDecodeError as e:
            raise RowError("bad JSON", f"{e.msg} (column {e.colno})") from None
    if not isinstance(row, dict):
        raise RowError("wrong type", f"a row must be a JSON object, got {type(row).__name__}")
    if "__bad_row__" in row:
        raise RowError(row.get("__bad_kind__") or "malformed row", row["__bad_row__"])
    if columns:
        row = {columns.get(k, k): v for k, v in row.items()}
    extra = None
    if not require_response:  # a prompt row (GRPO): keep the other columns for the reward functions
        extra = json.dumps({k: v for k, v in row.items() if k not in PROMPT_COLUMNS and not k.startswith("__")},
                           ensure_ascii=False, default=str)
    for col in MEDIA_COLUMNS:
        if row.get(col) not in (None, "", [], {}):
            raise UnsupportedRowError(f"column {col!r} is not empty: multimodal training is not supported (text "
                                      f"only); remove the {col!r} column or its values")
    for alias, std in _COLUMN_ALIASES.items():
        if alias in row and std not in row:
            if alias == "rejected" and isinstance(row[alias], list):
                continue
            row[std] = row.pop(alias)
    if isinstance(row.get("chosen"), str) and "response" not in row:  # prompt/chosen/rejected strings
        row["response"] = row.pop("chosen")

    system = _text(row.get("system"), "system", allow_none=True)
    rejected = row.get("rejected_response")
    if "messages" in row and row["messages"] is not None:
        messages = _messages_from_openai(row["messages"])
    elif "conversations" in row and row["conversations"] is not None:
        messages = _messages_from_openai(row["conversations"], "conversations")
    elif "chosen" in row and isinstance(row["chosen"], list):  # HH-RLHF style message lists
        messages = _messages_from_openai(row["chosen"], "chosen")
        rej = row.get("rejected")
        if isinstance(rej, list) and rej:
            rej_msgs = _messages_from_openai(rej, "rejected")
            rejected = rej_msgs[-1]["content"]
    elif "instruction" in row:
        instruction = _text(row["instruction"], "instruction")
        extra = _text(row.get("input"), "input", allow_none=True)
        query = f"{instruction}\n{extra}" if instruction and extra else (instruction or extra or "")
        if require_response and "output" not in row and "response" not in row:
            raise RowError("no response", f"an 'instruction' row needs an 'output' column ({_columns(row)})")
        response = _text(row.get("output", row.get("response")), "output", allow_none=not require_response)
        messages = _history_messages(row.get("history")) + [{"role": "user", "content": query}]
        if response is not None:
            messages.append({"role": "assistant", "content": response})
    elif "query" in row or "response" in row:
        query = _text(row.get("query"), "query", allow_none=True) or ""
        if require_response and "response" not in row:
            raise RowError("no response", f"a 'query' row needs a 'response' column ({_columns(row)})")
        response = _text(row.get("response"), "response", allow_none=not require_response)
        messages = _history_messages(row.get("history")) + [{"role": "user", "content": query}]
        if response is not None:
            messages.append({"role": "assistant", "content": response})
    elif "text" in row:
        messages = [{"role": "assistant", "content": _text(row["text"], "text")}]
    else:
        raise RowError("unknown format", f"no messages/conversations/instruction/query/text column ({_columns(row)})")
    if system is not None and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system})
    _check_conversation(messages, require_response)
    if model_name or model_author:
        _replace_self_cognition(messages, row, model_name, model_author)

    tools = row.get("tools")
    if tools is not None and not isinstance(tools, str):
        if not isinstance(tools, list):
            raise RowError("wrong type", "'tools' must be a list of tool schemas or a JSON string")
        tools = json.dumps(tools, ensure_ascii=False)
    elif isinstance(tools, str) and tools.strip():
        try:
            if not isinstance(json.loads(tools), list):
                raise RowError("wrong type", "'tools' must be a JSON list")
        except json.JSONDecodeError as e:
            raise RowError("bad JSON", f"'tools' is not valid JSON ({e.msg})") from None
    else:
        tools = None
    if rejected is not None:
        rejected = _text(rejected, "rejected_response")
    label = row.get("label")
    if label is not None:
        if isinstance(label, str):
            if label.strip().lower() not in ("true", "false", "1", "0"):
                raise RowError("wrong type", f"'label' must be a boolean, got {label!r}")
            label = label.strip().lower() in ("true", "1")
        elif isinstance(label, (bool, int)) and label in (0, 1):
            label = bool(label)
        else:
            raise RowError("wrong type", f"'label' must be a boolean, got {label!r}")
    margin = row.get("margin")
    if margin is not None:
        if isinstance(margin, bool) or not isinstance(margin, (int, float, str)):
            raise RowError("wrong type", f"'margin' must be a number, got {margin!r}")
        try:
            margin = float(margin)
        except ValueError:
            raise RowError("wrong type", f"'margin' must be a number, got {margin!r}") from None
        if margin != margin or margin in (float("inf"), float("-inf")):
            raise RowError("wrong type", f"'margin' must be a finite number, got {margin!r}")
    return {"messages": messages, "tools": tools, "rejected_response": rejected, "label": label, "margin": margin,
            "extra": extra}


def normalized_features():
    from datasets import Features, List as DList, Value

    return Features({
        "messages": DList({"role": Value("string"), "content": Value("string")}),
        "tools": Value("string"),
        "rejected_response": Value("string"),
        "label": Value("bool"),
        "margin": Value("float64"),
        "extra": Value("string"),
        "__file": Value("string"),
        "__line": Value("int64"),
        "__error": Value("string"),
        "__error_kind": Value("string"),
    })
