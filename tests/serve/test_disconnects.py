"""Disconnects under load on a real `lmforge serve`: 50 streams, 25 closed by their clients
after the first token. Those stop generating within 2 s of the close and are billed for what
was generated, no more; the other 25 run to their end; the ledger holds all 50."""

from __future__ import annotations

import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from served import create_key, make_model_dir, start_server, stop_server

from conftest import lmforge
from lmforge.ops.pricing import cost_nusd
from lmforge.registry import db, ledger

STREAMS = 50
TOKENS = 200


@pytest.mark.slow
def test_half_of_50_streams_disconnect_after_the_first_token(
    tmp_path: Path, tiny_tokenizer: Any
) -> None:
    home = tmp_path / "home"
    model_dir = make_model_dir(tmp_path, tiny_tokenizer, d_model=256, n_layer=8, n_head=4,
                               max_seq_len=512)  # fmt: skip
    for args in (("models", "import", str(model_dir), "--name", "slow"),
                 ("models", "price", "slow", "--input", "1", "--output", "3")):  # fmt: skip
        proc = lmforge(*args, home=home)
        assert proc.returncode == 0, proc.stderr
    server = start_server(Path("slow"), home, "--max-batch", "16")
    key = create_key(home, "client")
    body = {"model": "slow", "prompt": "a long story", "max_tokens": TOKENS, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}  # fmt: skip
    ids, closed_at, done = [""] * STREAMS, [0.0] * STREAMS, [False] * STREAMS

    def stream(i: int) -> None:
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120,
                          headers={"Authorization": f"Bearer {key}"}) as r:  # fmt: skip
            ids[i] = r.headers["x-request-id"]
            for line in r.iter_lines():
                if i % 2 and line.startswith("data: {"):
                    closed_at[i] = time.time()
                    return  # leaving the block closes the connection mid-stream
                done[i] = done[i] or line == "data: [DONE]"

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(STREAMS)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        rows = _ledger_rows(home, ids)
    finally:
        stop_server(server)
    for i, row in enumerate(rows):
        billed = cost_nusd(row.prompt_tokens, row.completion_tokens, 1_000_000, 3_000_000)
        assert row.cost_nusd == billed, (i, row)  # what was generated, at the model's price
        if i % 2:  # closed after its first token
            assert row.status == "cancelled" and 1 <= row.completion_tokens < TOKENS, (i, row)
            settled = datetime.fromisoformat(row.created_at.replace("Z", "+00:00")).timestamp()
            # The ledger row is written when the request ends: after the close, within 2 s.
            assert -0.05 <= settled - closed_at[i] <= 2.0, (i, settled - closed_at[i])
        else:
            assert done[i] and row.status == "ok" and row.completion_tokens == TOKENS, (i, row)


def _ledger_rows(home: Path, ids: list[str]) -> list[Any]:
    engine = db.connect(home=home)
    try:
        deadline = time.monotonic() + 10
        while True:
            with engine.connect() as conn:
                rows = [ledger.get_usage(conn, request_id=rid) for rid in ids]
            if all(rows) or time.monotonic() > deadline:
                assert all(rows), "requests missing from the ledger"
                return rows
            time.sleep(0.1)
    finally:
        engine.dispose()
