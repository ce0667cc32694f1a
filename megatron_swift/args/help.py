"""``megatron <cmd> --help`` text, generated from the argument dataclasses."""
from __future__ import annotations

import dataclasses
import json

from megatron_swift.args.commands import ALIASES, COMMAND_HELP, COMMANDS, SECTIONS, field_infos, field_section
from megatron_swift.args.sections import SECTION_TITLES


def _default_text(f) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if value is None:
        return "None"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return " ".join(str(v) for v in value) if value else "[]"
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def _metavar(info, choices) -> str:
    base = "{" + ",".join(choices) + "}" if choices else info.elem if info.kind == "list" else info.kind
    if info.kind == "bool":
        base = "[true|false]"
    elif info.kind == "list":
        base = f"{base} ..." if choices else f"{base} [{base} ...]"
    elif info.kind == "dict":
        base = "JSON"
    elif info.kind == "str_or_dict":
        base = "str|JSON"
    if info.optional and info.kind != "bool":
        base += "|none"
    return base


def format_command_help(command: str) -> str:
    infos = field_infos(command)
    reverse = {}
    for alias, target in ALIASES[command].items():
        reverse.setdefault(target, []).append(alias)
    lines = [f"usage: megatron {command} [--config FILE] [--name VALUE ...]", "",
             f"megatron {command}: {COMMAND_HELP[command]}.", "",
             "Lists are space separated, dicts are JSON strings, booleans true/false (a bare flag means true),",
             "'none' sets an optional argument to None. --config FILE (YAML/JSON) gives defaults that the",
             "command line overrides.", ""]
    for section in SECTIONS[command]:
        names = [n for n in infos if field_section(command, n) is section]
        if not names:
            continue
        lines.append(f"{SECTION_TITLES[section]}:")
        for name in names:
            f, info = infos[name]
            kind = _metavar(info, f.metadata.get("choices"))
            head = f"  --{name} {kind} (default: {_default_text(f)})"
            if name in reverse:
                head += f" [alias: {', '.join('--' + a for a in reverse[name])}]"
            lines.append(head)
            lines.append(f"      {f.metadata.get('help', '')}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def format_main_help(version: str) -> str:
    width = max(len(c) for c in COMMANDS)
    cmds = "\n".join(f"  {c.ljust(width)}  {COMMAND_HELP[c]}" for c in COMMANDS)
    return f"""usage: megatron <command> [--config FILE] [--name VALUE ...]
       megatron <command> --help
       megatron --version

megatron-swift {version}: Megatron-Core training for Hugging Face models (ms-swift's Megatron-SWIFT interface).

commands:
{cmds}

launch: set NPROC_PER_NODE (and NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT for several nodes) to run
under torch.distributed.run; arguments are validated before the relaunch.
"""
