"""Field declaration helpers and value conversion (stdlib only).

Every argument is a dataclass field declared with :func:`arg`; its metadata carries the one-line
help, the allowed choices and simple range checks. The field's type annotation decides how a
command-line string or a config-file value is converted:

``bool`` / ``int`` / ``float`` / ``str``; ``Optional[X]`` (also accepts ``none``/``null``);
``List[X]`` (space separated on the command line); ``dict`` (a JSON object);
``Union[str, dict]`` (a JSON object if the value starts with ``{``, else a plain string).
"""
from __future__ import annotations

import json
import types
import typing
from dataclasses import MISSING, dataclass, field
from typing import Any, Optional, Sequence

from megatron_swift.args.errors import ArgumentError

_TRUE = ("true", "1")
_FALSE = ("false", "0")
_NONE = ("none", "null")


def arg(default: Any = MISSING, *, help: str, choices: Optional[Sequence[str]] = None,
        factory=None, ge=None, gt=None, le=None, lt=None, value_aliases=None):
    """Declare an argument field.

    ``choices`` restricts the value (for lists: each element); ``ge/gt/le/lt`` bound numbers;
    ``value_aliases`` maps accepted spellings to the canonical value (``bf16`` -> ``bfloat16``).
    """
    md = {"help": help}
    if choices is not None:
        md["choices"] = tuple(choices)
    for key, bound in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)):
        if bound is not None:
            md[key] = bound
    if value_aliases:
        md["value_aliases"] = dict(value_aliases)
    if factory is not None:
        return field(default_factory=factory, metadata=md)
    return field(default=default, metadata=md)


def derived(default: Any = None, *, help: str, factory=None):
    """A field filled by validation (world size, HF config, ...); not settable by users."""
    md = {"help": help, "derived": True}
    if factory is not None:
        return field(default_factory=factory, metadata=md)
    return field(default=default, metadata=md)


def override(cls, name: str, default: Any = MISSING, factory=None):
    """Redeclare an inherited field with a different default, keeping its help and checks."""
    base = cls.__dataclass_fields__[name]
    if factory is not None:
        return field(default_factory=factory, metadata=base.metadata)
    return field(default=default, metadata=base.metadata)


@dataclass(frozen=True)
class TypeInfo:
    kind: str                     # bool | int | float | str | list | dict | str_or_dict
    optional: bool = False
    elem: Optional[str] = None    # element kind for lists

    def describe(self) -> str:
        if self.kind == "list":
            text = f"list of {self.elem}"
        elif self.kind == "dict":
            text = "JSON object"
        elif self.kind == "str_or_dict":
            text = "str or JSON object"
        elif self.kind == "bool":
            text = "bool (true/false)"
        else:
            text = self.kind
        return text

    def metavar(self) -> str:
        if self.kind == "list":
            return f"{self.elem.upper()} [{self.elem.upper()} ...]"
        return {"bool": "[BOOL]", "dict": "JSON", "str_or_dict": "STR|JSON"}.get(self.kind, self.kind.upper())


_SCALARS = {bool: "bool", int: "int", float: "float", str: "str"}


def type_info(tp) -> TypeInfo:
    """Turn a field annotation into a :class:`TypeInfo`."""
    optional = False
    origin = typing.get_origin(tp)
    if origin is typing.Union or isinstance(tp, types.UnionType):
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(members) != len(typing.get_args(tp))
        if len(members) == 1:
            inner = type_info(members[0])
            return TypeInfo(inner.kind, optional, inner.elem)
        if set(members) == {str, dict} or (str in members and any(
                typing.get_origin(m) is dict or m is dict for m in members)):
            return TypeInfo("str_or_dict", optional)
        raise TypeError(f"unsupported argument type {tp!r}")
    if tp in _SCALARS:
        return TypeInfo(_SCALARS[tp], optional)
    if tp is dict or origin is dict:
        return TypeInfo("dict", optional)
    if tp is list or origin is list:
        args = typing.get_args(tp)
        elem = args[0] if args else str
        if elem not in _SCALARS or elem is bool:
            raise TypeError(f"unsupported list element type {elem!r}")
        return TypeInfo("list", optional, _SCALARS[elem])
    raise TypeError(f"unsupported argument type {tp!r}")


def _where(name: str, source: Optional[str]) -> str:
    if source:
        return f"config file '{source}': argument '{name}'"
    return f"argument --{name}"


