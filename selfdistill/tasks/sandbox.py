"""Contained execution of untrusted, model-written Python code.

Code verifiers run programs that a language model wrote; those programs may
loop forever, fork, allocate without bound, write anywhere, open sockets or
try to kill the process that runs them.  :func:`run_python` runs one such
program in a fresh interpreter and always returns a :class:`SandboxResult`:
it never raises, never hangs past its wall-time limit, and leaves no process
or file behind.

Why this is hand-written: no well-kept library does contained execution with
the standard library alone (the usual answers need containers, seccomp
bindings or a separate service), and verifiers must work wherever the
trainer does.  The layers below are all standard library (``ctypes`` reaches
the few libc calls Python 3.11 lacks), applied best-effort, each where the
machine allows it:

Kernel layers (enforced by Linux; they hold even against code that defeats
the Python-level hook):

* a fresh ``python -I -S -B`` child (isolated mode, no site-packages) in a new
  session, its working folder a fresh temporary folder removed afterwards,
  with a minimal environment and only stdin/stdout/stderr open;
* resource limits: address space (memory), CPU seconds, stack, file size,
  open files, no core dumps;
* when we are root with ``CAP_SYS_ADMIN``: a new network namespace (no
  interface is up, so no network at all) and a new mount namespace in which
  every mount is remounted read-only except the working folder, itself a
  size-capped tmpfs;
* when we are root: the program runs under a uid/gid of its own, unique to
  the run, with no supplementary groups and ``no_new_privs``, so it cannot
  signal the caller (different uid, no ``CAP_KILL``) nor write where that uid
  may not, and ``RLIMIT_NPROC`` (enforced for non-root uids) caps its
  processes and threads.  If the standard library is not readable by others
  (e.g. Python under ``/root``) the child keeps ``CAP_DAC_READ_SEARCH`` so it
  can import: it may then read any file, but writing, signals and network
  stay closed.  If it cannot keep that capability (Docker's default set
  lacks it) it stays root ("uid-skipped") and only the other layers apply;
* cleanup: the whole session is killed, then every process left under the
  run's uid (found through ``/proc``), before the call returns.

Interpreter layer (a tripwire, not a boundary: CPython's audit hooks can be
bypassed by determined code, which is why the kernel layers exist): before the
program starts, a prelude installs a ``sys.addaudithook`` hook, built only
from functions captured beforehand so that monkeypatching ``os``/``builtins``
does not blind it.  It ends the program (reason ``"forbidden"``) on process
creation (fork, exec, spawn, system, subprocess), signals to other processes,
sockets other than local socket pairs, ctypes, rlimit changes, tracing and
``gc`` introspection, and any write, create, remove, rename or chmod of a
path outside the working folder (symlinks resolved).  Reads stay allowed, so
imports work, except of a process's memory (``/proc/<pid>/mem``).
:func:`isolation_layers` reports what holds on this machine.

Tests that must run to their end (``run_python(code, tests=...)``, what code
verifiers use): the program runs first, in the same process, so its exit
status proves nothing (``sys.exit(0)``, ``os._exit(0)``, a signal handler, an
atexit hook or a thread can all end a failing run with 0).  The parent makes
a random nonce per run and hands it through a pipe to a witness thread,
which reads it before the program starts; the tests are compiled apart with a
last line that hands their frame to the witness, and the witness writes the
nonce to a file only the parent reads iff that frame is the tests' own, run
directly by the harness and standing on that line.  A run is ``ok`` only with
status 0 and that exact nonce, else ``"incomplete"``.  The nonce never sits in
the program's thread, argv, environment or files; the hook refuses the ways to
other threads' frames (``sys._current_frames``), to the process's memory and
to new audit hooks.  Limitation: like the hook, this is a tripwire against
code that targets this harness (e.g. a program that crafts bytecode, or gets
its own code run on the witness thread through a garbage-collector callback,
could still read the nonce); it does not judge what the tests compare (an
object whose ``__eq__`` is always true, a patched ``math.isclose``).

Limitations: without root only the rlimits, the session and the hook apply
(a program that defeats the hook could then signal same-uid processes or
leave a process that called ``setsid``); only the standard library can be
imported (no site-packages); ``RLIMIT_AS`` counts virtual memory, so many
threads (8 MiB of stack each) can exhaust a tight ``memory_mb``; each run
costs one interpreter start (about 0.1 s here).
"""

from __future__ import annotations

import itertools
import math
import os
import secrets
import selectors
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

__all__ = [
    "SandboxResult",
    "run_python",
    "run_many",
    "isolation_layers",
    "REASONS",
]

#: Every value :attr:`SandboxResult.reason` can take.
REASONS = (
    "ok",  # exited 0 within limits
    "timeout",  # wall-time or CPU-time limit reached
    "memory",  # MemoryError under the address-space limit
    "error",  # non-zero exit: exception, syntax error, sys.exit(n)
    "killed",  # died from a signal we did not send (e.g. SIGSEGV, OOM killer)
    "output_limit",  # stdout or stderr exceeded max_output_bytes
    "forbidden",  # the audit hook stopped a forbidden action
    "sandbox_error",  # the sandbox itself could not run the program
    "incomplete",  # exited 0 but its tests did not run to their end (run_python(tests=...))
)

