"""Graceful drain of a real `lmforge serve`, one process and two workers: SIGTERM with 10
streams in flight. New requests get 503 with Retry-After while they run, every stream finishes
with its full usage and [DONE], the ledger has all 10, and the process exits 0."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from served import make_model_dir, start_server

from lmforge.registry import db, ledger

STREAMS = 10
TOKENS = 200


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_with_10_streams_in_flight(
    tmp_path: Path, tiny_tokenizer: Any, workers: int
) -> None:
    # A model slow enough (8 layers, 256 wide) that 10 × 200 tokens take a few seconds.
    model_dir = make_model_dir(tmp_path, tiny_tokenizer, d_model=256, n_layer=8, n_head=4,
                               max_seq_len=512)  # fmt: skip
    server = start_server(
        model_dir, tmp_path / "home", "--max-batch", "16", "--workers", str(workers)
    )
    ready_in_a_row, deadline = 0, time.monotonic() + 60
    while ready_in_a_row < 30:  # every worker has loaded (connections land on any of them)
        assert time.monotonic() < deadline, "the workers did not all become ready"
        ok = httpx.get(f"{server.url}/ready", timeout=10).status_code == 200
        ready_in_a_row = ready_in_a_row + 1 if ok else 0
    body = {"model": server.model, "prompt": "drain me", "max_tokens": TOKENS, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}  # fmt: skip
    events: list[list[str]] = [[] for _ in range(STREAMS)]
    ids: list[str] = [""] * STREAMS

    def read(i: int) -> None:
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120,
                          headers=server.headers) as r:  # fmt: skip
            ids[i] = r.headers["x-request-id"]
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events[i].append(line[6:])

    readers = [threading.Thread(target=read, args=(i,)) for i in range(STREAMS)]
    try:
        for t in readers:
            t.start()
        deadline = time.monotonic() + 60
        while not all(len(e) >= 2 for e in events):  # every stream has begun
            assert time.monotonic() < deadline, "the streams did not start"
            time.sleep(0.01)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        refused = httpx.post(f"{server.url}/v1/completions", headers=server.headers, timeout=30,
                             json={**body, "stream": False, "max_tokens": 4})  # fmt: skip
        ready = httpx.get(f"{server.url}/ready", timeout=30)
        still_running = sum(1 for e in events if not e or e[-1] != "[DONE]")
        for t in readers:
            t.join(120)
        code = server.process.wait(60)
    finally:
        if server.process.poll() is None:
            server.process.kill()
    assert still_running > 0, "the streams ended before the signal: the test proves nothing"
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["message"] == "the server is draining"
    assert ready.status_code == 503
    assert code == 0
    for e in events:
        assert e[-1] == "[DONE]"
        assert json.loads(e[-2])["usage"]["completion_tokens"] == TOKENS
    engine = db.connect(home=tmp_path / "home")
    try:
        with engine.connect() as conn:
            rows = [ledger.get_usage(conn, request_id=rid) for rid in ids]
    finally:
        engine.dispose()
    assert all(r is not None and r.status == "ok" and r.completion_tokens == TOKENS for r in rows)
