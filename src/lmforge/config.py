"""Stage configs from defaults, a YAML file and `--section.field=value` overrides.

Every stage owns a dataclass config (fields typed, documented and validated in `__post_init__`);
sections are nested dataclasses. This module turns the three sources into one instance —
CLI overrides over the file over the defaults — and back into a plain dict or YAML for the run's
records:

    config = load_config(TrainConfig, file="run.yaml", overrides=["--optim.lr=3e-4"])
    (run_dir / "config.yaml").write_text(dump_yaml(config))

An unknown or mistyped key is an error that names it (and suggests the closest known key); a
value of the wrong type is an error that names the key and the type wanted. Values in overrides
are read as YAML scalars (`3e-4`, `true`, `null`, `[1, 2]`), then checked against the field's
type; ints are accepted where floats are wanted, never the reverse, and never bools as numbers.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from lmforge.errors import LmforgeError

T = TypeVar("T")
# Floats YAML 1.2 accepts and YAML 1.1 does not: exponents without a dot, like 3e-4.
_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def load_config(
    cls: type[T],
    *,
    file: str | Path | None = None,
    overrides: Sequence[str] = (),
    base: Mapping[str, Any] | None = None,
    values: Mapping[str, Any] | None = None,
) -> T:
    """CLS from its defaults, then BASE (e.g. a named preset), then FILE, then OVERRIDES, then
    VALUES (typed values of dedicated CLI flags, as a nested mapping)."""
    data: dict[str, Any] = {}
    if base:
        data = _merge(data, dict(base))
    if file is not None:
        data = _merge(data, read_yaml(file))
    if overrides:
        data = _merge(data, parse_overrides(overrides))
    if values:
        data = _merge(data, dict(values))
    return from_dict(cls, data)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from PATH (an empty file is an empty mapping)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LmforgeError(f"{p}: no such config file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LmforgeError(f"{p}: cannot read ({exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise LmforgeError(f"{p}{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LmforgeError(f"{p}: want a mapping of section: fields, got {type(data).__name__}")
    return data


def parse_overrides(args: Sequence[str]) -> dict[str, Any]:
    """`--a.b=1`, `a.b=1` or `--a.b 1` → {"a": {"b": 1}} (values read as YAML scalars)."""
    out: dict[str, Any] = {}
    items = list(args)
    i = 0
    while i < len(items):
        arg = items[i]
        key, sep, raw = arg.removeprefix("--").partition("=")
        if not sep:
            if not arg.startswith("--") or i + 1 >= len(items):
                raise LmforgeError(f"override {arg!r}: want --section.field=value")
            i += 1
            raw = items[i]
        i += 1
        parts = key.split(".")
        if not all(parts):
            raise LmforgeError(f"override {arg!r}: want --section.field=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw  # not YAML: take it as a string
        node = out
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise LmforgeError(f"override {arg!r}: {part} is set to a value and a section")
            node = child
        node[parts[-1]] = value
    return out


def from_dict(cls: type[T], data: Mapping[str, Any], *, prefix: str = "") -> T:
    """An instance of the dataclass CLS from DATA, checking every key and type."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    if not isinstance(data, Mapping):
        raise LmforgeError(f"{prefix.rstrip('.') or 'config'} must be a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            known = sorted(fields)
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise LmforgeError(
                f"unknown config key {prefix}{key}{hint}; {prefix.rstrip('.') or 'config'} has: "
                + ", ".join(known)
            )
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise LmforgeError(f"{prefix.rstrip('.') or 'config'}: {exc}") from None


def to_dict(config: Any) -> dict[str, Any]:
    """CONFIG as plain data (nested dicts, lists, paths as strings): YAML- and JSON-ready."""
    return {f.name: _plain(getattr(config, f.name)) for f in dataclasses.fields(config) if f.init}


def dump_yaml(config: Any) -> str:
    """CONFIG as YAML that `load_config(type(config), file=...)` reads back to an equal one."""
    return yaml.safe_dump(to_dict(config), sort_keys=False, allow_unicode=True)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _merge(into: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """NEW over INTO, sections merged key by key."""
    out = dict(into)
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """VALUE checked against (and converted to) the annotation TP; KEY names it in errors."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except LmforgeError:
                continue
        wanted = " or ".join(_type_name(a) for a in args)
        raise LmforgeError(f"{key} must be {wanted}, not {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise LmforgeError(
                f"{key} must be one of {', '.join(map(repr, allowed))}, not {value!r}"
            )
        return value
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise LmforgeError(f"{key} must be a list, not {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if origin is tuple and args:
            if len(value) != len(args):
                raise LmforgeError(f"{key} must have {len(args)} items, not {len(value)}")
            return tuple(
                _coerce(v, a, f"{key}[{i}]")
                for i, (v, a) in enumerate(zip(value, args, strict=True))
            )
        item = args[0] if args else Any
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise LmforgeError(f"{key} must be a mapping, not {value!r}")
        return dict(value)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return (
            from_dict(tp, value, prefix=f"{key}.")
            if isinstance(value, Mapping)
            else _bad(key, tp, value)
        )
    if tp is Any:
        return value
    if tp is bool:
        return value if isinstance(value, bool) else _bad(key, tp, value)
    if tp is int:
        return (
            value
            if isinstance(value, int) and not isinstance(value, bool)
            else _bad(key, tp, value)
        )
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
            return float(value)  # PyYAML (YAML 1.1) reads 1e-4 as a string
        return _bad(key, tp, value)
    if tp is str:
        return value if isinstance(value, str) else _bad(key, tp, value)
    if tp is Path:
        return Path(value) if isinstance(value, str) else _bad(key, tp, value)
    raise TypeError(f"{key}: unsupported config type {tp!r}")


def _bad(key: str, tp: Any, value: Any) -> Any:
    raise LmforgeError(f"{key} must be {_type_name(tp)}, not {value!r}")
