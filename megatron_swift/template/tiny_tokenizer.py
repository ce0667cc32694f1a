"""Small real tokenizers for tests and demos (the hubs are out of reach here).

``make_tiny_tokenizer(dir, template_name)`` trains a byte-level BPE (the pre-tokenizer regex of
Qwen2 / Llama-3) on a small generated corpus, adds the template family's special tokens, sets the
family's official chat template (``chat_templates/*.jinja``) and saves a loadable tokenizer
(``AutoTokenizer.from_pretrained(dir)``). Everything is deterministic; the vocabulary (special
tokens included) fits ``vocab_size`` (default 1000, the tiny models' vocab).
"""

from __future__ import annotations

import os
import random
from typing import Optional

from .templates import TEMPLATES
from .registry import load_chat_template

# The pre-tokenizer split of Qwen2 (and, up to the digit rule, Llama-3 / tiktoken cl100k).
PRETOKENIZE_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                     r"|\s*[\r\n]+|\s+(?!\S)|\s+")

_WORDS = (
    "the a an of to and in is it you that he was for on are with as I his they be at one have this from or had "
    "by hot word but what some we can out other were all there when up use your how said each she which do "
    "their time if will way about many then them write would like so these her long make thing see him two has "
    "look more day could go come did number sound no most people my over know water than call first who may "
    "down side been now find any new work part take get place made live where after back little only round man "
    "year came show every good me give our under name very through just form sentence great think say help low "
    "line differ turn cause much mean before move right boy old too same tell does set three want air well also "
    "play small end put home read hand port large spell add even land here must big high such follow act why "
    "ask men change went light kind off need house picture try us again animal point mother world near build "
    "self earth father model data train loss token batch answer question hello thanks please weather city "
    "today tomorrow python code function result value list text user assistant system tool call response "
    "think reason step first second final because therefore so answer is Qwen Llama DeepSeek Alibaba Cloud "
    "helpful honest created You are am who what where when why how"
).split()
_CHINESE = "你好我是一个助手请问今天天气怎么样谢谢模型训练数据中文回答问题北京上海"
_PUNCT = [".", ",", "?", "!", ":", ";", "'s", " -", " (", ")", "\"", "{", "}", "[", "]", "\n", "\n\n", "  "]
_TEMPLATE_TEXT = [
    "system\n", "user\n", "assistant\n", "[INST] ", " [/INST]", "<<SYS>>\n", "\n<</SYS>>\n\n", "User: ",
    "\n\nAssistant:", "Assistant: ", "# Tools\n\nYou may call one or more functions to assist with the user query.",
    "You are provided with function signatures within", "XML tags", '{"name": "get_weather", "arguments": {"city": ',
    '{"type": "function", "function": {"name": ', '"parameters": {"type": "object", "properties": {',
    "For each function call, return a json object with function name and arguments within",
    "<function-name>", "<args-json-object>", "You are a helpful assistant.",
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.", "ipython",
]


def _corpus(n_lines: int = 3000, seed: int = 0):
    rng = random.Random(seed)
    for i in range(n_lines):
        k = rng.randint(3, 18)
        words = []
        for _ in range(k):
            r = rng.random()
            if r < 0.78:
                words.append(rng.choice(_WORDS))
            elif r < 0.86:
                words.append(str(rng.randint(0, 2025)))
            elif r < 0.93:
                words.append("".join(rng.choice(_CHINESE) for _ in range(rng.randint(1, 4))))
            else:
                words.append(rng.choice(_PUNCT).strip() or ".")
        line = " ".join(words)
        if rng.random() < 0.3:
            line = line.capitalize() + rng.choice([".", "?", "!"])
        if i % 7 == 0:
            line = rng.choice(_TEMPLATE_TEXT) + line
        yield line


def make_tiny_tokenizer(output_dir: Optional[str], template_name: str, vocab_size: int = 1000):
    """Builds (and, when ``output_dir`` is given, saves) a tiny tokenizer for ``template_name``.

    Returns the ``transformers`` fast tokenizer. Special tokens: the family's (e.g. ``<|im_start|>``,
    ``<|im_end|>``, ``<|endoftext|>`` for ChatML), plus ``<think>`` / ``<tool_call>`` ... where the
    family has them; ``bos``/``eos``/``pad`` set as in the family's published tokenizer_config.json
    and a BOS post-processor for the families whose tokenizers add one (Llama, Mistral, DeepSeek).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if template_name not in TEMPLATES:
        raise ValueError(f"unknown template {template_name!r}; built-in: {', '.join(sorted(TEMPLATES))}")
    meta = TEMPLATES[template_name]
    specials = list(dict.fromkeys(meta.special_tokens))
    added = list(meta.added_tokens)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(added), special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    if meta.add_bos and meta.bos_token:
        bos_id = tok.token_to_id(meta.bos_token)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{meta.bos_token} $A", pair=f"{meta.bos_token} $A {meta.bos_token} $B",
            special_tokens=[(meta.bos_token, bos_id)],
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    kwargs = dict(eos_token=meta.eos_token)
    if meta.bos_token:
        kwargs["bos_token"] = meta.bos_token
    if meta.pad_token:
        kwargs["pad_token"] = meta.pad_token
    if "<unk>" in specials:
        kwargs["unk_token"] = "<unk>"
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **kwargs)
    extra_specials = [s for s in specials if s not in kwargs.values()]
    if extra_specials:
        hf.add_special_tokens({"additional_special_tokens": extra_specials})
    if added:
        hf.add_tokens(added)
    if len(hf) > vocab_size:
        raise AssertionError(f"tiny tokenizer has {len(hf)} tokens > vocab_size {vocab_size}")
    hf.chat_template = load_chat_template(template_name)
    hf.model_max_length = 32768
    if output_dir is not None:
        os.makedirs(output_dir, exist_ok=True)
        hf.save_pretrained(output_dir)
    return hf
