"""Running the app under uvicorn: one process, or N worker processes on one socket; both drain.

`DrainingServer` is uvicorn's server with lmforge's shutdown: on SIGTERM (or Ctrl-C) `/ready`
and every new request get 503 at once while the requests in flight (streams included) run to
their end; then the listener closes, the last bytes are sent and the process exits 0. A second
signal stops at once.

`run_workers` is the N-process form. uvicorn's own supervisor builds a plain `uvicorn.Server`
in each worker, so SIGTERM would close every worker's listener at once; here the parent binds
the socket, starts N spawned workers that each build their app (`app_from_env`) and run a
`DrainingServer` on it, forwards SIGTERM/SIGINT to them, waits for them to drain, and restarts
a worker that dies on its own. It exits 0 when every worker drained cleanly.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import uvicorn

if TYPE_CHECKING:
    from lmforge.serve.state import ServerState

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 120.0
"""On SIGTERM, requests still generating after this long are cut off by the shutdown."""


class DrainingServer(uvicorn.Server):
    """uvicorn's server, draining STATE's requests before it stops (see the module doc)."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig: int, frame: Any) -> None:
        """While requests are generating, the listener stays open and new requests get 503
        with Retry-After (`/ready` too), so a load balancer moves them elsewhere; once nothing
        generates, uvicorn's graceful shutdown closes the listener and waits for the last
        bytes of every stream."""
        state = self.state
        if state.draining:
            super().handle_exit(sig, frame)
            return
        state.draining = True

        def drain_then_exit() -> None:
            deadline = time.monotonic() + DRAIN_TIMEOUT_S
            while state.busy() and time.monotonic() < deadline:
                time.sleep(0.05)
            super(DrainingServer, self).handle_exit(sig, frame)

        threading.Thread(target=drain_then_exit, name="drain", daemon=True).start()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn re-raises SIGTERM after its graceful shutdown, so the process would end
        # "killed by SIGTERM"; a drained server has done its job and exits 0.
        with super().capture_signals():
            yield
            self._captured_signals.clear()


def server_config(app: Any, host: str, port: int) -> uvicorn.Config:
    """uvicorn's settings for lmforge (one process or each worker)."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="info",
        http="h11",
        h11_max_incomplete_event_size=64 * 1024,  # headers still arriving; SizeLimits caps the rest
        timeout_graceful_shutdown=None,
    )


def _worker(sock: socket.socket, host: str, port: int) -> None:
    """One worker process: its own app (models loaded here), a DrainingServer on SOCK."""
    from lmforge.serve.app import create_app, settings_from_env
    from lmforge.serve.state import ServerState

    settings = settings_from_env()
    state = ServerState(settings)
    app = create_app(settings, state=state)
    logging.getLogger("lmforge").setLevel(logging.INFO)
    server = DrainingServer(server_config(app, host, port), state)
    state.on_load_error = lambda: setattr(server, "should_exit", True)
    server.run(sockets=[sock])
    if state.load_error:
        raise SystemExit(3)


def run_workers(host: str, port: int, workers: int) -> int:
    """Serve on HOST:PORT with WORKERS processes until SIGTERM/SIGINT; the exit status (0: all
    drained). The app's settings are in the environment (`app.SETTINGS_ENV`)."""
    config = server_config("lmforge.serve.app:app_from_env", host, port)
    sock = config.bind_socket()
    context = multiprocessing.get_context("spawn")
    stopping = threading.Event()
    signals: list[int] = []

    def on_signal(sig: int, _frame: Any) -> None:
        signals.append(sig)
        stopping.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    def start() -> multiprocessing.process.BaseProcess:
        process = context.Process(target=_worker, args=(sock, host, port), daemon=False)
        process.start()
        return process

    processes = [start() for _ in range(workers)]
    try:
        while not stopping.wait(0.5):
            for i, process in enumerate(processes):
                if not process.is_alive():
                    if process.exitcode == 3:  # the models cannot be loaded: no restart
                        log.error("a worker could not load its models; stopping")
                        stopping.set()
                        break
                    log.warning("worker %s exited (%s); starting another", process.pid,
                                process.exitcode)  # fmt: skip
                    processes[i] = start()
        if not signals:  # stopping on a worker's failure: drain the others
            signals.append(signal.SIGTERM)
        forwarded = 0
        while any(p.is_alive() for p in processes):
            while forwarded < len(signals):  # the first signal drains, a second stops at once
                for process in processes:
                    if process.is_alive() and process.pid is not None:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(process.pid, signal.SIGTERM)
                forwarded += 1
            time.sleep(0.05)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
    return 0 if all(p.exitcode == 0 for p in processes) else 1
