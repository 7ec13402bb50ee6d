"""The methods' names, papers, summaries and settings sections, read from their source without importing it.

``selfdistill methods`` and ``selfdistill train --help`` answer in well under a second; importing the
method modules would import torch (seconds). Each registered method class states ``name``, ``paper``,
``summary`` and ``sections`` as literals (or inherits them from a base class in the package); a test checks
this catalog against the live registry.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

_METHODS_DIR = Path(__file__).parent / "methods"
_ATTRS = ("name", "paper", "summary", "sections")

#: Settings sections every method reads (``settings`` = the top-level fields).
COMMON_SECTIONS = ("settings", "model", "data", "optim", "rollout", "eval")


@dataclass(frozen=True)
class MethodInfo:
    """What the CLI shows about a method before anything heavy is imported."""

    name: str
    paper: str
    summary: str
    sections: tuple[str, ...]  # TrainConfig sections the method reads beyond COMMON_SECTIONS


@lru_cache(maxsize=1)
def catalog() -> dict[str, MethodInfo]:
    """Every ``@register``-ed method class in ``selfdistill/methods``, by name."""
    classes: dict[str, tuple[list[str], dict[str, Any]]] = {}  # class name -> (bases, literal attrs)
    registered: list[tuple[list[str], dict[str, Any]]] = []  # kept apart: another file may reuse a class name
    for path in sorted(_METHODS_DIR.rglob("*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if not isinstance(node, ast.ClassDef):
                continue
            attrs: dict[str, Any] = {}
            for stmt in node.body:
                target = stmt.targets[0] if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 else (
                    stmt.target if isinstance(stmt, ast.AnnAssign) and stmt.value is not None else None)
                if isinstance(target, ast.Name) and target.id in _ATTRS:
                    attrs[target.id] = ast.literal_eval(stmt.value)
            bases = [b.id for b in node.bases if isinstance(b, ast.Name)]
            if any(isinstance(d, ast.Name) and d.id == "register" for d in node.decorator_list):
                registered.append((bases, attrs))
                classes[node.name] = (bases, attrs)  # a registered class wins its name (subclasses look it up)
            elif node.name not in classes:
                classes[node.name] = (bases, attrs)

    def lookup(bases: list[str], attrs: dict[str, Any], attr: str) -> Any:
        if attr in attrs:
            return attrs[attr]
        return next((v for b in bases if b in classes for v in [lookup(*classes[b], attr)] if v is not None), None)

    out = {}
    for bases, attrs in registered:
        info = MethodInfo(*(lookup(bases, attrs, a) for a in _ATTRS))
        out[info.name] = MethodInfo(info.name, info.paper or "", info.summary or "", tuple(info.sections or ()))
    return dict(sorted(out.items()))
