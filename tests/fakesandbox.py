"""A stand-in for selfdistill.tasks.sandbox in tests: same ``run_python`` signature, a plain subprocess, no
isolation (the tests are simply appended to the program). Shared by the verifier and loader tests."""

from __future__ import annotations

import subprocess
import sys
import time
import types
from dataclasses import dataclass

import pytest


@dataclass
class FakeResult:
    ok: bool
    stdout: str
    stderr: str
    returncode: int | None
    reason: str
    wall_s: float


def fake_run_python(
    code: str,
    *,
    tests: str | None = None,
    stdin: str | None = None,
    timeout_s: float = 2.0,
    memory_mb: int = 256,
    **_: object,
) -> FakeResult:
    """Same signature as sandbox.run_python; a plain subprocess, no isolation (tests simply appended)."""
    if tests is not None:
        code = code + "\n" + tests
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-c", code], input=stdin, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return FakeResult(False, "", "", None, "timeout", time.perf_counter() - t0)
    ok = p.returncode == 0
    return FakeResult(ok, p.stdout, p.stderr, p.returncode, "ok" if ok else "error", time.perf_counter() - t0)


def install_fake_sandbox(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Put the fake in place of selfdistill.tasks.sandbox; returns the list of programs it ran."""
    ran: list[str] = []

    def run(code: str, **kw: object) -> FakeResult:
        ran.append(code)
        return fake_run_python(code, **kw)  # type: ignore[arg-type]

    module = types.ModuleType("selfdistill.tasks.sandbox")
    module.run_python = run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "selfdistill.tasks.sandbox", module)
    return ran
