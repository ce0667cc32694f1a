"""Choosing and building a template from parsed arguments."""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Optional

from .base import Template
from .templates import TEMPLATES, template_for_model, template_names

CHAT_TEMPLATE_DIR = os.path.join(os.path.dirname(__file__), "chat_templates")


@lru_cache(maxsize=None)
def load_chat_template(template_name: str) -> str:
    """The family's published chat template (jinja source) as stored in ``chat_templates/``."""
    meta = TEMPLATES[template_name]
    if meta.jinja_file is None:
        raise ValueError(f"template {template_name!r} has no reference chat template")
    with open(os.path.join(CHAT_TEMPLATE_DIR, meta.jinja_file), encoding="utf-8") as f:
        text = f.read()
    return text[:-1] if text.endswith("\n") else text


def _read_system(system: Optional[str]) -> Optional[str]:
    """``--system`` is a string or a .txt file path."""
    if system and system.endswith(".txt") and os.path.isfile(system):
        with open(system, encoding="utf-8") as f:
            return f.read()
    return system


def get_template(tokenizer, template: Optional[str] = None, *, model_type: Optional[str] = None,
                 system: Optional[str] = None, max_length: Optional[int] = None,
                 truncation_strategy: str = "delete", loss_scale: str = "default",
                 response_prefix: Optional[str] = None, use_chat_template: bool = True,
                 template_backend: str = "swift", disable_ignore_empty_think: bool = False) -> Template:
    """Builds a Template. ``template=None`` picks the model's (tokenizer chat_template, then
    ``model_type``)."""
    if template is None:
        try:
            template = template_for_model(model_type, getattr(tokenizer, "chat_template", None))
        except ValueError:
            if use_chat_template:
                raise
            template = "chatml"  # the generation template (megatron pt) does not use the chat format
    if template not in TEMPLATES:
        raise ValueError(f"--template {template!r} is not a built-in template; choose one of: "
                         f"{', '.join(template_names())}")
    return Template(tokenizer, TEMPLATES[template], system=_read_system(system), max_length=max_length,
                    truncation_strategy=truncation_strategy, loss_scale=loss_scale,
                    response_prefix=response_prefix, use_chat_template=use_chat_template,
                    template_backend=template_backend, disable_ignore_empty_think=disable_ignore_empty_think)


def template_from_args(args, tokenizer, max_length: Optional[int] = None) -> Template:
    """Template from parsed arguments (TemplateArguments fields; ``max_length`` defaults to
    ``args.max_length``, else the model's ``max_position_embeddings`` from ``args.hf_config``)."""
    hf_config = getattr(args, "hf_config", None) or {}
    if max_length is None:
        max_length = getattr(args, "max_length", None) or hf_config.get("max_position_embeddings")
    return get_template(
        tokenizer, getattr(args, "template", None), model_type=hf_config.get("model_type"),
        system=getattr(args, "system", None), max_length=max_length,
        truncation_strategy=getattr(args, "truncation_strategy", "delete"),
        loss_scale=getattr(args, "loss_scale", "default"), response_prefix=getattr(args, "response_prefix", None),
        use_chat_template=getattr(args, "use_chat_template", True),
        template_backend=getattr(args, "template_backend", "swift"),
        disable_ignore_empty_think=getattr(args, "disable_ignore_empty_think", False),
    )
