"""Soak: 16 concurrent streaming clients on the built-in model for LMFORGE_SOAK_SECONDS (CI: 5;
`make reliability`: 120). No 5xx, no truncated stream, every stream ends with [DONE], and the
usage each stream reported equals the ledger's row for it."""

from __future__ import annotations

import json
import os
import random
import threading
import time
from pathlib import Path

import httpx
import pytest
from served import start_server, stop_server

from lmforge.builtin import DEFAULT_MODEL
from lmforge.registry import db, ledger

CLIENTS = 16
SECONDS = float(os.environ.get("LMFORGE_SOAK_SECONDS", "5"))
QUESTIONS = ["What is the capital of France?", "Name three colours.", "Count to five.",
             "Say hello in Spanish.", "What is 2 + 2?", "Write a haiku about rain."]  # fmt: skip


@pytest.mark.slow
@pytest.mark.builtin
def test_16_streaming_clients(builtin_home: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "builtin").symlink_to(builtin_home / "builtin")
    server = start_server(Path(DEFAULT_MODEL), home, "--max-batch", "16", "--threads", "2")
    results: list[tuple[str, int, dict[str, int] | None, bool]] = []  # id, status, usage, done
    lock = threading.Lock()
    stop_at = time.monotonic() + SECONDS

    def client(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=server.url, headers=server.headers, timeout=300) as c:
            while time.monotonic() < stop_at:
                chat = rng.random() < 0.7
                body: dict[str, object] = {
                    "model": DEFAULT_MODEL, "max_tokens": rng.randint(8, 48), "stream": True,
                    "stream_options": {"include_usage": True}, "temperature": 0.7,
                }  # fmt: skip
                if chat:
                    body["messages"] = [{"role": "user", "content": rng.choice(QUESTIONS)}]
                else:
                    body["prompt"] = rng.choice(QUESTIONS)
                path = "/v1/chat/completions" if chat else "/v1/completions"
                usage, done = None, False
                with c.stream("POST", path, json=body) as r:
                    for line in r.iter_lines():
                        if line == "data: [DONE]":
                            done = True
                        elif line.startswith("data: "):
                            chunk = json.loads(line[6:])
                            usage = chunk.get("usage") or usage
                    with lock:
                        results.append((r.headers.get("x-request-id", ""), r.status_code, usage,
                                        done))  # fmt: skip

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(SECONDS + 300)
    finally:
        stop_server(server)
    assert len(results) >= CLIENTS
    assert [r for r in results if r[1] >= 500] == []
    assert [r for r in results if r[1] != 200] == []
    assert all(done and usage for _, _, usage, done in results), "a stream was cut short"
    engine = db.connect(home=home)
    try:
        with engine.connect() as conn:
            for rid, _, usage, _ in results:
                row = ledger.get_usage(conn, request_id=rid)
                assert row is not None and row.status == "ok", rid
                assert usage is not None
                assert (row.prompt_tokens, row.completion_tokens) == (
                    usage["prompt_tokens"], usage["completion_tokens"]), rid  # fmt: skip
    finally:
        engine.dispose()
    tokens = sum(u["completion_tokens"] for _, _, u, _ in results if u)
    print(f"soak: {len(results)} streams, {tokens} tokens in {SECONDS:.0f} s, 0 errors")
