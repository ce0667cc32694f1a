"""What user files given with ``--custom_register_path`` / ``--external_plugins`` can register.

Those files are imported (in the launcher and in every worker) before the arguments are validated
and before training starts, as ms-swift does with its plugins, so what they register is there when
the template is chosen. Today that is chat templates::

    # my_template.py
    from megatron_swift.plugin import register_template
    from megatron_swift.template.base import TemplateMeta
    from megatron_swift.template.templates import render_chatml

    register_template(TemplateMeta("my_chatml", render_chatml, eos_token="<|im_end|>", ...))

and then ``megatron sft --custom_register_path my_template.py --template my_chatml ...``; and GRPO
reward functions (ms-swift's ``orms``; an ms-swift plugin only changes its import line)::

    # my_reward.py
    from megatron_swift.plugin import ORM, orms

    class Short(ORM):
        def __call__(self, completions, **kwargs):
            return [float(len(c) < 50) for c in completions]

    orms["short"] = Short

then ``megatron rlhf --rlhf_type grpo --external_plugins my_reward.py --reward_funcs short ...``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Iterable

from megatron_swift.rlhf.rewards import BUILTIN_ORMS, ORM, AsyncORM  # noqa: F401  (re-exported for plugins)

# GRPO reward functions by --reward_funcs name: classes built with the run's arguments (``cls(args=args)``)
orms: dict = dict(BUILTIN_ORMS)

def register_template(meta, exist_ok: bool = False) -> None:
    """Adds a chat template (a ``megatron_swift.template.base.TemplateMeta``) under ``meta.name``."""
    from megatron_swift.template.templates import TEMPLATES

    if meta.name in TEMPLATES and not exist_ok:
        raise ValueError(f"a template named {meta.name!r} is already registered (pass exist_ok=True to replace it)")
    TEMPLATES[meta.name] = meta


_imported: dict = {}


def import_user_files(paths: Iterable[str], flag: str = "--external_plugins") -> list:
    """Imports each Python file once per process (as module ``megatron_swift_user_<name>``)."""
    modules = []
    for path in paths:
        full = os.path.abspath(os.path.expanduser(path))
        if full in _imported:
            modules.append(_imported[full])
            continue
        if not os.path.isfile(full):
            raise ValueError(f"{flag} {path}: no such file")
        name = "megatron_swift_user_" + os.path.splitext(os.path.basename(full))[0]
        spec = importlib.util.spec_from_file_location(name, full)
        if spec is None or spec.loader is None:
            raise ValueError(f"{flag} {path}: not an importable Python file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(name, None)
            raise ValueError(f"{flag} {path}: importing it failed: {type(exc).__name__}: {exc}") from exc
        _imported[full] = module
        modules.append(module)
    return modules


def prepare_run_environment(args) -> None:
    """``--model_kwargs`` become environment variables (upper-case keys, as in ms-swift: model code
    reads them); ``--custom_register_path`` and ``--external_plugins`` files are imported."""
    for key, value in (args.model_kwargs or {}).items():
        os.environ[str(key).upper()] = value if isinstance(value, str) else str(value)
    import_user_files(args.custom_register_path, "--custom_register_path")
    import_user_files(args.external_plugins, "--external_plugins")