# Exit codes the prelude uses to tell the parent what happened.
_SETUP_EXIT = 111
_MEMORY_EXIT = 112
_FORBIDDEN_EXIT = 113

_MARKER = "selfdistill-sandbox"
_UID_BASE = 1_600_000_000  # far above ordinary and sub-uid ranges
_UID_COUNTER = itertools.count()
_NPROC = 40  # tasks (processes + threads) one run may hold, under its own uid
_NOFILE = 64
_FSIZE = 16 * 2**20
_TMPFS_BYTES = 64 * 2**20
_STACK = 64 * 2**20
_EXIT_GRACE_S = 0.2  # after the program exits, how long pipes may stay open


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one contained run.

    ``ok`` is true only for exit status 0 within every limit; ``reason`` is one
    of :data:`REASONS`; ``returncode`` is the child's status (negative: killed
    by that signal; None: it never ran); ``wall_s`` is seconds from start to
    exit (or to the kill).
    """

    ok: bool
    stdout: str
    stderr: str
    returncode: int | None
    reason: str
    wall_s: float


# ---------------------------------------------------------------------------
# The prelude: runs in the child, as root when we are root, before the
# program.  It reads the program, applies the kernel layers, drops privileges,
# installs the audit hook, then compiles and runs the program as __main__.
# ---------------------------------------------------------------------------

_PRELUDE = r'''
def _sandbox_main():
    import sys, os
    cfg = eval(sys.argv[2], {"__builtins__": {}})  # our own repr() of a dict of literals
    layers = []
    try:
        report = os.open(cfg["report"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600) if cfg["report"] else -1
        with open(cfg["code"], "rb") as f:
            src = f.read()
        tests = None
        if cfg["tests"]:
            with open(cfg["tests"], "rb") as f:
                tests = f.read()
        work = cfg["work"]
        uid, gid = cfg["uid"], cfg["gid"]
        libc = None
        if uid is not None:
            try:
                import ctypes
                libc = ctypes.CDLL(None, use_errno=True)
            except Exception:
                libc = None
            if libc is not None:
                _namespaces(libc, cfg, layers)
        os.chdir(work)
        _limits(cfg, layers)
        if uid is not None:
            _drop(libc, cfg, layers)
            libc = None
        sys.dont_write_bytecode = True
        if cfg["hook"]:
            _install_hook(work, cfg["exits"][2])
            layers.append("audit-hook")
        if report >= 0:
            os.write(report, " ".join(layers).encode())
            os.close(report)
    except BaseException as e:
        os.write(2, ("sandbox setup failed: %r\n" % (e,)).encode())
        os._exit(cfg["exits"][0])
    import gc
    gc.collect()
    _run(src, cfg["exits"][1], tests, cfg["witness"])


def _namespaces(libc, cfg, layers):
    """New network and mount namespaces; everything read-only but the work folder."""
    import os
    CLONE_NEWNS, CLONE_NEWNET = 0x00020000, 0x40000000
    MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
    MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
    KEEP = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC,
            "noatime": 1024, "nodiratime": 2048, "relatime": 1 << 21}
    if libc.unshare(CLONE_NEWNET) == 0:
        layers.append("netns")
    if libc.unshare(CLONE_NEWNS) != 0:
        return
    # Never touch a mount unless this namespace is private: otherwise the
    # changes would propagate to the caller's namespace.
    if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        return
    work = cfg["work"]
    wb = os.fsencode(work)
    opts = ("size=%d,mode=0700,uid=%d,gid=%d" % (cfg["tmpfs_bytes"], cfg["uid"], cfg["gid"])).encode()
    if libc.mount(b"tmpfs", wb, b"tmpfs", MS_NOSUID | MS_NODEV, opts) == 0:
        layers.append("tmpfs-work")
    elif libc.mount(wb, wb, None, MS_BIND, None) != 0:
        return
    failed = 0
    with open("/proc/self/mountinfo", "rb") as f:
        lines = f.read().splitlines()
    for line in lines:
        parts = line.split(b" ")
        point = _unescape(parts[4])
        if point == wb or point.startswith(wb + b"/"):
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for opt in parts[5].split(b","):
            flags |= KEEP.get(opt.decode("ascii", "replace"), 0)
        if libc.mount(None, point, None, flags, None) != 0:
            failed += 1
    layers.append("readonly-fs" if not failed else "readonly-fs-partial")


def _unescape(b):
    """Undo mountinfo's octal escapes (a space is written as backslash 040)."""
    out, i = bytearray(), 0
    while i < len(b):
        if b[i] == 92 and i + 4 <= len(b) and b[i + 1:i + 4].isdigit():
            out.append(int(b[i + 1:i + 4], 8) & 0xFF)
            i += 4
        else:
            out.append(b[i])
            i += 1
    return bytes(out)


