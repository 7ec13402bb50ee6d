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
import math
import re
import types
import typing
from collections.abc import Hashable
from pathlib import Path
from typing import Any, Container, Literal, get_args, get_origin

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
            number = float(value)
            if not math.isfinite(number):  # nan passes every range check; no setting means infinity
                raise ConfigError(f"{key}: must be a finite number, got {value!r}")
            return number
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
        # A section's own check may call a field ``DivergenceConfig.beta``: name it as the flag does.
        msg = re.sub(rf"\b{cls.__name__}\.(?=\w)", prefix, str(e)) if prefix else str(e)
        if prefix and prefix not in msg:
            msg = f"{prefix.rstrip('.')}: {msg}"
        raise ConfigError(msg if prefix else f"{cls.__name__}: {msg}") from None


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


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as ``{"section.key": value}`` (how saved and current settings are compared)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden key by key
            continue
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, Hashable):  # construct_mapping reports it
            continue
        line = key_node.start_mark.line + 1
        if key in seen:
            raise ConfigError(f"line {line}: duplicate key {key!r} (first given on line {seen[key]})")
        seen[key] = line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping (UTF-8, no duplicate keys), with an error that names the file."""
    p = Path(path)
    try:
        raw = p.read_bytes()
        data = yaml.load(raw.decode("utf-8"), Loader=_UniqueKeyLoader)
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {p} is a folder") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {p} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                          f"{e.start})") from None
    except ConfigError as e:
        raise ConfigError(f"config file {p}, {e}") from None
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


def _doc_line(cls: type) -> str | None:
    """The first line of a class's own docstring (not the signature dataclasses writes for undocumented ones)."""
    doc = (cls.__doc__ or "").strip()
    return None if not doc or doc.startswith(f"{cls.__name__}(") else doc.splitlines()[0]


def add_flags(parser: argparse.ArgumentParser, cls: type, show: Container[str] | None = None) -> None:
    """One ``--dotted.name`` flag per leaf field of ``cls``, help from field metadata, grouped by section.

    A section is the first part of the name (top-level fields form ``settings``), headed by its
    dataclass's docstring. With ``show``, only those sections are listed in the help (a long tree stays
    readable); every flag is accepted either way.
    """
    hints = _hints(cls)
    groups: dict[str, Any] = {}
    for name, tp, f in _leaf_fields(cls):
        section = name.split(".", 1)[0] if "." in name else "settings"
        if show is not None and section not in show:  # accepted, not listed
            parser.add_argument(f"--{name}", dest=name, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
            continue
        if section not in groups:
            owner = cls if section == "settings" else _unwrap_optional(hints[section])[0]
            groups[section] = parser.add_argument_group(section, _doc_line(owner))
        inner, _ = _unwrap_optional(tp)
        help_ = f.metadata.get("help", "")
        if get_origin(inner) is Literal:
            help_ += f" Choices: {', '.join(map(str, get_args(inner)))}."
        default = f.default if f.default is not dataclasses.MISSING else None
        if default not in (None, "") and not isinstance(default, (list, dict)):
            help_ += f" (default: {default})"
        groups[section].add_argument(f"--{name}", dest=name, default=argparse.SUPPRESS, metavar="V",
                                     help=help_.replace("%", "%%"))  # argparse %-formats help strings


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


def from_args(cls: type, ns: argparse.Namespace) -> Any:
    """``cls`` built from a command's parsed flags: its ``--config`` file (if the command takes one), then the flags."""
    names = {n for n, _, _ in _leaf_fields(cls)}
    return build(cls, getattr(ns, "config", None), {k: v for k, v in vars(ns).items() if k in names})
