"""A real `lmforge serve` process on 127.0.0.1 serving a tiny random Llama (import the fixture)."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

import pgtest
from conftest import free_port, lmforge_popen, tiny_config

TINY_NAME = "tiny-llama"


@dataclass
class Server:
    url: str  # http://127.0.0.1:PORT
    model: str  # the served model's name
    model_dir: Path
    process: Any  # subprocess.Popen or zygote.Process: poll, wait, send_signal, pid
    key: str  # an admin key
    home: Path
    log_path: Path  # the server's stdout and stderr

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, **kwargs)  # type: ignore[arg-type]

    def metric(self, name: str) -> float:
        """The value of Prometheus metric lmforge:NAME (summed over its label sets)."""
        text = httpx.get(f"{self.url}/metrics", headers=self.headers, timeout=10).text
        values = [
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith((f"lmforge:{name} ", f"lmforge:{name}{{"))
        ]
        if not values:
            raise AssertionError(f"no metric lmforge:{name} in:\n{text}")
        return sum(values)


def create_key(home: Path, name: str, **limits: object) -> str:
    """A new key in HOME's registry (as `lmforge keys create` makes it)."""
    from lmforge.ops.accounts import create_key as create
    from lmforge.registry.db import connect

    engine = connect(pgtest.registry_url(home))
    try:
        return create(engine, actor="test", name=name, **limits)[1]  # type: ignore[arg-type]
    finally:
        engine.dispose()


def make_model_dir(root: Path, tokenizer, **overrides: object) -> Path:  # type: ignore[no-untyped-def]
    """A random tiny Llama saved as TINY_NAME under ROOT (OVERRIDES change its config)."""
    import torch

    from lmforge.model.formats import save_model
    from lmforge.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(tiny_config("llama", **{"max_seq_len": 128, **overrides})).eval()
    return save_model(model, tokenizer, root / TINY_NAME)


def start_server(model_dir: Path, home: Path, *extra: str, key: str | None = None) -> Server:
    """`lmforge serve MODEL_DIR` with HOME as $LMFORGE_HOME; KEY (default: a new admin key)
    is the key `Server.headers` and `Server.metric` use."""
    key = key or create_key(home, f"admin-{free_port()}", admin=True)
    port = free_port()
    log_path = home / "logs" / f"serve-{port}.log"  # a file: a pipe nobody reads fills up
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log_file:
        process = lmforge_popen(
            *("serve", str(model_dir), "--port", str(port), "--threads", "1", *extra),
            home=home,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            text=True,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        assert process.poll() is None, log_path.read_text()
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server did not become ready"
        time.sleep(0.1)
    return Server(url, model_dir.stem, model_dir, process, key, home, log_path)


def burst(servers: list[Server], key: str, n: int, body: dict[str, Any]) -> list[int]:
    """N completions with KEY released at once by a barrier, alternating between SERVERS;
    their status codes."""
    barrier = threading.Barrier(n)
    codes: list[int] = []

    def call(i: int) -> None:
        server = servers[i % len(servers)]
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=server.url, headers=headers, timeout=120) as c:
            barrier.wait()
            codes.append(c.post("/v1/completions", json=body).status_code)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return codes


def stop_server(server: Server) -> None:
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(30)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Iterator[Server]:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("serve")
    server = start_server(make_model_dir(root, tiny_tokenizer), root / "home", "--max-batch", "4")
    yield server
    stop_server(server)