def _limits(cfg, layers):
    import resource
    def setl(name, value):
        if value is not None and hasattr(resource, name):
            lim = getattr(resource, name)
            soft, hard = value if isinstance(value, tuple) else (value, value)
            cur_hard = resource.getrlimit(lim)[1]
            if cur_hard != resource.RLIM_INFINITY:
                soft, hard = min(soft, cur_hard), min(hard, cur_hard)
            resource.setrlimit(lim, (soft, hard))
    setl("RLIMIT_CORE", 0)
    setl("RLIMIT_FSIZE", cfg["fsize"])
    setl("RLIMIT_NOFILE", cfg["nofile"])
    setl("RLIMIT_CPU", (cfg["cpu_s"], cfg["cpu_s"] + 1))
    if cfg["memory"]:
        setl("RLIMIT_AS", cfg["memory"])
        setl("RLIMIT_STACK", min(cfg["stack"], cfg["memory"] // 2))
    layers.append("rlimits")


def _drop(libc, cfg, layers):
    """Become the run's own uid/gid; keep CAP_DAC_READ_SEARCH only if needed.

    If the standard library needs that capability and it cannot be kept (no
    ctypes, or not in our permitted set, as under Docker's default), stay
    root: the program could not import anything otherwise.
    """
    import os, resource
    PR_SET_KEEPCAPS, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 8, 4, 38
    CAP_DAC_READ_SEARCH = 2
    uid, gid = cfg["uid"], cfg["gid"]
    keep = cfg["keep_read"]
    if keep:
        permitted = 0
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("CapPrm:"):
                        permitted = int(line.split()[1], 16)
        except (OSError, ValueError):
            pass
        if libc is None or not permitted >> CAP_DAC_READ_SEARCH & 1:
            layers.append("uid-skipped")
            return
        libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0)
    # Counted per uid, and ours is the run's alone: caps processes + threads.
    resource.setrlimit(resource.RLIMIT_NPROC, (cfg["nproc"], cfg["nproc"]))
    layers.append("nproc")
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise OSError("privilege drop failed")
    if keep:
        import ctypes
        hdr = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
        bit = 1 << CAP_DAC_READ_SEARCH
        data = (ctypes.c_uint32 * 6)(bit, bit, 0, 0, 0, 0)  # effective, permitted, inheritable (x2)
        if libc.capset(hdr, data) != 0:
            raise OSError(ctypes.get_errno(), "capset failed")
        libc.prctl(PR_SET_KEEPCAPS, 0, 0, 0, 0)
        layers.append("keep-dac-read-search")
    layers.append("uid")
    if libc is not None:
        libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)  # so /proc/self stays readable
        if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0:
            layers.append("no-new-privs")


