"""A real `lmforge serve prod` follows the alias through a promotion and a rollback while
clients keep streaming: no request fails or is cut short, each is recorded with the exact
version that served it, and once the swap is seen no later request goes to the old version."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest
from served import create_key, make_model_dir, start_server, stop_server

from conftest import lmforge
from lmforge.ops.promotion import promote_model, rollback_alias
from lmforge.registry import db, ledger


def stream_once(client: httpx.Client) -> tuple[str, bool]:
    """(request id, ended with [DONE]) of one streamed completion."""
    body = {"model": "prod", "prompt": "Once upon a time", "max_tokens": 48, "stream": True,
            "temperature": 0}  # fmt: skip
    with client.stream("POST", "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        lines = [line for line in r.iter_lines() if line]
        return r.headers["x-request-id"], lines[-1] == "data: [DONE]"


def version_of(home: Path, request_id: str) -> str:
    engine = db.connect(home=home)
    try:
        with engine.connect() as conn:
            deadline = time.monotonic() + 10
            while (row := ledger.get_usage(conn, request_id=request_id)) is None:
                assert time.monotonic() < deadline, f"{request_id} never reached the ledger"
                time.sleep(0.05)
        assert row.status == "ok", row
        return str(row.model_version)
    finally:
        engine.dispose()


@pytest.mark.slow
def test_promote_and_rollback_swap_the_served_version_under_load(
    tmp_path: Path,
    tiny_tokenizer,  # type: ignore[no-untyped-def]
) -> None:
    home = tmp_path / "home"
    model_dir = make_model_dir(tmp_path, tiny_tokenizer)
    for _ in range(2):  # tiny@1 and tiny@2
        proc = lmforge("models", "import", str(model_dir), "--name", "tiny", home=home)
        assert proc.returncode == 0, proc.stderr
    engine = db.connect(home=home)
    promote_model(engine, actor="test", spec="tiny@1", alias="prod", requires=[])
    server = start_server(Path("prod"), home, "--max-batch", "4")
    key = create_key(home, "streamer")
    results: list[list[tuple[str, bool]]] = [[] for _ in range(3)]
    stop = threading.Event()

    def client_loop(out: list[tuple[str, bool]]) -> None:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}) as c:
            while not stop.is_set():
                out.append(stream_once(c))

    threads = [threading.Thread(target=client_loop, args=(r,)) for r in results]
    try:
        for t in threads:
            t.start()
        time.sleep(1.0)
        promote_model(engine, actor="test", spec="tiny@2", alias="prod", requires=[])
        time.sleep(3.0)  # the server polls the alias every second, then loads tiny@2
        rollback_alias(engine, actor="test", alias="prod")
        time.sleep(3.0)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        stop_server(server)
        engine.dispose()
    assert server.process.returncode == 0
    for per_client in results:
        assert per_client and all(done for _, done in per_client)  # none cut short
        served = [version_of(home, rid) for rid, _ in per_client]
        # In order per client: tiny@1, then tiny@2, then tiny@1 again after the rollback.
        runs = [v for i, v in enumerate(served) if i == 0 or v != served[i - 1]]
        assert runs == ["tiny@1", "tiny@2", "tiny@1"], runs
