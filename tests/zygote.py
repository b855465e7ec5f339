"""Runs `lmforge ARGS` for the tests as a fresh process without paying the imports each time.

Every `lmforge` process spends 3–8 s importing torch (and torch._dynamo at the first optimizer,
matplotlib for a chart, …) before it does anything; the suite starts well over a hundred of
them. This module's server (`python zygote.py SOCKET`) imports all of that once per pytest
worker and then, for each request on its Unix socket, forks a child that *is* the command: a
separate process with the test's environment, working directory and stdin/stdout/stderr files,
running the console script's `main(ARGS)` and exiting with its status, as `lmforge ARGS` would.
Nothing in lmforge reads the environment at import time, so importing before the environment
is set changes nothing; the server itself runs no torch op, so no thread pool exists when it
forks.

The server forks twice per request: a handler (which reads the request, reports the command's
pid, waits for it and reports its exit status) and, from it, the command. The server only
accepts and forks, so concurrent requests from one test's threads run concurrently.

`run()` is the client: the shape of `subprocess.run(..., capture_output=True, text=True)`.
`LMFORGE_TEST_FORK=0` makes tests/conftest.py start every command as `python -m
lmforge.cli.main` instead (what this saves: `make test` ~3 minutes on 2 cores)."""

from __future__ import annotations

import atexit
import json
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
    import matplotlib.pyplot  # noqa: F401
    import torch  # noqa: F401
    import torch._dynamo  # noqa: F401  (imported at a training run's first optimizer step)

    import lmforge
    import lmforge.cli.main  # noqa: F401

    for module in pkgutil.walk_packages(lmforge.__path__, "lmforge."):
        if module.name.endswith("ray_executor"):
            continue  # imports Ray, which only `--executor ray` needs
        importlib.import_module(module.name)


def _die_with_parent() -> None:
    """SIGTERM this server when the pytest worker that started it dies (Linux prctl)."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _exit_code(exc: SystemExit) -> int:
    """The status `sys.exit(x)` gives a process: None → 0, an int → itself, else printed, 1."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)
    return 1


def _command(request: dict[str, Any]) -> None:
    """Become `lmforge ARGS` as the request describes, then exit with its status."""
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for fd, (path, flags) in enumerate(
        [
            (request["stdin"], os.O_RDONLY),
            (request["stdout"], os.O_WRONLY | os.O_TRUNC),
            (request["stderr"], os.O_WRONLY | os.O_TRUNC),
        ]
    ):
        opened = os.open(path, flags)
        os.dup2(opened, fd)
        os.close(opened)
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
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _handle(conn: socket.socket) -> None:
    """In the handler process: fork the command, report its pid, wait, report its status."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    with conn.makefile("rw", encoding="utf-8") as stream:
        request = json.loads(stream.readline())
        pid = os.fork()
        if pid == 0:
            stream.close()
            conn.close()
            _command(request)
        stream.write(json.dumps({"pid": pid}) + "\n")
        stream.flush()
        _, status = os.waitpid(pid, 0)
        try:
            stream.write(json.dumps({"code": os.waitstatus_to_exitcode(status)}) + "\n")
            stream.flush()
        except OSError:
            pass  # the client gave up (a timeout) and closed its end
    os._exit(0)


def serve(path: str) -> None:
    _die_with_parent()
    _preload()
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


class Zygote:
    """One server per pytest worker, started at the first command and stopped at exit."""

    def __init__(self) -> None:
        self.dir = Path(
            tempfile.mkdtemp(prefix="lmz", dir="/tmp" if Path("/tmp").is_dir() else None)
        )
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
        self.counter = 0
        self.lock = threading.Lock()
        atexit.register(self.close)

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        for path in self.dir.iterdir():
            path.unlink()
        self.dir.rmdir()

    def run(
        self, args: list[str], env: dict[str, str], stdin: str, timeout: float
    ) -> subprocess.CompletedProcess[str]:
        with self.lock:
            self.counter += 1
            name = f"{os.getpid()}-{self.counter}"
        files = {k: self.dir / f"{name}.{k}" for k in ("stdin", "stdout", "stderr")}
        files["stdin"].write_text(stdin, encoding="utf-8")
        files["stdout"].touch()
        files["stderr"].touch()
        request = {
            "args": args,
            "env": env,
            "cwd": os.getcwd(),
            **{k: str(v) for k, v in files.items()},
        }
        argv = ["lmforge", *args]
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(timeout)
                conn.connect(self.socket)
                with conn.makefile("rw", encoding="utf-8") as stream:
                    stream.write(json.dumps(request) + "\n")
                    stream.flush()
                    pid = json.loads(stream.readline())["pid"]
                    try:
                        code = json.loads(stream.readline())["code"]
                    except TimeoutError:
                        os.kill(pid, signal.SIGKILL)
                        raise subprocess.TimeoutExpired(
                            argv, timeout, _text(files["stdout"]), _text(files["stderr"])
                        ) from None
            return subprocess.CompletedProcess(
                argv, code, _text(files["stdout"]), _text(files["stderr"])
            )
        finally:
            for path in files.values():
                path.unlink(missing_ok=True)


def _text(path: Path) -> str:
    """PATH's bytes as `subprocess.run(text=True)` gives them: locale-decoded, newlines
    translated."""
    import locale

    data = path.read_bytes().decode(locale.getpreferredencoding(False))
    return data.replace("\r\n", "\n").replace("\r", "\n")


_zygote: Zygote | None = None
_zygote_lock = threading.Lock()


def run(
    args: list[str], env: dict[str, str], stdin: str, timeout: float
) -> subprocess.CompletedProcess[str]:
    """`lmforge ARGS` as a fresh process forked from this worker's server."""
    global _zygote
    with _zygote_lock:
        if _zygote is None:
            _zygote = Zygote()
    return _zygote.run(args, env, stdin, timeout)


if __name__ == "__main__":
    serve(sys.argv[1])