def _install_hook(work, forbidden_exit):
    """Audit hook: end the program on process creation, signals, network, ctypes, outside writes.

    Everything the hook calls is captured here, as C functions, before the
    program starts: the program may later replace os.*, posixpath or builtins,
    and must never get its own code run inside the hook.
    """
    import sys, posix, _stat
    import _posixsubprocess, _signal  # before the hook, which refuses their re-import
    lstat, readlink, getcwd, getpid = posix.lstat, posix.readlink, posix.getcwd, posix.getpid
    _exit, write = posix._exit, posix.write
    S_ISLNK = _stat.S_ISLNK
    isinstance_, len_, str_, bytes_, slice_ = isinstance, len, str, bytes, slice
    as_str, bslice, decode = str.__str__, bytes.__getitem__, bytes.decode
    stdout, stderr = sys.__stdout__, sys.__stderr__
    W = posix.O_WRONLY | posix.O_RDWR | posix.O_CREAT | posix.O_TRUNC | posix.O_APPEND
    AF_UNIX = 1
    prefix = work + "/"
    dev_ok = frozenset(("/dev/null", "/dev/stdout", "/dev/stderr"))
    no_reimport = frozenset(("_posixsubprocess", "_signal", "posix"))
    deny = frozenset((
        "os.fork", "os.forkpty", "os.posix_spawn", "os.exec", "os.spawn", "os.system",
        "os.startfile", "subprocess.Popen", "pty.spawn", "os.killpg", "signal.pthread_kill",
        "socket.bind", "socket.connect", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
        "socket.gethostbyname", "socket.gethostbyaddr", "socket.getnameinfo", "socket.sethostname",
        "socket.getservbyname", "socket.getservbyport", "resource.setrlimit", "resource.prlimit",
        "os.setxattr", "os.removexattr", "os.chflags", "os.lchflags",
        # ways to reach or rewrite the hook itself
        "sys.settrace", "sys.setprofile", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
        # ways to reach the tests' witness thread (and the nonce it keeps)
        "sys._current_frames", "sys.addaudithook",
    ))
    # event -> ((index of a path argument, index of its dir_fd argument or None), ...),
    #          and whether a path may be a file descriptor
    paths = {
        "os.mkdir": (((0, 2),), False), "os.rmdir": (((0, 1),), False),
        "os.remove": (((0, 1),), False), "os.rename": (((0, 2), (1, 3)), False),
        "os.link": (((1, 3),), False), "os.symlink": (((1, 2),), False),
        "os.chmod": (((0, 2),), False), "os.chown": (((0, 3),), False),
        "os.utime": (((0, 3),), False), "os.truncate": (((0, None),), True),
        "os.mkfifo": (((0, 2),), False), "os.mknod": (((0, 3),), False),
        "shutil.chown": (((0, None),), False),
    }
    stopping = [False]

    def stop(event, detail=""):
        if not stopping[0]:
            stopping[0] = True
            for s in (stdout, stderr):
                try:
                    s.flush()
                except BaseException:
                    pass
        try:
            write(2, ("\nsandbox: forbidden: %s %s\n" % (event, detail)).encode("utf-8", "replace"))
        finally:
            _exit(forbidden_exit)

    def text(p):
        """An exact str for a str/bytes path (subclasses copied, never asked); else None."""
        if isinstance_(p, str_):
            return as_str(p)
        if isinstance_(p, bytes_):
            return decode(bslice(p, slice_(None)), "utf-8", "surrogateescape")
        return None

    def resolve(path):
        """realpath() built only from captured C calls; missing parts are kept as written."""
        if not path.startswith("/"):
            path = getcwd() + "/" + path
        todo = path.split("/")
        todo.reverse()
        out = []
        hops = 0
        while todo:
            part = todo.pop()
            if part == "" or part == ".":
                continue
            if part == "..":
                if out:
                    out.pop()
                continue
            cur = "/" + "/".join(out) + ("/" if out else "") + part
            try:
                st = lstat(cur)
            except OSError:
                out.append(part)
                continue
            if S_ISLNK(st.st_mode):
                hops += 1
                if hops > 40:
                    raise OSError("too many links")
                target = text(readlink(cur))
                if target.startswith("/"):
                    out = []
                more = target.split("/")
                more.reverse()
                todo.extend(more)
                continue
            out.append(part)
        return "/" + "/".join(out)

    def inside(p, fd_ok):
        if isinstance_(p, int) and not isinstance_(p, bool):
            return fd_ok
        p = text(p)
        if p is None or "\x00" in p:
            return False
        if p in dev_ok:
            return True
        try:
            r = resolve(p)
        except (OSError, ValueError):
            return False
        return r == work or r.startswith(prefix)

    def memory_file(path):
        """Whether an open names a process's memory (/proc/<pid>/mem): reading it would expose the harness.

        Relative names count by their last part too (os.open hides its dir_fd from the hook).
        """
        p = text(path)
        if p is None:
            return False
        if p == "mem" or p.endswith("/mem"):
            return True
        if p.startswith("/") and not p.startswith(prefix) and not p.startswith(("/proc/", "/dev/")):
            return False  # imports and other reads: no symlink of the program's can be there
        try:
            return resolve(p).endswith("/mem")
        except (OSError, ValueError):
            return True

    def hook(event, args):
        if event in deny:
            stop(event)
        if event == "open":
            path, mode, flags = args
            if mode is not None and not isinstance_(mode, str_):
                mode = "w"
            writing = (flags or 0) & W or (mode is not None and ("w" in mode or "a" in mode or "x" in mode or "+" in mode))
            if writing:
                p = text(path)
                if mode is None and p is not None and not p.startswith("/"):
                    # os.open hides dir_fd from the hook: only absolute paths are checkable.
                    stop(event, repr(p))
                if not inside(path, True):
                    stop(event, repr(p))
            elif memory_file(path):
                stop(event, repr(text(path)))
            return
        spec = paths.get(event)
        if spec is not None:
            for i, d in spec[0]:
                if i >= len_(args):
                    continue
                p = args[i]
                dfd = args[d] if d is not None and d < len_(args) else None
                if dfd is not None and dfd != -1:
                    # Relative to a directory descriptor (shutil.rmtree does this): resolve it.
                    p = text(p)
                    if p is None or not isinstance_(dfd, int):
                        stop(event, "dir_fd")
                    if not p.startswith("/"):
                        try:
                            p = text(readlink("/proc/self/fd/%d" % dfd)) + "/" + p
                        except (OSError, ValueError):
                            stop(event, "dir_fd")
                if not inside(p, spec[1]):
                    stop(event, repr(text(p)))
            return
        if event == "os.kill":
            if args[0] != getpid():
                stop(event, "%d" % args[0])
        elif event == "socket.__new__":
            if len_(args) < 2 or args[1] != AF_UNIX:
                stop(event)
        elif event == "import":
            if text(args[0]) in no_reimport:
                stop(event, text(args[0]))
        elif event.startswith("ctypes."):
            stop(event)

    sys.addaudithook(hook)

    # Entry points that raise no audit event in 3.11: replace them by a stop.
    # (signal.py copies _signal's names when first imported, so _signal suffices.)
    def blocked(name):
        def refuse(*args, **kwargs):
            stop(name)
        return refuse

    for mod, name in ((_posixsubprocess, "fork_exec"), (_signal, "pidfd_send_signal"),
                      (sys.modules.get("signal"), "pidfd_send_signal"), (sys.modules.get("os"), "pidfd_open"),
                      (posix, "pidfd_open")):
        if mod is not None and hasattr(mod, name):
            setattr(mod, name, blocked(mod.__name__ + "." + name))


