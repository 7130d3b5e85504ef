"""Typed pass options: frozen dataclasses parsed from `key=value` text and printed back.

A pass declares ``Options`` as a frozen dataclass. Field types drive parsing:
``bool``, ``int``, ``float``, ``str``, ``Literal[...]``, ``tuple[str, ...]``,
``tuple[int, ...]`` and ``X | None``. A field's one-line help lives in
``field(metadata={"help": "..."})``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from .errors import UsageError


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """Options of a pass that takes none."""


def option_fields(options_cls: type) -> list[dataclasses.Field]:
    return list(dataclasses.fields(options_cls))


def _hints(options_cls: type) -> dict[str, Any]:
    return typing.get_type_hints(options_cls)


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _split_list(text: str) -> list[str]:
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    return [part.strip() for part in text.split(",") if part.strip()]


def convert_value(annotation: Any, value: Any) -> Any:
    """Convert ``value`` (text from the CLI or a native value from a recipe) to ``annotation``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "")):
            return None
        return convert_value(non_none[0], value)
    if origin is typing.Literal:
        text = str(value).strip()
        for choice in args:
            if str(choice) == text:
                return choice
        raise ValueError(f"expected one of {', '.join(map(str, args))}, got {text!r}")
    if origin is tuple:
        item_type = args[0] if args else str
        items = _split_list(value) if isinstance(value, str) else list(value)
        return tuple(convert_value(item_type, item) for item in items)
    if annotation is bool:
        return value if isinstance(value, bool) else _parse_bool(str(value))
    if annotation is int:
        if isinstance(value, bool):
            raise ValueError(f"expected an integer, got {value!r}")
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"expected an integer, got {value!r}")
        return int(str(value).strip()) if isinstance(value, str) else int(value)
    if annotation is float:
        return float(value)
    if annotation is str:
        return str(value)
    raise TypeError(f"unsupported option type {annotation!r}")


def format_value(value: Any) -> str:
    """Print an option value so that ``convert_value`` reads it back unchanged."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def build_options(options_cls: type, raw: dict[str, Any], *, owner: str) -> Any:
    """Make an options instance from raw values, naming the pass and valid keys on error."""
    hints = _hints(options_cls)
    fields = {f.name: f for f in option_fields(options_cls)}
    unknown = [key for key in raw if key not in fields]
    if unknown:
        valid = ", ".join(fields) or "(none)"
        raise UsageError(f"pass '{owner}' has no option '{unknown[0]}'; valid options: {valid}")
    values = {}
    for key, value in raw.items():
        try:
            values[key] = convert_value(hints[key], value)
        except (ValueError, TypeError) as exc:
            raise UsageError(f"pass '{owner}' option '{key}': {exc}") from None
    try:
        return options_cls(**values)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"pass '{owner}': {exc}") from None


def non_default_items(options: Any) -> list[tuple[str, Any]]:
    """(name, value) of fields that differ from their defaults, in declaration order."""
    items = []
    for f in option_fields(type(options)):
        value = getattr(options, f.name)
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = dataclasses.MISSING
        if value != default:
            items.append((f.name, value))
    return items


def describe_options(options_cls: type) -> list[dict[str, str]]:
    """Rows for `onnxopt passes`: name, type, default, help."""
    hints = _hints(options_cls)
    rows = []
    for f in option_fields(options_cls):
        if f.default is not dataclasses.MISSING:
            default = format_value(f.default)
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = format_value(f.default_factory())  # type: ignore[misc]
        else:
            default = "(required)"
        rows.append(
            {
                "name": f.name,
                "type": _type_name(hints[f.name]),
                "default": default,
                "help": f.metadata.get("help", ""),
            }
        )
    return rows


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return "|".join(map(str, args))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + " or none"
    if origin is tuple:
        return f"list of {_type_name(args[0]) if args else 'str'}"
    return getattr(annotation, "__name__", str(annotation))
