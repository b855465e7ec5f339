"""A real `lmforge serve` process on 127.0.0.1 serving a tiny random Llama (import the fixture)."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from conftest import LMFORGE, run_env, tiny_config

TINY_NAME = "tiny-llama"


@dataclass
class Server:
    url: str  # http://127.0.0.1:PORT
    model: str  # the served model's name
    model_dir: Path
    process: subprocess.Popen[str]

    def metric(self, name: str) -> float:
        """The value of Prometheus metric lmforge_NAME for the served model."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        for line in text.splitlines():
            if line.startswith(f"lmforge_{name}") and not line.startswith("#"):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"no metric lmforge_{name} in:\n{text}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_model_dir(root: Path, tokenizer) -> Path:  # type: ignore[no-untyped-def]
    import torch

    from lmforge.model.checkpoint import save_model
    from lmforge.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(tiny_config("llama", max_seq_len=128)).eval()
    return save_model(model, tokenizer, root / TINY_NAME)


def start_server(model_dir: Path, home: Path, *extra: str) -> Server:
    port = free_port()
    process = subprocess.Popen(
        [*LMFORGE, "serve", str(model_dir), "--port", str(port), "--threads", "1", *extra],
        env=run_env(home),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        assert process.poll() is None, process.communicate()[0]
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server did not become ready"
        time.sleep(0.1)
    return Server(url, model_dir.stem, model_dir, process)


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