def _run(src, memory_exit, tests=None, fds=None):
    """Compile and run the program as a fresh __main__ module, then its tests if any.

    After tests that return, the run ends at once with status 0 (the program's
    atexit handlers and leftover threads never run); whether the tests passed
    is told to the parent by the witness alone (see _witnessed).
    """
    import sys, os, types, linecache, builtins
    name = "solution.py"
    run, end = exec, os._exit  # bound before the program can replace them

    def exit(code=None):
        """exit()/quit() as the site module would define them (-S skips site)."""
        raise SystemExit(code)

    builtins.exit = builtins.quit = exit
    main = types.ModuleType("__main__")
    sys.modules["__main__"] = main
    sys.argv = [name]
    try:
        text = src.decode("utf-8", "replace")
        linecache.cache[name] = (len(text), None, text.splitlines(True), name)
        code = compile(src, name, "exec", dont_inherit=True)
        checks = None if tests is None else _witnessed(tests, fds, main.__dict__, sys._getframe())
        del src, text, tests
        run(code, main.__dict__)
        if checks is not None:
            run(checks, main.__dict__)
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except BaseException:
                    pass
            end(0)
    except SystemExit:
        raise
    except BaseException as e:
        tb = e.__traceback__
        if tb is not None and tb.tb_frame.f_code is _run.__code__:
            tb = tb.tb_next
        try:
            import traceback
            traceback.print_exception(type(e), e, tb)
        except BaseException:
            os.write(2, ("%s: %s\n" % (type(e).__name__, e)).encode("utf-8", "replace"))
        if isinstance(e, MemoryError):
            try:
                sys.stdout.flush()
            except BaseException:
                pass
            os._exit(memory_exit)
        raise SystemExit(1)


def _witnessed(tests, fds, g, run_frame):
    """The tests as code whose last statement calls the harness; starts the witness thread.

    A pass must mean the tests ran to their end, yet the program runs first, in
    this process: it can exit with status 0 (sys.exit, os._exit, a signal
    handler, atexit, a thread), print anything, and walk this thread's frames.
    So the parent's per-run nonce is read, before the program runs, by a
    witness thread (never by this one), which writes it to the marker file only
    when handed the tests' own frame, run directly by the harness (run_frame)
    and standing on that last line.  Any other way out leaves the marker
    empty, and the parent scores the run "incomplete".
    """
    import sys, _thread, linecache, posix
    name = "tests.py"
    text = tests.decode("utf-8", "replace") + "\n\n__selfdistill_tests_done__()\n"
    linecache.cache[name] = (len(text), None, text.splitlines(True), name)
    code = compile(text, name, "exec", dont_inherit=True)
    last = max(line for _, _, line in code.co_lines() if line is not None)
    box, locks = [], [_thread.allocate_lock() for _ in range(3)]
    for lock in locks:
        lock.acquire()
    ready, go, ack = locks
    getframe = sys._getframe

    def done():
        """Hand the caller's frame (the tests', on their last line) to the witness; wait for it."""
        box.append(getframe(1))
        go.release()
        ack.acquire()

    g["__selfdistill_tests_done__"] = done
    args = (fds[0], fds[1], ready, go, ack, box, code, run_frame, last,
            posix.read, posix.close, posix.pwrite, type(run_frame), type, len, BaseException)
    _thread.stack_size(1 << 18)  # the witness needs little; the default would eat into RLIMIT_AS
    try:
        _thread.start_new_thread(_witness, args)
    finally:
        _thread.stack_size(0)
    ready.acquire()  # the nonce is read and its pipe closed before the program runs
    return code


def _witness(nonce_fd, marker_fd, ready, go, ack, box, tests_code, run_frame, last_line,
             read, close, pwrite, frame_type, type_, len_, base_exc):
    """Witness thread: write the nonce iff handed the tests' frame on its last line, then stop.

    It looks up no global or builtin (everything is an argument bound before the
    program ran), checks once (an early hand-over spends it), and never raises.
    """
    nonce = b""
    try:
        nonce = read(nonce_fd, 64)
        close(nonce_fd)
    except base_exc:
        pass
    ready.release()
    go.acquire()
    try:
        t = box[0] if len_(box) == 1 else None
        if (type_(t) is frame_type and t.f_lineno == last_line and t.f_back is run_frame
                and t.f_code is tests_code and nonce):
            pwrite(marker_fd, nonce, 0)
    except base_exc:
        pass
    nonce = None
    ack.release()

