"""Contained execution: hostile snippets are contained, ordinary programs run.

Each hostile snippet must give ``ok=False`` with a meaningful reason, leave no
process behind (checked through /proc after every test) and write nothing
outside its folder.  Tests named ``*_kernel`` switch the audit hook off to
check that the kernel layers hold on their own; they run only where the layer
they rely on is active (e.g. as root).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import tempfile
import time
import uuid

import pytest

from selfdistill.tasks import sandbox
from selfdistill.tasks.sandbox import REASONS, SandboxResult, isolation_layers, run_many, run_python

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox targets Linux")


def _leftovers() -> list[str]:
    """Processes the sandbox may have left: our children (zombies too), and any
    live process carrying the sandbox marker or a sandbox uid."""
    me = os.getpid()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/status") as f:
                status = f.read()
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        state = fields.get("State", "").strip()[:1]
        ppid = int(fields.get("PPid", "0").strip() or 0)
        uid = int(fields.get("Uid", "0").split()[0])
        sandbox_uid = sandbox._UID_BASE <= uid < sandbox._UID_BASE + 500_000_000
        if ppid == me or (state != "Z" and (sandbox._MARKER.encode() in cmdline or sandbox_uid)):
            found.append(f"{name} {state} uid={uid} {cmdline[:80]!r}")
    return found


@pytest.fixture(autouse=True)
def no_processes_left():
    yield
    left = _leftovers()
    assert not left, f"processes left behind: {left}"


def _needs(layer: str) -> None:
    if layer not in isolation_layers():
        pytest.skip(f"isolation layer {layer!r} not active here ({isolation_layers()})")


def _contained(res: SandboxResult, *reasons: str) -> None:
    assert isinstance(res, SandboxResult)
    assert res.ok is False
    assert res.reason in REASONS
    if reasons:
        assert res.reason in reasons, res


# ---------------------------------------------------------------- ordinary code


def test_prints_output():
    res = run_python("print('hello', 6 * 7)")
    assert res.ok and res.reason == "ok" and res.returncode == 0
    assert res.stdout == "hello 42\n" and res.stderr == ""
    assert res.wall_s > 0


def test_stdlib_imports_and_files_in_cwd_work():
    code = (
        "import itertools, collections, functools, re, math, string, heapq, bisect, fractions\n"
        "import dataclasses, typing, json, random, statistics, datetime, decimal, threading\n"
        "import tempfile, pathlib, shutil, os\n"
        "@dataclasses.dataclass\nclass P:\n    x: int\n"
        "open('out.txt', 'w').write('abc')\n"
        "pathlib.Path('d').mkdir(); shutil.rmtree('d')\n"
        "with tempfile.TemporaryDirectory() as t: open(os.path.join(t, 'f'), 'w').write('1')\n"
        "t = threading.Thread(target=lambda: None); t.start(); t.join()\n"
        "if __name__ == '__main__':\n"
        "    print(math.comb(10, 3), heapq.nsmallest(2, [5, 1, 3]), P(1), open('out.txt').read())\n"
    )
    res = run_python(code, timeout_s=5)
    assert res.ok, res
    assert res.stdout == "120 [1, 3] P(x=1) abc\n"


def test_stdin_is_fed_and_absent_stdin_is_eof():
    res = run_python("import sys\nprint(sum(map(int, sys.stdin.read().split())))", stdin="1 2 3\n4\n")
    assert res.ok and res.stdout == "10\n"
    big = "x" * 3_000_000
    res = run_python("import sys\nprint(len(sys.stdin.read()))", stdin=big, timeout_s=5)
    assert res.ok and res.stdout == "3000000\n"
    res = run_python("input()")
    _contained(res, "error")
    assert "EOFError" in res.stderr


def test_errors_never_raise():
    res = run_python("def f(:\n  pass")
    _contained(res, "error")
    assert "SyntaxError" in res.stderr
    for code in ["print(1)\x00", "print('\ud800')", "", "raise SystemExit(3)", "1/0", "exit(2)"]:
        res = run_python(code)
        assert isinstance(res, SandboxResult)
        assert res.ok is (code == "")
    assert run_python("exit(0)").ok
    res = run_python("1/0")
    assert res.reason == "error" and "ZeroDivisionError" in res.stderr and "solution.py" in res.stderr
    res = run_python("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)")
    _contained(res, "killed")
    assert res.returncode == -signal.SIGSEGV


def test_huge_output_is_cut_quickly():
    t = time.monotonic()
    res = run_python("while True:\n    print('y' * 1000)", timeout_s=10, max_output_bytes=10_000)
    _contained(res, "output_limit")
    assert len(res.stdout) == 10_000
    assert time.monotonic() - t < 3
    res = run_python("import sys\nwhile True: sys.stderr.write('e' * 1000)", timeout_s=10, max_output_bytes=10_000)
    _contained(res, "output_limit")


def test_run_many_keeps_order():
    codes = [f"import time\ntime.sleep({(5 - i) * 0.03})\nprint({i})" for i in range(6)]
    results = run_many(codes, workers=2)
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(6)]
    assert all(r.ok for r in results)
    assert run_many([]) == []
    mixed = run_many(["print(1)", "while True: pass", "1/0"], workers=3, timeout_s=0.5)
    assert [r.reason for r in mixed] == ["ok", "timeout", "error"]


# ---------------------------------------------------------------- hostile code


def test_infinite_loop_times_out():
    t = time.monotonic()
    res = run_python("while True:\n    pass", timeout_s=0.5)
    _contained(res, "timeout")
    assert time.monotonic() - t < 2.5


def test_cpu_limit_ends_a_busy_loop():
    res = run_python("while True:\n    pass", timeout_s=10, cpu_s=1)
    _contained(res, "timeout")
    assert res.returncode == -signal.SIGXCPU and res.wall_s < 5


def test_fork_bomb_is_contained():
    res = run_python("import os\nwhile True:\n    os.fork()", timeout_s=2)
    _contained(res, "forbidden", "timeout", "error")


def test_subprocess_and_system_are_contained():
    for code in [
        "import subprocess\nsubprocess.run(['sh', '-c', 'sleep 30'])",
        "import os\nos.system('sleep 30')",
        "import os\nos.execv('/bin/sh', ['sh', '-c', 'sleep 30'])",
        "import os\nos.posix_spawn('/bin/sleep', ['sleep', '30'], {})",
        "import multiprocessing as m\np = m.Process(target=print)\np.start()",
    ]:
        _contained(run_python(code, timeout_s=2), "forbidden")


def test_huge_allocation_is_contained():
    _contained(run_python("x = bytearray(10**10)", memory_mb=128), "memory")
    res = run_python("x = []\nwhile True:\n    x.append(' ' * 10**6)", memory_mb=128, timeout_s=5)
    _contained(res, "memory")


def test_writing_outside_the_folder_is_contained(monkeypatch):
    # Run folders go under a fresh temp root we can inspect afterwards.
    root = tempfile.mkdtemp(prefix="selfdistill-test-root-")
    os.chmod(root, 0o755)
    monkeypatch.setattr(tempfile, "tempdir", root)
    try:
        name = f"selfdistill_escape_{uuid.uuid4().hex}"
        targets = [
            f"/tmp/{name}",
            os.path.join(root, name),
            "../" * 30 + f"tmp/{name}",
            f"../../{name}",  # work -> run folder -> temp root
        ]
        for target in targets:
            for code in [
                f"open({target!r}, 'w').write('x')",
                f"import os\nfd = os.open({target!r}, os.O_WRONLY | os.O_CREAT)\nos.write(fd, b'x')",
                f"import pathlib\npathlib.Path({target!r}).mkdir()",
            ]:
                _contained(run_python(code), "forbidden", "error")
        tricks = [
            f"import os\nos.symlink('/tmp/{name}', 'link')\nopen('link', 'w').write('x')",
            f"import os\nd = os.open('/tmp', os.O_RDONLY)\nfd = os.open({name!r}, os.O_WRONLY | os.O_CREAT, dir_fd=d)",
            f"import os\nd = os.open('/tmp', os.O_RDONLY)\nos.mkdir({name!r}, dir_fd=d)",
            f"import shutil\nopen('a', 'w').write('x')\nshutil.copy('a', '/tmp/{name}')",
            f"import os\nopen('a', 'w').write('x')\nos.rename('a', '/tmp/{name}')",
        ]
        for code in tricks:
            _contained(run_python(code), "forbidden", "error")
        assert not os.path.exists(f"/tmp/{name}")
        assert os.listdir(root) == []  # nothing escaped and every run folder is gone
    finally:
        os.rmdir(root)


def test_hook_survives_monkeypatching(tmp_path):
    """Replacing os/posixpath/builtins helpers must not open a hole in the hook."""
    target = tmp_path / "patched.txt"
    for patch in [
        "import os.path\nos.path.realpath = lambda p, **k: os.getcwd()\nos.path.abspath = os.path.realpath",
        "import builtins\nbuiltins.isinstance = lambda *a: False\nbuiltins.len = lambda *a: 0",
        "import os\nos.fsdecode = lambda p: 'x'\nos.getcwd = lambda: '/'",
        "class S(str):\n    def startswith(self, *a): return True\n    def __eq__(self, o): return True\n    __hash__ = str.__hash__\n"
        "import builtins\nbuiltins.open = (lambda o: lambda f, *a, **k: o(S(f), *a, **k))(builtins.open)",
    ]:
        res = run_python(f"{patch}\nopen({str(target)!r}, 'w').write('x')")
        _contained(res, "forbidden", "error")
        assert not target.exists()


def test_modifying_outside_files_is_contained(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    for code in [
        f"import os\nos.remove({str(victim)!r})",
        f"import os\nos.chmod({str(victim)!r}, 0o777)",
        f"open({str(victim)!r}, 'a').write('x')",
        f"import os\nos.truncate({str(victim)!r}, 0)",
    ]:
        _contained(run_python(code), "forbidden", "error")
    assert victim.read_text() == "keep"


def _listener() -> socket.socket:
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(8)
    lst.settimeout(0.2)
    return lst


def _no_connection(lst: socket.socket) -> bool:
    try:
        conn, _ = lst.accept()
    except (socket.timeout, BlockingIOError):
        return True
    conn.close()
    return False


def test_socket_is_contained():
    lst = _listener()
    port = lst.getsockname()[1]
    try:
        for code in [
            f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\ns.sendall(b'hi')",
            f"import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))",
            "import socket\ns = socket.socket()\ns.bind(('127.0.0.1', 0))\ns.listen()",
            "import socket\nsocket.getaddrinfo('example.com', 80)",
        ]:
            _contained(run_python(code), "forbidden", "error")
        assert _no_connection(lst)
    finally:
        lst.close()


def test_killing_the_parent_is_contained():
    me = os.getpid()
    for code in [
        "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
        f"import os, signal\nos.kill({me}, signal.SIGTERM)",
        "import os, signal\nos.killpg(os.getpgid(os.getppid()), signal.SIGKILL)",
        "import os, signal\nos.kill(-1, signal.SIGKILL)",
        "import os, signal\nos.kill(0, signal.SIGKILL)",
        "import os, signal\nsignal.pidfd_send_signal(os.pidfd_open(os.getppid()), signal.SIGKILL)",
    ]:
        _contained(run_python(code), "forbidden", "error", "killed")
    assert os.getpid() == me  # still here


# --------------------------------------------- kernel layers without the hook


def test_kernel_write_outside_kernel():
    _needs("readonly-fs")
    name = f"/tmp/selfdistill_escape_{uuid.uuid4().hex}"
    res = run_python(f"open({name!r}, 'w').write('x')", _audit_hook=False)
    _contained(res, "error")
    assert "Read-only file system" in res.stderr
    assert not os.path.exists(name)


def test_kernel_signal_parent_kernel():
    _needs("uid")
    res = run_python("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)", _audit_hook=False)
    _contained(res, "error")
    assert "PermissionError" in res.stderr


def test_kernel_socket_kernel():
    _needs("netns")
    lst = _listener()
    try:
        port = lst.getsockname()[1]
        res = run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)", _audit_hook=False)
        _contained(res, "error")
        assert _no_connection(lst)
    finally:
        lst.close()


def test_kernel_fork_bomb_and_escapees_kernel():
    _needs("nproc")
    res = run_python("import os\nwhile True:\n    try: os.fork()\n    except OSError: pass", _audit_hook=False, timeout_s=1)
    _contained(res, "timeout")
    # A grandchild that leaves the session is still found (by uid) and killed.
    code = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(30)\nprint('parent done')"
    res = run_python(code, _audit_hook=False, timeout_s=2)
    assert res.stdout == "parent done\n"


def test_isolation_layers_reported():
    layers = isolation_layers()
    assert "session" in layers and "rlimits" in layers and "audit-hook" in layers
    if os.geteuid() == 0:  # the uid layer, or the note that it had to be skipped
        assert "uid" in layers or "uid-skipped" in layers


# ------------------------------------------- tests that must run to their end

ADD_TESTS = "assert add(1, 2) == 3\nassert add(0, 0) == 0\n"
RIGHT_ADD = "def add(a, b):\n    return a + b\n"
WRONG_ADD = "def add(a, b):\n    return a - b\n"
# Reaching the witness's own channels, as a program that has read this harness would.
_DONE_CELLS = (
    "done = __selfdistill_tests_done__\n"
    "    cells = dict(zip(done.__code__.co_freevars, [c.cell_contents for c in done.__closure__]))\n"
)


def test_tests_pass_only_when_run_to_their_end():
    res = run_python(RIGHT_ADD + "print('hi')", tests=ADD_TESTS)
    assert res.ok and res.reason == "ok" and res.returncode == 0 and res.stdout == "hi\n"
    res = run_python(WRONG_ADD, tests=ADD_TESTS)
    _contained(res, "error")
    assert "AssertionError" in res.stderr and 'File "tests.py", line 1' in res.stderr
    # Threads and atexit handlers left by an honest program do not spoil its pass.
    extras = (
        "import atexit, threading, time\natexit.register(print, 'bye')\n"
        "threading.Thread(target=time.sleep, args=(30,)).start()\n"
    )
    res = run_python(RIGHT_ADD + extras, tests=ADD_TESTS, timeout_s=5)
    assert res.ok, res
    assert run_python("print(1)").reason == "ok"  # no tests: exit status alone, as before


@pytest.mark.parametrize(
    "trick, reason",
    [
        ("import sys\nsys.exit(0)", "incomplete"),
        ("exit()", "incomplete"),
        ("raise SystemExit(0)", "incomplete"),
        ("import os\nos._exit(0)", "incomplete"),
        ("def add(a, b):\n    raise SystemExit(0)", "incomplete"),  # from inside the tests
        ("import os, signal\nsignal.signal(signal.SIGTERM, lambda *a: os._exit(0))\n"
         "os.kill(os.getpid(), signal.SIGTERM)", "incomplete"),
        # after the tests failed (a right answer passes: its tests ended first)
        ("import atexit, os\natexit.register(os._exit, 0)", "incomplete"),
        ("import os, threading, time\n"
         "threading.Thread(target=lambda: (time.sleep(0.3), os._exit(0))).start()", "incomplete"),
        ("import os, signal\nos.killpg(os.getpgid(0), signal.SIGKILL)", "forbidden"),
        ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", "killed"),
        ("import os\nfor fd in range(3, 64):\n    try:\n        os.pwrite(fd, b'x' * 32, 0)\n"
         "    except OSError:\n        pass\nos._exit(0)", "incomplete"),
        # the harness's last call, made early (from the first assert), then out
        ("def add(a, b):\n    import os\n    __selfdistill_tests_done__()\n    os._exit(0)", "incomplete"),
        # the tests' real frame handed to the witness before their last line
        ("def add(a, b):\n    import os, sys\n    " + _DONE_CELLS + "    cells['box'].append(sys._getframe(1))\n"
         "    cells['go'].release()\n    cells['ack'].acquire()\n    os._exit(0)", "incomplete"),
        # where the nonce lives: other threads' frames, the process's memory, audit hooks
        ("import sys\nsys._current_frames()", "forbidden"),
        ("open('/proc/self/mem', 'rb')", "forbidden"),
        ("import os\nos.open('mem', os.O_RDONLY, dir_fd=os.open('/proc/self', os.O_RDONLY))", "forbidden"),
        ("import os\nos.symlink('/proc/self/mem', 'm')\nopen('m', 'rb')", "forbidden"),
        ("import sys\nsys.addaudithook(lambda *a: None)", "forbidden"),
    ],
)
def test_early_exit_never_passes(trick, reason):
    """Every way out before the tests' end fails, whatever its exit status (a right answer too)."""
    res = run_python(WRONG_ADD + trick, tests=ADD_TESTS, timeout_s=5)
    _contained(res, reason)
    res = run_python(RIGHT_ADD + trick, tests=ADD_TESTS, timeout_s=5)
    if "atexit" in trick or "Thread" in trick:
        assert res.ok, res
    else:
        _contained(res, reason)
