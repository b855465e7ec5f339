"""The second-generation serving core over real HTTP: fault isolation across concurrent callers,
extreme but valid parameters, `logit_bias`, and prefix caching as a client sees them.

Two kinds of server: a real `lmforge serve` process (tiny Llama, 2048-token context), and, for
fault injection, the real app and engine under uvicorn in this process, whose engine is told
to fail the sampling of requests carrying a marker token (the injected fault).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
import uvicorn
from served import Server, make_model_dir, start_server, stop_server

from conftest import free_port
from lmforge.infer.engine import AsyncEngine
from lmforge.registry.ledger import get_usage
from lmforge.serve.app import create_app
from lmforge.serve.state import ServedModel, ServerSettings, ServerState, load_served

MARKER = 300  # a prompt holding this token id fails inside sampling on the fault server


@pytest.fixture(scope="module")
def long_server(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("core")
    model_dir = make_model_dir(root, tiny_tokenizer, max_seq_len=2048)
    server = start_server(model_dir, root / "home", "--max-batch", "8")
    yield server
    stop_server(server)


def client_for(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.key, max_retries=0)


# -- extreme but valid parameters ---------------------------------------------------------------

EXTREMES: list[dict[str, Any]] = [
    {"temperature": 5e-324},
    {"temperature": 1e-300, "top_p": 1e-300},
    {"temperature": 2, "top_p": 1, "min_p": 0.999999},
    {"temperature": 1, "top_k": 1, "seed": -(2**63)},
    {"temperature": 1, "seed": 2**63 - 1},
    {"repetition_penalty": 5e-324, "temperature": 0.5, "seed": 1},
    {"repetition_penalty": 10, "temperature": 2, "seed": 2},
    {"presence_penalty": 2, "frequency_penalty": 2, "temperature": 0},
    {"presence_penalty": -2, "frequency_penalty": -2, "temperature": 1, "seed": 3},
    {"logit_bias": {"0": 100, "5": -100}},
    {"logit_bias": {str(t): -100 for t in range(1, 384)}, "temperature": 1.3, "seed": 4},
    {"logit_bias": {"1": 100, "2": 100}, "temperature": 5e-324},
]


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_extreme_but_valid_parameters_are_200s(long_server: Server, route: str) -> None:
    base: dict[str, Any] = {"model": long_server.model, "max_tokens": 4}
    if route == "/v1/completions":
        base["prompt"] = "The quick brown fox"
    else:
        base["messages"] = [{"role": "user", "content": "The quick brown fox"}]
    with long_server.client(timeout=60) as c:
        for extra in EXTREMES:
            r = c.post(route, json={**base, **extra})
            assert r.status_code == 200, (extra, r.text)
            assert r.json()["usage"]["completion_tokens"] >= 1, extra
        for extra in EXTREMES[:3]:  # streamed too: no error event
            r = c.post(route, json={**base, **extra, "stream": True})
            assert r.status_code == 200 and '"error"' not in r.text, (extra, r.text)


# -- logit_bias ------------------------------------------------------------------------------------


def test_logit_bias_forces_and_bans_as_openai_documents(
    long_server: Server, tiny_tokenizer: Any
) -> None:
    import lmforge

    client = client_for(long_server)
    llm = lmforge.load(str(long_server.model_dir))  # the same weights, in process
    prompt = tiny_tokenizer.encode("Pack my box with five dozen")
    target = tiny_tokenizer.encode(" fox")[0]

    def served(**extra: Any) -> str:
        done = client.completions.create(
            model=long_server.model, prompt=prompt, max_tokens=5, temperature=0,
            extra_body={"ignore_eos": True}, **extra,
        )  # fmt: skip
        return done.choices[0].text

    assert served(logit_bias={str(target): 100}) == tiny_tokenizer.decode([target] * 5)
    free = llm.complete(prompt, max_tokens=5, ignore_eos=True)
    assert served() == free.text
    ban = dict.fromkeys(free.token_ids, -100.0)
    banned = llm.complete(prompt, max_tokens=5, ignore_eos=True, logit_bias=ban)
    assert not set(banned.token_ids) & set(free.token_ids)
    assert served(logit_bias={str(t): v for t, v in ban.items()}) == banned.text
    chat = client.chat.completions.create(
        model=long_server.model, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
        logit_bias={str(target): 100},
    )  # fmt: skip
    assert chat.choices[0].message.content == tiny_tokenizer.decode([target] * 3)
    for bias in ({"384": 1}, {"5": 101}):
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(
                model=long_server.model, prompt="x", max_tokens=2, logit_bias=bias
            )
        assert info.value.body["param"] == "logit_bias"  # type: ignore[index]


# -- prefix caching --------------------------------------------------------------------------------


def long_system_prompt(tokenizer: Any, tokens: int) -> str:
    words = " ".join(f"rule {i}: answer briefly and kindly" for i in range(tokens))
    ids = tokenizer.encode(words)[:tokens]
    return str(tokenizer.decode(ids))


def test_a_repeated_1500_token_system_prompt_is_served_from_the_cache(
    long_server: Server, tiny_tokenizer: Any
) -> None:
    client = client_for(long_server)
    system = long_system_prompt(tiny_tokenizer, 1500)
    hits_before = long_server.metric("prefix_cache_hits_total")
    queries_before = long_server.metric("prefix_cache_queries_total")

    def ask(question: str, **extra: Any) -> Any:
        return client.chat.completions.create(
            model=long_server.model,
            messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
            max_tokens=3, temperature=0, **extra,
        )  # fmt: skip

    first = ask("What is the first rule?")
    assert first.usage is not None and first.usage.prompt_tokens >= 1500
    assert first.usage.prompt_tokens_details is not None
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    second = ask("And the last one?")
    assert second.usage is not None and second.usage.prompt_tokens_details is not None
    assert second.usage.prompt_tokens_details.cached_tokens >= 1400
    stream = ask("Any other?", stream=True, stream_options={"include_usage": True})
    usage = [chunk.usage for chunk in stream if chunk.usage is not None]
    assert usage and usage[0].prompt_tokens_details is not None
    assert usage[0].prompt_tokens_details.cached_tokens >= 1400
    hits = long_server.metric("prefix_cache_hits_total") - hits_before
    assert hits == second.usage.prompt_tokens_details.cached_tokens + (
        usage[0].prompt_tokens_details.cached_tokens
    )
    assert long_server.metric("prefix_cache_queries_total") - queries_before >= 3 * 1500


def test_without_prefix_caching_nothing_is_cached(
    tmp_path: Path, tiny_tokenizer: Any, long_server: Server
) -> None:
    server = start_server(long_server.model_dir, tmp_path / "home", "--no-prefix-cache",
                          "--kv-cache-memory", "8MiB")  # fmt: skip
    try:
        client = client_for(server)
        prompt = long_system_prompt(tiny_tokenizer, 300)
        for _ in range(2):
            done = client.completions.create(model=server.model, prompt=prompt, max_tokens=2)
            assert done.usage is not None and done.usage.prompt_tokens_details is not None
            assert done.usage.prompt_tokens_details.cached_tokens == 0
        assert server.metric("prefix_cache_hits_total") == 0
        log = server.log_path.read_text()
        # 8 MiB / 256 bytes a token (2 layers × K and V × 2 heads × 8 dims × 4 bytes)
        assert "prefix caching off" in log and "KV cache of 32768 tokens" in log
    finally:
        stop_server(server)


# -- fault isolation -------------------------------------------------------------------------------


class Boom:
    def __call__(
        self, prompt_ids: Sequence[int], output_ids: Sequence[int], logits: torch.Tensor
    ) -> torch.Tensor:
        if len(output_ids) >= 2:
            raise RuntimeError("injected sampling failure")
        return logits


def faulty_loader(spec: str | None, settings: ServerSettings) -> ServedModel:
    """`load_served`, then the engine fails the sampling of every request holding MARKER."""
    served = load_served(spec, settings)
    assert isinstance(served.engine, AsyncEngine)
    engine = served.engine.engine
    add = engine.add_request

    def add_request(prompt_ids, params, request_id=None, *, processors=()):  # type: ignore[no-untyped-def]
        if MARKER in prompt_ids:
            processors = [*processors, Boom()]
        return add(prompt_ids, params, request_id, processors=processors)

    engine.add_request = add_request  # type: ignore[method-assign]
    return served


@pytest.fixture(scope="module")
def fault_server(
    tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any
) -> Iterator[tuple[str, ServerState]]:
    root = tmp_path_factory.mktemp("faults")
    model_dir = make_model_dir(root, tiny_tokenizer, max_seq_len=256)
    settings = ServerSettings(models=[str(model_dir)], auth=False, home=root / "home", max_batch=8)
    state = ServerState(settings, loader=faulty_loader)
    port = free_port()
    config = uvicorn.Config(create_app(settings, state=state), host="127.0.0.1", port=port,
                            log_level="warning")  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while not (state.loaded.is_set() and _ready(url)):
        assert thread.is_alive() and time.monotonic() < deadline, state.load_error
        time.sleep(0.05)
    yield url, state
    server.should_exit = True
    thread.join(30)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ready", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def fault_bodies(tokenizer: Any) -> list[dict[str, Any]]:
    """Eight requests of mixed kinds; the sixth carries MARKER (and fails)."""
    bodies = []
    for i in range(8):
        prompt = tokenizer.encode(f"Request number {i}: the quick brown fox")
        if i == 5:
            prompt = [*prompt, MARKER]
        body: dict[str, Any] = {"model": "tiny-llama", "prompt": prompt, "max_tokens": 10}
        body.update(
            [{"temperature": 0}, {"temperature": 0.8, "seed": i}, {"presence_penalty": 1.0,
             "temperature": 0.5, "seed": i}][i % 3]
        )  # fmt: skip
        body["stream"] = i % 2 == 1
        bodies.append(body)
    return bodies


def call(url: str, body: dict[str, Any]) -> tuple[int, str, str]:
    """(status, text or error message, request id) of one completion, streamed or not."""
    with httpx.Client(base_url=url, timeout=120) as c:
        r = c.post("/v1/completions", json=body)
    rid = r.headers.get("x-request-id", "")
    if not body.get("stream"):
        data = r.json()
        return (
            r.status_code,
            data["choices"][0]["text"] if r.is_success else data["error"]["message"],
            rid,
        )
    text, events = "", [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", r.text
    for event in events[:-1]:
        data = httpx.Response(200, content=event).json()
        if "error" in data:
            return 500, data["error"]["message"], rid
        text += "".join(c.get("text", "") for c in data["choices"])
    return r.status_code, text, rid


def test_one_failing_request_among_eight_concurrent_stays_its_own(
    fault_server: tuple[str, ServerState], tiny_tokenizer: Any
) -> None:
    url, state = fault_server
    bodies = fault_bodies(tiny_tokenizer)
    solo = [call(url, b) for b in bodies]  # one at a time: what each produces alone
    barrier = threading.Barrier(len(bodies))
    results: list[tuple[int, str, str] | None] = [None] * len(bodies)

    def run(i: int) -> None:
        barrier.wait()
        results[i] = call(url, bodies[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i, (result, alone) in enumerate(zip(results, solo, strict=True)):
        assert result is not None
        if i == 5:
            assert result[0] == 500 and "injected sampling failure" in result[1]
        else:
            assert result[:2] == alone[:2] and result[0] == 200, i  # token-identical to solo
    with state.registry.connect() as conn:
        rows = [get_usage(conn, request_id=r[2]) for r in results if r is not None]
    assert all(row is not None for row in rows) and len(rows) == 8  # the ledger has 8 rows
    statuses = sorted(row.status for row in rows if row is not None)
    assert statuses == ["error"] + ["ok"] * 7
    after = call(url, bodies[0])  # the server serves the next request
    assert after[:2] == solo[0][:2]