_sandbox_main()
'''


# ---------------------------------------------------------------------------
# Parent side.
# ---------------------------------------------------------------------------


def _others_can_read(path: str) -> bool:
    """Whether a user with no relation to the owner can reach and read ``path``."""
    try:
        path = os.path.realpath(path)
        parts = path.split("/")
        for i in range(2, len(parts)):
            st = os.stat("/".join(parts[:i]) or "/")
            if not st.st_mode & stat.S_IXOTH:
                return False
        st = os.stat(path)
        need = stat.S_IROTH | (stat.S_IXOTH if stat.S_ISDIR(st.st_mode) else 0)
        return st.st_mode & need == need
    except OSError:
        return False


def _others_can_traverse(path: str) -> bool:
    """Whether an unrelated uid can reach ``path`` (every directory on the way is o+x)."""
    try:
        parts = os.path.realpath(path).split("/")
        return all(os.stat("/".join(parts[:i]) or "/").st_mode & stat.S_IXOTH for i in range(1, len(parts) + 1))
    except OSError:
        return False


def _temp_root(dropping: bool) -> str:
    """Where run folders go: the usual temp dir, or (when the child drops to its
    own uid) the first candidate that uid can reach."""
    base = tempfile.gettempdir()
    if not dropping or _others_can_traverse(base):
        return base
    for cand in ("/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(cand) and os.access(cand, os.W_OK) and _others_can_traverse(cand):
            return cand
    return base


_KEEP_READ: bool | None = None


def _needs_read_capability() -> bool:
    """True when the standard library is not readable by an unrelated uid (e.g. under /root)."""
    global _KEEP_READ
    if _KEEP_READ is None:
        paths = {sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"]}
        paths |= {p for p in sys.path if p.startswith(sys.base_prefix) and os.path.isdir(p)}
        _KEEP_READ = not all(_others_can_read(p) for p in paths)
    return _KEEP_READ


def _uid_mapped(uid: int) -> bool:
    """Whether ``uid`` exists in this user namespace (so setuid to it can work)."""
    try:
        with open("/proc/self/uid_map") as f:
            for line in f:
                inner, _outer, count = (int(x) for x in line.split())
                if inner <= uid < inner + count:
                    return True
    except (OSError, ValueError):
        return False
    return False


def _pick_uid() -> int | None:
    """A uid/gid unique to this run (pid- and counter-based), or None when not root."""
    if os.geteuid() != 0 or not sys.platform.startswith("linux"):
        return None
    uid = _UID_BASE + (os.getpid() % 4_000_000) * 100 + next(_UID_COUNTER) % 100
    return uid if _uid_mapped(uid) else None


def _live_pids_of_uid(uid: int) -> list[int]:
    """Pids of non-zombie processes whose real uid is ``uid`` (scans /proc/*/status)."""
    found = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return found
    needle = b"\nUid:\t%d\t" % uid
    for name in names:
        if not name.isdigit():
            continue
        try:
            fd = os.open(f"/proc/{name}/status", os.O_RDONLY)
            try:
                head = os.read(fd, 4096)
            finally:
                os.close(fd)
        except OSError:
            continue
        if needle in head and b"\nState:\tZ" not in head:
            found.append(int(name))
    return found


def _kill_everything(pgid: int, uid: int | None) -> None:
    """SIGKILL the run's session, then every process left under its uid."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if uid is None:
        return
    for _ in range(200):
        pids = _live_pids_of_uid(uid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.005)


def _encode(text: str | bytes) -> bytes:
    if isinstance(text, bytes):
        return text
    return str(text).encode("utf-8", "surrogatepass")


def _decode(data: bytes | bytearray) -> str:
    return bytes(data).decode("utf-8", "replace")


def _result(ok: bool, out: bytes | bytearray, err: bytes | bytearray, rc: int | None, reason: str, wall: float) -> SandboxResult:
    return SandboxResult(ok=ok, stdout=_decode(out), stderr=_decode(err), returncode=rc, reason=reason, wall_s=wall)


def _classify(rc: int, timed_out: bool, overflow: bool) -> str:
    if overflow:
        return "output_limit"
    if timed_out or rc == -signal.SIGXCPU:
        return "timeout"
    if rc == 0:
        return "ok"
    if rc == _FORBIDDEN_EXIT:
        return "forbidden"
    if rc == _MEMORY_EXIT:
        return "memory"
    if rc == _SETUP_EXIT:
        return "sandbox_error"
    if rc == -signal.SIGXFSZ:
        return "output_limit"
    if rc < 0:
        return "killed"
    return "error"


def _exited(pid: int) -> bool:
    """Whether the child has exited, without reaping it (its pid stays ours)."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None


def run_python(
    code: str,
    *,
    tests: str | None = None,
    stdin: str | None = None,
    timeout_s: float = 2.0,
    memory_mb: int = 256,
    cpu_s: int | None = None,
    max_output_bytes: int = 65536,
    _audit_hook: bool = True,
    _report: str | None = None,
) -> SandboxResult:
    """Run ``code`` as ``__main__`` in a contained child interpreter; never raises.

    ``stdin`` (None: no input, reads see EOF) is fed to the program;
    ``timeout_s`` bounds wall time, ``cpu_s`` CPU seconds (default: the wall
    limit rounded up, plus one), ``memory_mb`` the address space (<= 0: no
    limit), ``max_output_bytes`` each of stdout and stderr (more ends the run
    with reason ``"output_limit"``).  ``_audit_hook`` and ``_report`` are for
    tests (run without the interpreter layer; write the active layers to a
    file).

    ``tests`` (e.g. asserts) run after ``code``, in its namespace; then ``ok``
    also needs them to have run to their end, which the program cannot fake by
    exiting early with status 0 (reason ``"incomplete"``): a witness thread
    writes a per-run nonce to a file only the parent reads, once the tests'
    last line is reached (see ``_witnessed`` in the prelude).
    """
    start = time.monotonic()
    try:
        return _run_python(
            code,
            tests=tests,
            stdin=stdin,
            timeout_s=timeout_s,
            memory_mb=memory_mb,
            cpu_s=cpu_s,
            max_output_bytes=max_output_bytes,
            audit_hook=_audit_hook,
            report=_report,
        )
    except BaseException as e:  # noqa: BLE001 - the caller must never see an exception
        if isinstance(e, KeyboardInterrupt):
            raise
        return _result(False, b"", traceback.format_exc().encode(), None, "sandbox_error", time.monotonic() - start)


def _run_python(
    code: str,
    *,
    tests: str | None,
    stdin: str | None,
    timeout_s: float,
    memory_mb: int,
    cpu_s: int | None,
    max_output_bytes: int,
    audit_hook: bool,
    report: str | None,
) -> SandboxResult:
    timeout_s = max(float(timeout_s), 0.01)
    cap = max(int(max_output_bytes), 0)
    cpu = int(cpu_s) if cpu_s is not None else int(math.ceil(timeout_s)) + 1
    cpu = max(cpu, 1)
    src = _encode(code)
    data_in = _encode(stdin) if stdin is not None else None
    uid = _pick_uid()
    gid = uid

    root = _temp_root(uid is not None)
    with tempfile.TemporaryDirectory(prefix="selfdistill-sbx-", dir=root, ignore_cleanup_errors=True) as outer:
        outer = os.path.realpath(outer)
        work = os.path.join(outer, "work")
        os.mkdir(work, 0o700)
        code_path = os.path.join(outer, "code.py")
        fd = os.open(code_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(src)
        tests_path = None
        if tests is not None:
            tests_path = os.path.join(outer, "tests.py")
            with open(tests_path, "xb") as f:
                f.write(_encode(tests))
        if uid is not None:
            os.chmod(outer, 0o711)
            os.chown(work, uid, gid)
        cfg: dict[str, Any] = {
            "code": code_path,
            "work": work,
            "uid": uid,
            "gid": gid,
            "keep_read": uid is not None and _needs_read_capability(),
            "memory": int(memory_mb) * 2**20 if memory_mb and memory_mb > 0 else None,
            "stack": _STACK,
            "cpu_s": cpu,
            "fsize": _FSIZE,
            "nofile": _NOFILE,
            "nproc": _NPROC if uid is not None else None,
            "tmpfs_bytes": _TMPFS_BYTES,
            "report": report,
            "hook": bool(audit_hook),
            "exits": [_SETUP_EXIT, _MEMORY_EXIT, _FORBIDDEN_EXIT],
            "tests": tests_path,
            "witness": None,  # with tests: [nonce pipe, marker file], passed to the child
        }
        env = {
            "PATH": "/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "HOME": work,
            "TMPDIR": work,
            "MALLOC_ARENA_MAX": "2",
        }
        fds: list[int] = []
        nonce = secrets.token_bytes(32)
        try:
            if tests is not None:
                fds.append(_nonce_pipe(nonce))
                fds.append(os.open(os.path.join(outer, "marker"), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
                cfg["witness"] = fds
            argv = [sys.executable, "-I", "-S", "-B", "-X", "utf8", "-c", _PRELUDE, _MARKER, repr(cfg)]
            return _spawn(argv, env, outer, data_in, timeout_s, cap, uid, fds, nonce)
        finally:
            for fd in fds:
                os.close(fd)


def _spawn(
    argv: list[str], env: dict[str, str], outer: str, data_in: bytes | None, timeout_s: float, cap: int,
    uid: int | None, fds: list[int], nonce: bytes,
) -> SandboxResult:
    """Start the child, collect its output and status; with ``fds``, check the tests' marker."""
    t0 = time.monotonic()
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE if data_in is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=outer,
        env=env,
        start_new_session=True,
        close_fds=True,
        pass_fds=fds,
    )
    try:
        # _communicate kills the session and every process of the run's uid.
        out, err, timed_out, overflow, wall = _communicate(proc, data_in, t0 + timeout_s, cap, uid)
    except BaseException:
        _kill_everything(proc.pid, uid)
        raise
    finally:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
    rc = proc.returncode
    reason = _classify(rc if rc is not None else -signal.SIGKILL, timed_out, overflow)
    if fds and reason == "ok" and os.pread(fds[1], 256, 0) != nonce:
        reason = "incomplete"
    return _result(reason == "ok", out[:cap], err[:cap], rc, reason, wall)


def _nonce_pipe(nonce: bytes) -> int:
    """The read end of a pipe that holds ``nonce`` (its write end already closed)."""
    r, w = os.pipe()
    try:
        os.write(w, nonce)
    finally:
        os.close(w)
    return r


def _communicate(
    proc: subprocess.Popen[bytes], data_in: bytes | None, deadline: float, cap: int, uid: int | None
) -> tuple[bytearray, bytearray, bool, bool, float]:
    """Feed stdin and read stdout/stderr up to ``cap`` each until exit, deadline or overflow.

    Returns (stdout, stderr, timed_out, overflow, wall seconds).  The child is
    never reaped here, so its pid and process group stay valid for the kill.
    """
    t0 = time.monotonic()
    bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}  # type: ignore[union-attr]
    sel = selectors.DefaultSelector()
    for fd in bufs:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    in_fd, in_pos = None, 0
    if data_in is not None:
        in_fd = proc.stdin.fileno()  # type: ignore[union-attr]
        if data_in:
            os.set_blocking(in_fd, False)
            sel.register(in_fd, selectors.EVENT_WRITE)
        else:
            proc.stdin.close()  # type: ignore[union-attr]
            in_fd = None
    pidfd = None
    try:
        pidfd = os.pidfd_open(proc.pid)  # type: ignore[attr-defined]
        sel.register(pidfd, selectors.EVENT_READ)
    except (AttributeError, OSError):
        pidfd = None
    open_reads = set(bufs)
    timed_out = overflow = False
    exited_at: float | None = None
    try:
        while True:
            now = time.monotonic()
            if exited_at is None and (pidfd is None or not open_reads) and _exited(proc.pid):
                exited_at = now
            if exited_at is not None and (not open_reads or now - exited_at > _EXIT_GRACE_S):
                break
            if now >= deadline:
                timed_out = True
                break
            wait = deadline - now
            if pidfd is None or exited_at is not None or not open_reads:
                wait = min(wait, 0.02)
            for key, _ in sel.select(wait):
                fd = key.fd
                if fd == pidfd:
                    exited_at = time.monotonic()
                    sel.unregister(pidfd)
                elif fd == in_fd:
                    try:
                        in_pos += os.write(fd, data_in[in_pos : in_pos + 65536])  # type: ignore[index]
                    except BlockingIOError:
                        pass
                    except OSError:
                        in_pos = len(data_in)  # type: ignore[arg-type]
                    if in_pos >= len(data_in):  # type: ignore[arg-type]
                        sel.unregister(fd)
                        proc.stdin.close()  # type: ignore[union-attr]
                        in_fd = None
                else:
                    try:
                        chunk = os.read(fd, 65536)
                    except BlockingIOError:
                        continue
                    except OSError:
                        chunk = b""
                    if not chunk:
                        sel.unregister(fd)
                        open_reads.discard(fd)
                        continue
                    bufs[fd] += chunk
                    if len(bufs[fd]) > cap:
                        overflow = True
            if overflow:
                break
    finally:
        wall = time.monotonic() - t0
        if exited_at is not None and not timed_out and not overflow:
            wall = exited_at - t0
        # Kill now so that every writer is gone, then drain what is left.
        _kill_everything(proc.pid, uid)
        for fd in (pidfd, in_fd):
            if fd is not None and fd in sel.get_map():
                sel.unregister(fd)
        end = time.monotonic() + 0.5
        while open_reads and time.monotonic() < end and not overflow:
            for key, _ in sel.select(0.05):
                if key.fd in open_reads:
                    try:
                        chunk = os.read(key.fd, 65536)
                    except BlockingIOError:
                        continue
                    except OSError:
                        chunk = b""
                    if not chunk:
                        sel.unregister(key.fd)
                        open_reads.discard(key.fd)
                    else:
                        bufs[key.fd] += chunk
                        if len(bufs[key.fd]) > cap:
                            overflow = True
        sel.close()
        if pidfd is not None:
            os.close(pidfd)
    out = bufs[proc.stdout.fileno()]  # type: ignore[union-attr]
    err = bufs[proc.stderr.fileno()]  # type: ignore[union-attr]
    return out, err, timed_out, overflow, wall


def run_many(codes: Sequence[str], *, workers: int = 2, **kw: Any) -> list[SandboxResult]:
    """:func:`run_python` over ``codes`` on a thread pool; results in input order."""
    codes = list(codes)
    if not codes:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(int(workers), len(codes)))) as pool:
        return list(pool.map(lambda c: run_python(c, **kw), codes))


_LAYERS: tuple[str, ...] | None = None


def isolation_layers() -> tuple[str, ...]:
    """The layers that actually hold on this machine, found by one probe run (cached).

    Kernel layers come from the child's own report (e.g. ``netns``,
    ``readonly-fs``, ``uid``); ``session`` and ``cleanup`` are the parent's.
    """
    global _LAYERS
    if _LAYERS is None:
        found: list[str] = ["session", "cleanup"]
        with tempfile.TemporaryDirectory(prefix="selfdistill-sbx-probe-") as d:
            path = os.path.join(d, "layers.txt")
            res = run_python("pass", _report=path, timeout_s=10)
            try:
                with open(path) as f:
                    found += f.read().split()
            except OSError:
                pass
            if not res.ok:
                found.append("probe-failed")
        _LAYERS = tuple(found)
    return _LAYERS

