"""Runs `lmforge ARGS` for the tests as a fresh process without paying the imports each time.

Every `lmforge` process spends 3–8 s importing torch (and torch._dynamo at the first optimizer,
matplotlib for a chart, …) before it does anything; the suite starts well over a hundred of
them. This module's server (`python zygote.py SOCKET`) imports all of that once per pytest
worker and then, for each request on its Unix socket, forks a child that *is* the command: a
separate process with the test's environment and working directory, on the stdin, stdout and
stderr the client passed (SCM_RIGHTS), running the console script's `main(ARGS)` and exiting
with its status, as `lmforge ARGS` would. Nothing in lmforge reads the environment at import
time, so importing before the environment is set changes nothing; the server itself runs no
torch op and starts no thread, so no thread pool exists when it forks.

The server forks twice per request: a handler (which reads the request, reports the command's
pid, waits for it and reports its exit status) and, from it, the command. The server only
accepts and forks, so concurrent requests from one test's threads run concurrently.

Clients: `run()` (the shape of `subprocess.run(..., capture_output=True, text=True)`),
`popen()` (a `Process` with Popen's poll, wait, communicate and signals, for servers and for
commands a test kills) and `python zygote.py --client ARGS` (for the benches' own
subprocesses). `LMFORGE_TEST_FORK=0` makes tests/conftest.py start every command as `python -m
lmforge.cli.main` instead; with the zygote, the suite takes about 5 minutes less on 2 cores."""

from __future__ import annotations

import atexit
import contextlib
import gc
import json
import locale
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import traceback
from pathlib import Path
from typing import Any

READY = "ready"


# -- the server ----------------------------------------------------------------------------


def _preload() -> None:
    """Import what `lmforge` commands import, without running any of it."""
    import importlib
    import pkgutil

    import matplotlib

    matplotlib.use("Agg")  # what lmforge's charts select before they import pyplot
    import matplotlib.pyplot
    import torch
    import torch._dynamo  # noqa: F401  (a training run imports it at its first optimizer step)

    import lmforge
    import lmforge.cli.main

    for module in pkgutil.walk_packages(lmforge.__path__, "lmforge."):
        if module.name.endswith("ray_executor"):
            continue  # imports Ray, which only `--executor ray` needs
        importlib.import_module(module.name)


def _die_with_parent() -> None:
    """SIGTERM this server when the pytest worker that started it dies (Linux prctl)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _exit_code(exc: SystemExit) -> int:
    """The status `sys.exit(x)` gives a process: None → 0, an int → itself, else printed, 1."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)
    return 1


def _command(request: dict[str, Any], fds: list[int]) -> None:
    """Become `lmforge ARGS` as the request describes, on the client's stdin, stdout and
    stderr (FDS), then exit with its status."""
    if request["new_session"]:
        os.setsid()
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    for fd in set(fds):
        if fd > 2:
            os.close(fd)
    sys.argv = ["lmforge", *request["args"]]
    try:
        from lmforge.cli.main import main

        code = main(list(request["args"]))
    except SystemExit as exc:
        code = _exit_code(exc)
    except BaseException:  # what the interpreter does with an uncaught exception
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