def _scalar_from_str(kind: str, text: str, name: str, source, info: TypeInfo):
    if kind == "str":
        return text
    if kind == "bool":
        low = text.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ArgumentError(f"{_where(name, source)}: expected bool (true/false), got {text!r}")
    if kind == "int":
        try:
            return int(text.strip())
        except ValueError:
            pass
        try:  # 1e4 style integers
            as_float = float(text)
        except ValueError:
            as_float = None
        if as_float is not None and as_float.is_integer() and "e" in text.lower():
            return int(as_float)
        raise ArgumentError(f"{_where(name, source)}: expected int, got {text!r}")
    if kind == "float":
        try:
            return float(text.strip())
        except ValueError:
            raise ArgumentError(f"{_where(name, source)}: expected float, got {text!r}") from None
    raise AssertionError(kind)


def _json_object(text: str, name: str, source):
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ArgumentError(f"{_where(name, source)}: expected a JSON object, got {text!r} ({exc.msg})") from None
    if not isinstance(value, dict):
        raise ArgumentError(f"{_where(name, source)}: expected a JSON object, got {text!r}")
    return value


def convert_cli(info: TypeInfo, name: str, values: list[str]) -> Any:
    """Convert the strings that followed ``--name`` on the command line."""
    if info.kind == "bool":
        if not values:
            return True
        if len(values) > 1:
            raise ArgumentError(f"argument --{name}: expected one bool (true/false), got {len(values)} values: "
                                f"{' '.join(values)}")
        if info.optional and values[0].strip().lower() in _NONE:
            return None
        return _scalar_from_str("bool", values[0], name, None, info)
    if not values:
        raise ArgumentError(f"argument --{name}: expected {'at least one value' if info.kind == 'list' else 'a value'}"
                            f" ({info.describe()})")
    if info.optional and len(values) == 1 and values[0].strip().lower() in _NONE:
        return None
    if info.kind == "list":
        return [_scalar_from_str(info.elem, v, name, None, info) for v in values]
    if len(values) > 1:
        raise ArgumentError(f"argument --{name}: expected one value ({info.describe()}), got {len(values)}: "
                            f"{' '.join(values)}")
    text = values[0]
    if info.kind == "dict":
        return _json_object(text, name, None)
    if info.kind == "str_or_dict":
        return _json_object(text, name, None) if text.lstrip().startswith("{") else text
    return _scalar_from_str(info.kind, text, name, None, info)


def convert_native(info: TypeInfo, name: str, value: Any, source: str) -> Any:
    """Convert a value read from a YAML/JSON config file (native types or strings)."""
    if value is None:
        if info.optional:
            return None
        raise ArgumentError(f"{_where(name, source)}: expected {info.describe()}, got null")
    if isinstance(value, str):
        if info.kind == "list":
            if info.optional and value.strip().lower() in _NONE:
                return None
            return [_scalar_from_str(info.elem, value, name, source, info)]
        if info.optional and value.strip().lower() in _NONE and info.kind != "str":
            return None
        if info.kind == "dict":
            return _json_object(value, name, source)
        if info.kind == "str_or_dict":
            return _json_object(value, name, source) if value.lstrip().startswith("{") else value
        return _scalar_from_str(info.kind, value, name, source, info)
    kind = info.kind
    bad = ArgumentError(f"{_where(name, source)}: expected {info.describe()}, got {value!r}")
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise bad
    if kind == "int":
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if kind == "str":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    if kind in ("dict", "str_or_dict"):
        if isinstance(value, dict):
            return value
        raise bad
    if kind == "list":
        items = value if isinstance(value, (list, tuple)) else [value]
        elem_info = TypeInfo(info.elem)
        return [convert_native(elem_info, name, item, source) for item in items]
    raise AssertionError(kind)


def check_value(f, info: TypeInfo, name: str, value: Any, source: Optional[str]) -> Any:
    """Apply value aliases, choices and range checks of field ``f`` to a converted value."""
    if value is None:
        return value
    md = f.metadata
    aliases = md.get("value_aliases")
    choices = md.get("choices")
    items = value if info.kind == "list" else [value]
    out = []
    for item in items:
        if aliases and isinstance(item, str) and item in aliases:
            item = aliases[item]
        if choices is not None and isinstance(item, str) and item not in choices:
            raise ArgumentError(f"{_where(name, source)}: invalid choice {item!r} "
                                f"(choose from {', '.join(choices)})")
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            for key, ok, word in (("ge", lambda a, b: a >= b, ">="), ("gt", lambda a, b: a > b, ">"),
                                  ("le", lambda a, b: a <= b, "<="), ("lt", lambda a, b: a < b, "<")):
                if key in md and not ok(item, md[key]):
                    raise ArgumentError(f"{_where(name, source)}: must be {word} {md[key]}, got {item}")
        out.append(item)
    return out if info.kind == "list" else out[0]
