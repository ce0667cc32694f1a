"""Command line + config file -> the command's arguments dataclass.

Syntax (ms-swift's): ``--name value``; ``--name=value``; lists space separated (``--dataset a b``);
dicts as JSON strings; booleans ``true/false`` or ``1/0`` (case-insensitive), a bare boolean flag
means true; ``none``/``null`` sets an Optional argument to None; dashes in names are accepted
(``--micro-batch-size``). ``--config FILE`` (YAML or JSON, keys = argument names) supplies values
that the command line overrides.
"""
from __future__ import annotations

import difflib
import json
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

from megatron_swift.args._fields import check_value, convert_cli, convert_native
from megatron_swift.args.commands import ALIASES, COMMANDS, HF_NAME_HINTS, field_infos
from megatron_swift.args.dist_env import world_size_from_env
from megatron_swift.args.errors import ArgumentError

CONFIG_ARG = "config"
_NAME_RE = re.compile(r"--[A-Za-z_][A-Za-z0-9_-]*(=|$)")


def split_argv(argv: List[str]) -> List[Tuple[str, List[str]]]:
    """``['--a', '1', '--b', 'x', 'y']`` -> ``[('a', ['1']), ('b', ['x', 'y'])]`` (dashes -> underscores).

    ``--name=value`` takes exactly that one value.
    """
    out: List[Tuple[str, List[str]]] = []
    closed = False  # the last name was given as --name=value
    for token in argv:
        if _NAME_RE.match(token):
            name, eq, value = token[2:].partition("=")
            out.append((name.replace("-", "_"), [value] if eq else []))
            closed = bool(eq)
        elif not out:
            raise ArgumentError(f"unexpected value {token!r} before any argument name (use --name value)")
        elif closed:
            raise ArgumentError(f"argument --{out[-1][0]}: unexpected extra value {token!r} after --{out[-1][0]}=...")
        else:
            out[-1][1].append(token)
    return out


def _suggest(command: str, name: str) -> str:
    known = list(field_infos(command)) + list(ALIASES[command]) + [CONFIG_ARG]
    hints = []
    if name in HF_NAME_HINTS and HF_NAME_HINTS[name] in known:
        hints.append(f"--{HF_NAME_HINTS[name]}")
    hints += [f"--{m}" for m in difflib.get_close_matches(name, known, n=3, cutoff=0.6) if f"--{m}" not in hints]
    text = f"; did you mean {' or '.join(hints)}?" if hints else ""
    others = [c for c in COMMANDS if c != command and name in field_infos(c)]
    if others:
        text += f" (--{name} is an argument of: {', '.join('megatron ' + c for c in others)})"
    return text


def _canonical(command: str, name: str, source: Optional[str]) -> str:
    if name in field_infos(command):
        return name
    target = ALIASES[command].get(name)
    if target is not None:
        return target
    where = f"config file '{source}': unknown argument '{name}'" if source else f"unrecognized argument --{name}"
    raise ArgumentError(where + _suggest(command, name))


def _check_alias_pairs(command: str, names: List[str], source: Optional[str]) -> None:
    given = set(names)
    for alias, target in ALIASES[command].items():
        if alias in given and target in given:
            where = f"config file '{source}': " if source else ""
            raise ArgumentError(f"{where}argument --{alias} is an alias of --{target}; give only one of them")


def load_config_file(path: str) -> Dict[str, Any]:
    """Read a YAML or JSON config file into a dict (keys: argument names)."""
    if not os.path.isfile(path):
        raise ArgumentError(f"argument --config: file '{path}' does not exist")
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    try:
        if path.endswith(".json"):
            data = json.loads(text)
        else:
            import yaml  # light; listed in the project dependencies

            data = yaml.safe_load(text)
    except Exception as exc:  # yaml.YAMLError / json.JSONDecodeError
        raise ArgumentError(f"config file '{path}': cannot parse: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ArgumentError(f"config file '{path}': expected a mapping of argument names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def collect_values(command: str, argv: List[str]) -> Tuple[Dict[str, Any], List[str]]:
    """Parse config file and command line into ``{canonical name: value}`` (CLI wins over the file)."""
    if command not in COMMANDS:
        raise ArgumentError(f"unknown command {command!r} (choose from {', '.join(COMMANDS)})")
    infos = field_infos(command)
    pairs = split_argv(list(argv))
    config_paths = [values for name, values in pairs if name == CONFIG_ARG]
    if len(config_paths) > 1:
        raise ArgumentError("argument --config: given more than once")
    values: Dict[str, Any] = {}
    explicit: List[str] = []
    if config_paths:
        if len(config_paths[0]) != 1:
            raise ArgumentError("argument --config: expected one file path")
        path = config_paths[0][0]
        data = load_config_file(path)
        _check_alias_pairs(command, list(data), path)
        for key, raw in data.items():
            if key == CONFIG_ARG:
                raise ArgumentError(f"config file '{path}': nested 'config' is not supported")
            name = _canonical(command, key, path)
            f, info = infos[name]
            values[name] = check_value(f, info, key, convert_native(info, key, raw, path), path)
            explicit.append(name)
    cli_pairs = [(n, v) for n, v in pairs if n != CONFIG_ARG]
    _check_alias_pairs(command, [n for n, _ in cli_pairs], None)
    for given, raw_values in cli_pairs:
        name = _canonical(command, given, None)
        f, info = infos[name]
        values[name] = check_value(f, info, given, convert_cli(info, given, raw_values), None)
        explicit.append(name)
    return values, sorted(set(explicit))


def parse_args(command: str, argv: List[str], env: Optional[Mapping[str, str]] = None,
               world_size: Optional[int] = None):
    """Parse and validate ``argv`` (without the command word) for ``command``.

    Returns the command's dataclass instance (:class:`SftArguments`, :class:`PtArguments`,
    :class:`RLHFCommandArguments` or :class:`ExportCommandArguments`) with derived fields filled.
    ``env`` (default ``os.environ``) gives the world size (see :func:`world_size_from_env`);
    ``world_size`` overrides it. Raises :class:`ArgumentError` on any problem.
    """
    from megatron_swift.args.validate import validate

    values, explicit = collect_values(command, argv)
    cls = COMMANDS[command]
    args = cls(**values)
    args.command = command
    args.explicit_args = explicit
    env = os.environ if env is None else env
    if world_size is None:
        world_size = world_size_from_env(env)
    validate(args, world_size, env)
    return args
