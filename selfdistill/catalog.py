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
    classes: dict[str, tuple[list[str], dict[str, Any], bool]] = {}  # class -> (bases, literal attrs, registered)
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
            registered = any(isinstance(d, ast.Name) and d.id == "register" for d in node.decorator_list)
            classes[node.name] = (bases, attrs, registered)

    def lookup(cls: str, attr: str) -> Any:
        bases, attrs, _ = classes[cls]
        if attr in attrs:
            return attrs[attr]
        return next((v for b in bases if b in classes for v in [lookup(b, attr)] if v is not None), None)

    out = {}
    for cls, (_, _, registered) in classes.items():
        if registered:
            info = MethodInfo(*(lookup(cls, a) for a in _ATTRS))
            out[info.name] = MethodInfo(info.name, info.paper or "", info.summary or "", tuple(info.sections or ()))
    return dict(sorted(out.items()))
