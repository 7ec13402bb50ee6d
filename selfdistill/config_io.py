"""Typed dataclass configs <-> YAML <-> command-line flags, with one set of names.

A nested field ``spd.rank`` is ``TrainConfig(spd=SPDConfig(rank=...))`` in
Python, ``spd: {rank: ...}`` in YAML and ``--spd.rank`` on the command line.
Unknown keys and badly typed values are errors that name the key.
Hand-written because the few libraries that do this (tyro, simple-parsing,
omegaconf) each add a dependency and a different flag grammar; this is ~150
lines over the standard library.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A bad setting; the message names the key."""


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dc(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (from YAML or a flag string) to type ``tp`` or raise naming ``key``."""
    inner, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional or tp is Any:
            return None
        raise ConfigError(f"{key}: must not be empty")
    tp = inner
    origin = get_origin(tp)
    try:
        if tp is Any:
            return value
        if origin is Literal:
            choices = get_args(tp)
            for c in choices:
                if value == c or str(value) == str(c):
                    return c
            raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
        if _is_dc(tp):
            if isinstance(value, tp):
                return value
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping, got {value!r}")
            return from_dict(tp, value, prefix=f"{key}.")
        if origin in (list, tuple):
            (elem, *rest) = get_args(tp) or (Any,)
            if isinstance(value, str):
                value = [v for v in (s.strip() for s in value.split(",")) if v]
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{key}: expected a list, got {value!r}")
            out = [coerce(v, elem, f"{key}[{i}]") for i, v in enumerate(value)]
            return tuple(out) if origin is tuple else out
        if origin is dict:
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping, got {value!r}")
            return dict(value)
        if tp is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ConfigError(f"{key}: expected an integer, got {value!r}")
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ConfigError(f"{key}: expected a number, got {value!r}")
            return float(value)
        if tp is str:
            if not isinstance(value, (str, int, float)):
                raise ConfigError(f"{key}: expected a string, got {value!r}")
            return str(value)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{key}: cannot read {value!r} as {getattr(tp, '__name__', tp)}") from None
    return value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested mapping; unknown keys are errors."""
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown setting {prefix}{unknown[0]} (known: {', '.join(sorted(names))})")
    kwargs = {k: coerce(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {e}") from None


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass as plain nested dicts/lists (YAML- and JSON-safe)."""
    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v
    return conv(obj)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with an error that names the file."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist") from None
    except (OSError, yaml.YAMLError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"config file {p} is not readable YAML: {first}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level")
    return data


def _leaf_fields(cls: type, prefix: str = "") -> list[tuple[str, Any, dataclasses.Field]]:
    out = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp, _ = _unwrap_optional(hints[f.name])
        if _is_dc(tp):
            out += _leaf_fields(tp, f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", hints[f.name], f))
    return out


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--dotted.name`` flag per leaf field of ``cls``, help from field metadata."""
    for name, tp, f in _leaf_fields(cls):
        inner, _ = _unwrap_optional(tp)
        help_ = f.metadata.get("help", "")
        if get_origin(inner) is Literal:
            help_ += f" Choices: {', '.join(map(str, get_args(inner)))}."
        default = f.default if f.default is not dataclasses.MISSING else None
        if default is not None and not isinstance(default, (list, dict)):
            help_ += f" (default: {default})"
        parser.add_argument(f"--{name}", dest=name, default=argparse.SUPPRESS, metavar="V", help=help_)


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.c = value`` inside nested dicts."""
    *parents, last = dotted.split(".")
    cur = data
    for p in parents:
        cur = cur.setdefault(p, {})
        if not isinstance(cur, dict):
            raise ConfigError(f"{dotted}: {p} is not a section")
    cur[last] = value


def build(cls: type, yaml_path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Any:
    """YAML (optional) then flag overrides (dotted keys) -> a validated ``cls``."""
    data: dict[str, Any] = load_yaml(yaml_path) if yaml_path else {}
    for k, v in (overrides or {}).items():
        set_dotted(data, k, v)
    return from_dict(cls, data)