def _receive(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """A request: one JSON line, the first chunk of which carries the three descriptors."""
    data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
    while not data.endswith(b"\n"):
        more = conn.recv(1 << 16)
        if not more:
            raise EOFError("the client went away mid-request")
        data += more
    return json.loads(data), list(fds)


def _handle(conn: socket.socket) -> None:
    """In the handler process: fork the command, report its pid, wait, report its status."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    request, fds = _receive(conn)
    pid = os.fork()
    if pid == 0:
        conn.close()
        _command(request, fds)
    for fd in fds:
        os.close(fd)
    conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
    _, status = os.waitpid(pid, 0)
    with contextlib.suppress(OSError):  # the client may be gone
        conn.sendall(json.dumps({"code": os.waitstatus_to_exitcode(status)}).encode() + b"\n")
    os._exit(0)


def serve(path: str) -> None:
    _die_with_parent()
    _preload()
    # What the imports made is never collected: out of the collector's sight, a child's first
    # full collection does not touch (and so copy) every page of the inherited heap.
    gc.collect()
    gc.freeze()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the handlers are reaped by the kernel
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    print(READY, flush=True)
    while True:
        conn, _ = listener.accept()
        if os.fork() == 0:
            listener.close()
            _handle(conn)
        conn.close()


# -- the client ----------------------------------------------------------------------------


class Process:
    """A command forked by the server, with the parts of `subprocess.Popen` the tests use."""

    def __init__(
        self,
        server: str,
        args: list[str],
        env: dict[str, str],
        stdin: Any = None,
        stdout: Any = None,
        stderr: Any = None,
        text: bool = False,
        start_new_session: bool = False,
    ) -> None:
        self.args = ["lmforge", *args]
        self.returncode: int | None = None
        self.stdin = self.stdout = self.stderr = None
        ours: list[int] = []  # descriptors this side opened for the child: closed once sent
        child = []
        for target, spec in enumerate((stdin, stdout, stderr)):
            if spec is None:
                child.append(target)
            elif spec == subprocess.STDOUT:
                child.append(child[1])
            elif spec == subprocess.DEVNULL:
                fd = os.open(os.devnull, os.O_RDWR)
                ours.append(fd)
                child.append(fd)
            elif spec == subprocess.PIPE:
                read, write = os.pipe()
                mine, theirs = (write, read) if target == 0 else (read, write)
                ours.append(theirs)
                child.append(theirs)
                mode = ("w" if target == 0 else "r") + ("" if text else "b")
                stream = open(mine, mode)  # noqa: SIM115  (closed by __exit__ or its reader)
                setattr(self, ("stdin", "stdout", "stderr")[target], stream)
            else:
                child.append(spec if isinstance(spec, int) else spec.fileno())
        request = {"args": args, "env": env, "cwd": os.getcwd(), "new_session": start_new_session}
        self.conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.conn.connect(server)
            socket.send_fds(self.conn, [json.dumps(request).encode() + b"\n"], child)
            self.stream = self.conn.makefile("r", encoding="utf-8")
            self.pid = int(json.loads(self.stream.readline())["pid"])
        finally:
            for fd in ours:
                os.close(fd)
        self.done = threading.Event()
        threading.Thread(target=self._wait_for_exit, daemon=True).start()

    def _wait_for_exit(self) -> None:
        line = self.stream.readline()
        self.returncode = int(json.loads(line)["code"]) if line else -signal.SIGKILL
        self.stream.close()
        self.conn.close()
        self.done.set()

    def poll(self) -> int | None:
        return self.returncode if self.done.is_set() else None

    def wait(self, timeout: float | None = None) -> int:
        if not self.done.wait(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout or 0)
        assert self.returncode is not None
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[Any, Any]:
        """Read the piped stdout and stderr to their ends and wait (no input: close stdin)."""
        if self.stdin is not None:
            self.stdin.close()
        results: dict[str, Any] = {}
        readers = [
            threading.Thread(target=lambda n=name, s=stream: results.update({n: s.read()}))
            for name, stream in (("stdout", self.stdout), ("stderr", self.stderr))
            if stream is not None
        ]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(timeout)
            if reader.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
        self.wait(timeout)
        return results.get("stdout"), results.get("stderr")

    def send_signal(self, sig: int) -> None:
        if not self.done.is_set():
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def __enter__(self) -> Process:
        return self

    def __exit__(self, *exc: object) -> None:
        for stream in (self.stdin, self.stdout, self.stderr):
            if stream is not None:
                stream.close()
        self.wait()


class Zygote:
    """One server per pytest worker, started at the first command and stopped at exit."""

    def __init__(self) -> None:
        tmp = "/tmp" if Path("/tmp").is_dir() else None  # a Unix socket's path is short
        self.dir = Path(tempfile.mkdtemp(prefix="lmz", dir=tmp))
        self.socket = str(self.dir / "s")
        self.process = subprocess.Popen(
            [sys.executable, __file__, self.socket],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()
        if line != READY:
            raise RuntimeError(f"the test zygote did not start (exit {self.process.wait()})")
        atexit.register(self.close)

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        Path(self.socket).unlink(missing_ok=True)
        self.dir.rmdir()


_zygote: Zygote | None = None
_zygote_lock = threading.Lock()


def _server() -> str:
    global _zygote
    with _zygote_lock:
        if _zygote is None:
            _zygote = Zygote()
        return _zygote.socket


def popen(args: list[str], env: dict[str, str], **streams: Any) -> Process:
    """`subprocess.Popen(["lmforge", *ARGS], env=ENV, stdin=…, stdout=…, stderr=…,
    text=…, start_new_session=…)` as a process forked from this worker's server."""
    return Process(_server(), args, env, **streams)


def run(
    args: list[str], env: dict[str, str], stdin: str, timeout: float
) -> subprocess.CompletedProcess[str]:
    """`subprocess.run(["lmforge", *ARGS], env=ENV, input=STDIN, capture_output=True,
    text=True, timeout=TIMEOUT)` as a process forked from this worker's server."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        with tempfile.TemporaryFile() as source:
            source.write(stdin.encode(locale.getpreferredencoding(False)))
            source.seek(0)
            process = popen(args, env, stdin=source, stdout=out, stderr=err)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise subprocess.TimeoutExpired(process.args, timeout, _text(out), _text(err)) from None
        return subprocess.CompletedProcess(process.args, process.wait(), _text(out), _text(err))


def _text(file: Any) -> str:
    """FILE's bytes as `subprocess.run(text=True)` gives them: locale-decoded, newlines
    translated."""
    file.seek(0)
    data = file.read().decode(locale.getpreferredencoding(False))
    return data.replace("\r\n", "\n").replace("\r", "\n")


SOCKET_ENV = "LMFORGE_TEST_ZYGOTE"  # the server's socket, for `client` in another process


def enabled() -> bool:
    """Whether tests fork their commands from the server ($LMFORGE_TEST_FORK=0: they do not)."""
    return os.environ.get("LMFORGE_TEST_FORK", "1") != "0"


def client(args: list[str]) -> int:
    """`python zygote.py --client ARGS`: `lmforge ARGS` forked from the server whose socket is
    $LMFORGE_TEST_ZYGOTE, on this process's stdin, stdout and stderr and with its environment;
    SIGTERM, SIGINT and SIGHUP are passed on; exits as the command does. What the benches run
    as `lmforge` in `make test` (bench/_shared.py's $LMFORGE_BENCH_COMMAND)."""
    env = dict(os.environ)
    process = Process(env.pop(SOCKET_ENV), args, env)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, _: process.send_signal(signum))
    code = process.wait()
    if code < 0:  # died of a signal: so does this process
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


def client_command() -> tuple[list[str], dict[str, str]]:
    """The command prefix that runs `lmforge` through this worker's server, and the
    environment it needs."""
    return [sys.executable, __file__, "--client"], {SOCKET_ENV: _server()}


if __name__ == "__main__":
    if sys.argv[1] == "--client":
        sys.exit(client(sys.argv[2:]))
    serve(sys.argv[1])
