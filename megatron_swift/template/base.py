"""Chat templates: normalized messages -> token ids + a loss mask.

A template renders a conversation into *segments*: pieces of text tagged with what they are
(prompt text, a response, the end-of-turn marker after a response, an empty ``<think>`` block).
``--loss_scale`` decides which segments carry loss; adjacent segments with the same loss flag are
joined and tokenized as one string (``add_special_tokens=False``), so the ids of a whole training
conversation are exactly the ids of the tokenizer's own ``apply_chat_template(messages,
tokenize=True)`` for the same messages, and prompt ids those of ``add_generation_prompt=True``
(``tests/test_templates.py`` checks both for every built-in template).

Input rows are the normalized rows of :mod:`megatron_swift.data.preprocess`::

    {"messages": [{"role": "system"|"user"|"assistant"|"tool_call"|"tool_response",
                   "content": str}, ...],
     "tools": Optional[str],              # JSON list of tool schemas
     "rejected_response": Optional[str],  # DPO / RM / ORPO ...
     "label": Optional[bool]}             # KTO

Output of :meth:`Template.encode`: ``{"input_ids": [...], "labels": [...]}``, *not* shifted:
``labels[i]`` is ``input_ids[i]`` where token ``i`` carries loss, else -100. The batching code
shifts them into the trainer's format (``labels[t]`` = target of position ``t``).

Which tokens carry loss (``--loss_scale``):
  default             every assistant response (tool calls included) and the end-of-turn text
                      right after it; never system, user, tool responses or role headers
  last_round          only the last assistant response (+ its end-of-turn)
  all                 every token
  ignore_empty_think  like default, but an empty ``<think>\\n\\n</think>\\n\\n`` block at the start
                      of a response carries no loss (Qwen3 renders one when the data has none).
                      Hybrid-thinking templates (qwen3) do this under every loss scale but ``all``,
                      as ms-swift does, unless ``--disable_ignore_empty_think true``.

The end-of-turn text is what ms-swift's templates put after a response (their ``suffix`` at the
end of a sample, ``chat_sep`` + the dynamic-EOS labelling after history turns) and is trained the
same way; a sample ends where the hub template's full rendering ends:

  chatml, qwen, qwen2_5, qwen3   ``<|im_end|>`` + ``"\\n"`` (both trained, the last turn too)
  llama3, llama3_1, llama3_2     ``<|eot_id|>``
  llama                          ``" </s>"`` (the template's space before EOS, then EOS)
  mistral                        ``</s>``
  deepseek, deepseek_r1          ``<｜end▁of▁sentence｜>``

A response is the assistant text as the hub template renders it in the full conversation, so
history turns can differ from the final one: Qwen3 drops the reasoning of turns before the last
user query and writes a ``<think>`` block (empty when the data has none) only after it; DeepSeek-R1
drops the reasoning of history turns (its template drops it from every turn; we keep the final
turn's, which is what the model is trained to generate after its ``<think>\\n`` prompt).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100

# segment kinds
PROMPT = "prompt"  # no loss (system, user, tool responses, role headers, separators)
RESPONSE = "response"  # assistant text (incl. tool calls)
EMPTY_THINK = "empty_think"  # "<think>\n\n</think>\n\n" with nothing inside
EOT = "eot"  # end-of-turn text that closes a response (<|im_end|>\n, <|eot_id|>, eos), trained like it

SUPPORTED_LOSS_SCALES = ("default", "last_round", "all", "ignore_empty_think")
EMPTY_THINK_TEXT = "<think>\n\n</think>\n\n"


class TemplateError(ValueError):
    """A row the template cannot encode (wrong roles, empty response, ...)."""


class MaxLengthError(TemplateError):
    """A sample longer than --max_length with --truncation_strategy delete."""


@dataclass
class Segment:
    text: str
    kind: str = PROMPT
    turn: int = -1  # index of the assistant turn a response/eot segment belongs to


@dataclass
class Turn:
    """One message of a conversation in OpenAI form (what the jinja templates see)."""

    role: str  # user | assistant | tool
    content: str = ""
    tool_calls: Optional[List[dict]] = None  # [{"name": str, "arguments": dict | str}]


@dataclass
class Conversation:
    system: Optional[str]  # the row's own system message (None: not given)
    turns: List[Turn]
    tools: Optional[List[Any]] = None


def parse_tool_call(content: str) -> dict:
    """``tool_call`` message content (JSON ``{"name", "arguments"}``) -> dict; arguments stay as given
    unless they are a JSON string of an object, which is parsed (what the hub templates render)."""
    try:
        call = json.loads(content) if isinstance(content, str) else content
    except json.JSONDecodeError as e:
        raise TemplateError(f"tool_call content is not JSON: {e.msg}") from None
    if isinstance(call, dict) and "function" in call and isinstance(call["function"], dict):
        call = call["function"]
    if not isinstance(call, dict) or "name" not in call:
        raise TemplateError("tool_call content must be a JSON object with 'name' and 'arguments'")
    args = call.get("arguments", {})
    if isinstance(args, str):
        try:
            parsed = json.loads(args)
            if isinstance(parsed, dict):
                args = parsed
        except json.JSONDecodeError:
            pass
    return {"name": call["name"], "arguments": args}


def to_conversation(messages: Sequence[dict], tools=None) -> Conversation:
    """Normalized messages -> Conversation (leading system split off; assistant text + following
    tool_call messages become one assistant turn; tool_response -> role tool)."""
    msgs = list(messages)
    system = None
    if msgs and msgs[0]["role"] == "system":
        system = msgs[0]["content"]
        msgs = msgs[1:]
    turns: List[Turn] = []
    for m in msgs:
        role, content = m["role"], m.get("content")
        if role == "system":
            raise TemplateError("a system message is only supported as the first message")
        if role == "user":
            turns.append(Turn("user", content or ""))
        elif role == "assistant":
            turns.append(Turn("assistant", content if content is not None else ""))
        elif role == "tool_call":
            call = parse_tool_call(content)
            if turns and turns[-1].role == "assistant":
                turns[-1].tool_calls = (turns[-1].tool_calls or []) + [call]
            else:
                turns.append(Turn("assistant", "", [call]))
        elif role in ("tool_response", "tool"):
            turns.append(Turn("tool", content or ""))
        else:
            raise TemplateError(f"unknown role {role!r}")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools) if tools.strip() else None
        except json.JSONDecodeError as e:
            raise TemplateError(f"tools is not valid JSON: {e.msg}") from None
    return Conversation(system, turns, tools or None)


def tool_call_json(call: dict, arguments_as_is: bool = False) -> str:
    """``{"name": "...", "arguments": ...}`` the way the hub templates write it (json.dumps defaults,
    ensure_ascii=False; Qwen3 writes string arguments verbatim)."""
    args = call["arguments"]
    args_text = args if (arguments_as_is and isinstance(args, str)) else json.dumps(args, ensure_ascii=False)
    return '{"name": "' + str(call["name"]) + '", "arguments": ' + args_text + "}"


@dataclass
class TemplateMeta:
    """A built-in template: how to render a conversation, plus its tokenizer-side facts."""

    name: str
    render: Callable  # (meta, conv: Conversation, system: Optional[str], add_generation_prompt, response_prefix) -> [Segment]
    default_system: Optional[str] = None
    response_prefix: str = ""  # appended to generation prompts (inference); e.g. "<think>\n"
    jinja_file: Optional[str] = None  # chat_templates/<file>: the hub's chat_template (reference/tests)
    # tokenizer facts, used by make_tiny_tokenizer and for the pt (generation) template
    bos_token: Optional[str] = None
    eos_token: str = "<|endoftext|>"
    pad_token: Optional[str] = None
    special_tokens: Tuple[str, ...] = ()
    added_tokens: Tuple[str, ...] = ()  # non-special added tokens (<think>, <tool_call>, ...)
    add_bos: bool = False  # the tokenizer prepends bos_token when add_special_tokens=True
    stop_words: Tuple[str, ...] = ()
    extra: Dict[str, Any] = field(default_factory=dict)


class Template:
    """Encodes normalized rows with a built-in template (``template_backend='swift'``) or with the
    tokenizer's own ``apply_chat_template`` (``'jinja'``)."""

    def __init__(self, tokenizer, meta: TemplateMeta, *, system: Optional[str] = None,
                 max_length: Optional[int] = None, truncation_strategy: str = "delete",
                 loss_scale: str = "default", response_prefix: Optional[str] = None,
                 use_chat_template: bool = True, template_backend: str = "swift",
                 disable_ignore_empty_think: bool = False):
        if loss_scale not in SUPPORTED_LOSS_SCALES:
            raise ValueError(f"--loss_scale {loss_scale!r} is not supported yet; supported: "
                             f"{', '.join(SUPPORTED_LOSS_SCALES)}")
        if truncation_strategy not in ("delete", "left", "right"):
            raise ValueError(f"--truncation_strategy {truncation_strategy!r}: expected delete, left or right")
        if template_backend not in ("swift", "jinja"):
            raise ValueError(f"--template_backend {template_backend!r}: expected swift or jinja")
        if template_backend == "jinja" and not getattr(tokenizer, "chat_template", None):
            raise ValueError("--template_backend jinja: the tokenizer has no chat_template")
        self.tokenizer = tokenizer
        self.meta = meta
        self.system = system
        self.max_length = max_length
        self.truncation_strategy = truncation_strategy
        self.loss_scale = loss_scale
        # ms-swift appends "+ignore_empty_think" to the loss scale of hybrid-thinking templates: the
        # empty block the template renders before an answer without reasoning is not what to learn
        self.ignore_empty_think = loss_scale == "ignore_empty_think" or (
            bool(meta.extra.get("hybrid_thinking")) and not disable_ignore_empty_think)
        self._explicit_response_prefix = response_prefix
        self.response_prefix = meta.response_prefix if response_prefix is None else response_prefix
        self.use_chat_template = use_chat_template
        self.template_backend = template_backend

    @property
    def name(self) -> str:
        return self.meta.name if self.use_chat_template else f"{self.meta.name} (generation)"

    # ------------------------------------------------------------------ tokens
    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        if tok.pad_token_id is not None:
            return tok.pad_token_id
        if tok.eos_token_id is not None:
            return tok.eos_token_id
        return 0

    def _bos_ids(self) -> List[int]:
        """What the tokenizer prepends on its own (``encode('')`` with special tokens)."""
        if getattr(self, "_bos_cache", None) is None:
            self._bos_cache = list(self.tokenizer("", add_special_tokens=True)["input_ids"])
        return self._bos_cache

    def _tokenize_many(self, texts: List[str]) -> List[List[int]]:
        """``tokenizer(texts, add_special_tokens=False)``; straight to the Rust tokenizer when there is one
        (same ids, without transformers' per-encoding Python conversion)."""
        if not texts:
            return []
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None and not getattr(self.tokenizer, "split_special_tokens", False):
            return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
        return self.tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]

    def fingerprint(self) -> str:
        """Stable hash of everything that changes the encoding (for dataset caches)."""
        import hashlib

        tok = self.tokenizer
        h = hashlib.sha256()
        backend = getattr(tok, "backend_tokenizer", None)
        h.update(backend.to_str().encode() if backend is not None else repr(tok).encode())
        h.update(json.dumps([
            self.meta.name, self.system, self.max_length, self.truncation_strategy, self.loss_scale,
            self.response_prefix, self.use_chat_template, self.template_backend, self.ignore_empty_think,
            getattr(tok, "chat_template", None) if self.template_backend == "jinja" else None,
            _CODE_VERSION,
        ]).encode())
        return h.hexdigest()[:16]

    # ------------------------------------------------------------------ rendering
    def _effective_system(self, conv: Conversation) -> Optional[str]:
        # data system > --system > template default
        if conv.system is not None:
            return conv.system
        if self.system is not None:
            return self.system
        return self.meta.default_system

    def render(self, conv: Conversation, add_generation_prompt: bool = False) -> List[Segment]:
        if not self.use_chat_template:
            return self._render_generation(conv, add_generation_prompt)
        return self.meta.render(self.meta, conv, self._effective_system(conv), add_generation_prompt,
                                self.response_prefix if add_generation_prompt else "")

    def _render_generation(self, conv: Conversation, add_generation_prompt: bool) -> List[Segment]:
        """``--use_chat_template false`` (``megatron pt``): the last query and response as plain text,
        the tokenizer's BOS (if it adds one) in front and EOS after the response."""
        turns = conv.turns
        last_asst = max((i for i, t in enumerate(turns) if t.role == "assistant"), default=-1)
        segs: List[Segment] = []
        bos_ids = self._bos_ids()
        bos = self.tokenizer.decode(bos_ids) if bos_ids else ""
        if add_generation_prompt or last_asst < 0:
            query = turns[-1].content if turns and turns[-1].role != "assistant" else ""
            segs.append(Segment(bos + query, PROMPT))
            return segs
        query = next((t.content for t in reversed(turns[:last_asst]) if t.role != "assistant"), "")
        response = turns[last_asst].content
        if turns[last_asst].tool_calls:
            response += "".join("\n" + tool_call_json(c) for c in turns[last_asst].tool_calls)
        segs.append(Segment(bos + query, PROMPT))
        segs.append(Segment(response, RESPONSE, 0))
        segs.append(Segment(self.tokenizer.eos_token or "", EOT, 0))
        return segs

    def _loss_flags(self, segs: List[Segment]) -> List[Tuple[str, bool]]:
        last_turn = max((s.turn for s in segs if s.kind in (RESPONSE, EOT, EMPTY_THINK)), default=-1)
        out = []
        for s in segs:
            if not s.text:
                continue
            if self.loss_scale == "all":
                loss = True
            elif s.kind == PROMPT:
                loss = False
            elif s.kind == EMPTY_THINK and self.ignore_empty_think:
                loss = False
            elif self.loss_scale == "last_round":
                loss = s.turn == last_turn
            else:
                loss = True
            out.append((s.text, loss))
        return out

    @staticmethod
    def _merge(pieces: List[Tuple[str, bool]]) -> List[Tuple[str, bool]]:
        merged: List[Tuple[str, bool]] = []
        for text, loss in pieces:
            if merged and merged[-1][1] == loss:
                merged[-1] = (merged[-1][0] + text, loss)
            else:
                merged.append((text, loss))
        return merged

    # ------------------------------------------------------------------ planning (no tokenization yet)
    def _plan_training(self, messages, tools) -> List[Tuple[str, bool]]:
        conv = to_conversation(messages, tools)
        if not any(t.role == "assistant" for t in conv.turns):
            raise TemplateError("no assistant message to train on")
        if conv.turns[-1].role != "assistant":
            raise TemplateError("the last message must be an assistant (or tool_call) message")
        if self.template_backend == "jinja":
            return self._plan_jinja(conv)
        return self._merge(self._loss_flags(self.render(conv, add_generation_prompt=False)))

    def _plan_jinja(self, conv: Conversation) -> List[Tuple[str, bool]]:
        """Loss spans from the tokenizer's own chat template: render growing prefixes of the
        conversation; the text an assistant message adds after its generation prompt is its response."""
        messages = self.to_openai_messages(conv)
        tools = conv.tools
        tok = self.tokenizer
        pieces: List[Tuple[str, bool]] = []
        done = ""
        asst_idx = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        last = asst_idx[-1] if asst_idx else -1
        for i in asst_idx:
            prompt = tok.apply_chat_template(messages[:i], tools=tools, tokenize=False, add_generation_prompt=True)
            full = tok.apply_chat_template(messages[:i + 1], tools=tools, tokenize=False)
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise TemplateError("the tokenizer's chat template is not prefix-stable; use --template_backend swift")
            loss = self.loss_scale in ("default", "ignore_empty_think", "all") or i == last
            pieces.append((prompt[len(done):], self.loss_scale == "all"))
            pieces.append((full[len(prompt):], loss))
            done = full
        return self._merge([p for p in pieces if p[0]])

    def to_openai_messages(self, conv: Conversation) -> List[dict]:
        msgs = []
        system = self._effective_system(conv) if self.template_backend == "jinja" else conv.system
        if system is not None:
            msgs.append({"role": "system", "content": system})
        for t in conv.turns:
            m = {"role": t.role, "content": t.content}
            if t.tool_calls:
                m["tool_calls"] = [{"type": "function", "function": c} for c in t.tool_calls]
            msgs.append(m)
        return msgs

    # ------------------------------------------------------------------ encoding
    def _finish(self, chunks: List[Tuple[List[int], bool]], check_loss: bool = True) -> Dict[str, List[int]]:
        input_ids: List[int] = []
        labels: List[int] = []
        for ids, loss in chunks:
            input_ids.extend(ids)
            labels.extend(ids if loss else [IGNORE_INDEX] * len(ids))
        n = len(input_ids)
        if self.max_length is not None and n > self.max_length:
            if self.truncation_strategy == "delete":
                raise MaxLengthError(f"{n} tokens > --max_length {self.max_length}")
            if self.truncation_strategy == "left":
                input_ids, labels = input_ids[-self.max_length:], labels[-self.max_length:]
            else:
                input_ids, labels = input_ids[:self.max_length], labels[:self.max_length]
        if check_loss and all(x == IGNORE_INDEX for x in labels):
            raise TemplateError("no token carries loss (after truncation)")
        return {"input_ids": input_ids, "labels": labels}

    def encode_many(self, rows: Sequence[dict], mode: str = "sft") -> List[Any]:
        """Encodes rows; returns, per row, the encoded dict or the exception that row raised.

        ``mode``: ``sft``/``pt`` -> input_ids, labels; ``pair`` (dpo, rm, orpo, simpo, cpo) ->
        chosen_/rejected_ input_ids and labels; ``kto`` -> input_ids, labels, label;
        ``prompt`` (grpo, gkd, ppo) -> input_ids of the prompt (generation prompt included).
        All texts of all rows are tokenized in one tokenizer call.
        """
        plans: List[Any] = []
        for row in rows:
            try:
                plans.append(self._plan_row(row, mode))
            except TemplateError as e:
                plans.append(e)
        texts = [t for p in plans if not isinstance(p, Exception) for part in p.values() for t, _ in part]
        all_ids = self._tokenize_many(texts)
        pos = 0
        out: List[Any] = []
        for row, plan in zip(rows, plans):
            if isinstance(plan, Exception):
                out.append(plan)
                continue
            parts = {}
            for key, part in plan.items():
                parts[key] = [(all_ids[pos + j], loss) for j, (_, loss) in enumerate(part)]
                pos += len(part)
            try:
                enc: Dict[str, Any] = {}
                for key, chunks in parts.items():
                    done = self._finish(chunks, check_loss=key != "prompt")
                    if key == "prompt":
                        enc["input_ids"] = done["input_ids"]
                    elif key == "main":
                        enc.update(done)
                    else:
                        enc[f"{key}_input_ids"] = done["input_ids"]
                        enc[f"{key}_labels"] = done["labels"]
                if mode == "kto":
                    enc["label"] = bool(row.get("label"))
                if mode == "pair" and row.get("margin") is not None:
                    enc["margin"] = float(row["margin"])
                out.append(enc)
            except TemplateError as e:
                out.append(e)
        return out

    def _plan_row(self, row: dict, mode: str) -> Dict[str, List[Tuple[str, bool]]]:
        messages, tools = row["messages"], row.get("tools")
        if mode in ("sft", "pt"):
            return {"main": self._plan_training(messages, tools)}
        if mode == "pair":
            rejected = row.get("rejected_response")
            if rejected is None or rejected == "":
                raise TemplateError("no rejected_response for a preference row")
            if not messages or messages[-1]["role"] != "assistant":
                raise TemplateError("the last message must be the chosen assistant response")
            if rejected == messages[-1].get("content"):
                raise TemplateError("the chosen and rejected responses are the same (nothing to prefer)")
            rejected_messages = list(messages[:-1]) + [{"role": "assistant", "content": rejected}]
            return {"chosen": self._plan_training(messages, tools),
                    "rejected": self._plan_training(rejected_messages, tools)}
        if mode == "kto":
            if row.get("label") is None:
                raise TemplateError("no label for a KTO row")
            return {"main": self._plan_training(messages, tools)}
        if mode == "prompt":
            msgs = list(messages)
            while msgs and msgs[-1]["role"] in ("assistant", "tool_call"):
                msgs.pop()
            return {"prompt": [(self.prompt_text(msgs, tools), False)]}
        raise ValueError(f"unknown encode mode {mode!r}")

    def encode(self, row: dict, mode: str = "sft") -> Dict[str, Any]:
        """Encodes one row; raises TemplateError / MaxLengthError."""
        result = self.encode_many([row], mode)[0]
        if isinstance(result, Exception):
            raise result
        return result

    # ------------------------------------------------------------------ inference prompts
    def prompt_text(self, messages: Sequence[dict], tools=None) -> str:
        """The text of a generation prompt (messages end with a user / tool message)."""
        conv = to_conversation(messages, tools)
        if self.template_backend == "jinja":
            text = self.tokenizer.apply_chat_template(self.to_openai_messages(conv), tools=conv.tools,
                                                      tokenize=False, add_generation_prompt=True)
            return text + (self._explicit_response_prefix or "")
        return "".join(s.text for s in self.render(conv, add_generation_prompt=True))

    def encode_prompt(self, messages: Sequence[dict], tools=None) -> List[int]:
        return self._tokenize_many([self.prompt_text(messages, tools)])[0]


_CODE_VERSION = 3  # bump when encodings change (dataset cache fingerprints)
