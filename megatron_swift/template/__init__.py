"""Chat templates: normalized rows -> ``input_ids`` + ``labels`` (loss mask).

Public API::

    template = get_template(tokenizer, "qwen2_5", max_length=2048, loss_scale="default")
    template = template_from_args(args, tokenizer)          # --template/--system/--max_length/...
    template.encode(row)            # {"input_ids": [...], "labels": [...]} (labels not shifted)
    template.encode_many(rows, mode="sft"|"pt"|"pair"|"kto"|"prompt")
    template.encode_prompt(messages)   # inference prompt ids (generation prompt + response_prefix)
    make_tiny_tokenizer(dir, "qwen3")  # a small real tokenizer with the family's chat template
"""

from .base import (IGNORE_INDEX, SUPPORTED_LOSS_SCALES, MaxLengthError, Template, TemplateError, TemplateMeta,
                   to_conversation)
from .registry import get_template, load_chat_template, template_from_args
from .templates import TEMPLATES, template_for_model, template_names
from .tiny_tokenizer import make_tiny_tokenizer

__all__ = ["IGNORE_INDEX", "SUPPORTED_LOSS_SCALES", "MaxLengthError", "Template", "TemplateError", "TemplateMeta",
           "TEMPLATES", "get_template", "load_chat_template", "make_tiny_tokenizer", "template_for_model",
           "template_from_args", "template_names", "to_conversation"]
