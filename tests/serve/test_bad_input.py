"""Bad input to a real `lmforge serve`: every malformed, mistyped, out-of-range or oversized
request gets a 4xx in OpenAI's error shape, naming the field, and the server keeps serving.

Most tests share the module's `tiny_server` (max_model_len 128, vocab 384); the bounded-queue
test starts its own server with `--max-batch 1 --max-queue 1`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from served import TINY_NAME, Server, make_model_dir, start_server, stop_server, tiny_server

MODEL = TINY_NAME
CONTEXT = 128  # the tiny model's max_model_len
VOCAB = 384
CMPL = "/v1/completions"
CHAT = "/v1/chat/completions"
EMBED = "/v1/embeddings"
TEN_MB = 10 * 1024 * 1024

NO_PARAM = object()
"""`param` is not checked (an error about the body as a whole may or may not name one)."""


def completion(**overrides: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 2, **overrides}


def chat(**overrides: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": "Pack my box"}]
    return {"model": MODEL, "messages": messages, "max_tokens": 2, **overrides}


def without(body: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != key}


def raw(body: dict[str, Any], key: str, literal: str) -> bytes:
    """BODY as JSON text with KEY's value written as LITERAL (e.g. NaN, which json.dumps
    would not produce from a placeholder)."""
    text = json.dumps({**body, key: "@@"})
    return text.replace('"@@"', literal).encode()


def post(client: httpx.Client, path: str, payload: dict[str, Any] | bytes) -> httpx.Response:
    content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return client.post(path, content=content, headers={"content-type": "application/json"})


def assert_error(
    r: httpx.Response, status: int, param: object = NO_PARAM, code: str | None = None
) -> dict[str, Any]:
    """R is STATUS with a JSON body in OpenAI's error shape; PARAM and CODE as given."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"].strip(), error
    assert "Traceback" not in error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    if param is not NO_PARAM:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


def assert_serving(client: httpx.Client) -> None:
    """/health is 200 and a normal completion still works."""
    assert client.get("/health").status_code == 200
    r = post(client, CMPL, completion(temperature=0))
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["object"] == "text_completion" and len(data["choices"]) == 1
    assert data["usage"]["completion_tokens"] >= 1


@pytest.fixture(scope="module")
def client(tiny_server: Server) -> Iterator[httpx.Client]:
    with tiny_server.client(timeout=60) as c:
        yield c


# ---------------------------------------------------------------------------------------------
# Bodies that are not JSON objects


@pytest.mark.parametrize("path", [CMPL, CHAT, EMBED, "/tokenize", "/detokenize"])
@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b'{"model": ', id="truncated"),
        pytest.param(b"{model: 1}", id="unquoted-key"),
        pytest.param(b"", id="empty"),
        pytest.param(b"[]", id="array"),
        pytest.param(b'"x"', id="string"),
        pytest.param(b"5", id="number"),
        pytest.param(b"null", id="null"),
        pytest.param(b'{"model": "\xc3\x28", "prompt": "a"}', id="invalid-utf8"),
        pytest.param(b'\xff\x00{"model": 1}', id="binary-garbage"),
        pytest.param(b"[" * 100_000, id="deep-nesting"),
        pytest.param(b'{"model": "m", "prompt": [' + b"7" * 5000 + b"]}", id="5000-digit-int"),
    ],
)
def test_body_that_is_not_a_json_object_is_400(
    client: httpx.Client, path: str, payload: bytes
) -> None:
    assert_error(post(client, path, payload), 400)


def test_server_still_serves_after_garbage_bodies(client: httpx.Client) -> None:
    for payload in (b"{", b"[]", b"\xc3\x28", b"[" * 100_000):
        assert_error(post(client, CMPL, payload), 400)
    assert_serving(client)


# ---------------------------------------------------------------------------------------------
# Field errors: wrong types, missing fields, values out of range


BAD_FIELDS = [
    # wrong types (strict: no silent conversion)
    ("max_tokens-str", CMPL, completion(max_tokens="10"), "max_tokens"),
    ("max_tokens-float", CMPL, completion(max_tokens=2.5), "max_tokens"),
    ("temperature-str", CMPL, completion(temperature="hot"), "temperature"),
    ("prompt-int", CMPL, completion(prompt=5), "prompt"),
    ("prompt-null", CMPL, completion(prompt=None), "prompt"),
    ("prompt-dict", CMPL, completion(prompt={"text": "hi"}), "prompt"),
    ("n-bool", CMPL, completion(n=True), "n"),
    ("stream-str", CMPL, completion(stream="yes"), "stream"),
    ("stop-int", CMPL, completion(stop=5), "stop"),
    ("model-int", CMPL, completion(model=5), "model"),
    ("messages-str", CHAT, chat(messages="hi"), "messages"),
    ("message-str", CHAT, chat(messages=["hi"]), "messages"),
    ("content-int", CHAT, chat(messages=[{"role": "user", "content": 5}]), "messages"),
    ("content-part-int", CHAT, chat(messages=[{"role": "user", "content": [5]}]), "messages"),
    (
        "content-part-text-int",
        CHAT,
        chat(messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}]),
        "messages",
    ),
    ("chat-max_tokens-str", CHAT, chat(max_tokens="10"), "max_tokens"),
    ("chat-n-bool", CHAT, chat(n=True), "n"),
    ("chat-stream-str", CHAT, chat(stream="yes"), "stream"),
    ("chat-logprobs-int", CHAT, chat(logprobs=3), "logprobs"),
    ("input-int", EMBED, {"model": MODEL, "input": 5}, "input"),
    # missing fields
    ("no-model", CMPL, without(completion(), "model"), "model"),
    ("no-prompt", CMPL, without(completion(), "prompt"), "prompt"),
    ("chat-no-model", CHAT, without(chat(), "model"), "model"),
    ("no-messages", CHAT, without(chat(), "messages"), "messages"),
    ("empty-messages", CHAT, chat(messages=[]), "messages"),
    ("message-no-role", CHAT, chat(messages=[{"content": "hi"}]), "messages"),
    ("message-bad-role", CHAT, chat(messages=[{"role": "wizard", "content": "hi"}]), "messages"),
    ("embed-no-input", EMBED, {"model": MODEL}, "input"),
    # max_tokens and the context
    ("max_tokens-negative", CMPL, completion(max_tokens=-1), "max_tokens"),
    ("max_tokens-huge", CMPL, completion(max_tokens=10**9), "max_tokens"),
    ("max_tokens-bignum", CMPL, completion(max_tokens=10**30), "max_tokens"),
    ("max_tokens-context", CMPL, completion(max_tokens=CONTEXT), "max_tokens"),
    ("chat-max_tokens-negative", CHAT, chat(max_tokens=-1), "max_tokens"),
    ("chat-max_tokens-huge", CHAT, chat(max_tokens=10**9), "max_tokens"),
    ("max_completion_tokens-huge", CHAT, chat(max_completion_tokens=10**9), "max_tokens"),
    ("stream-max_tokens-huge", CMPL, completion(max_tokens=10**9, stream=True), "max_tokens"),
    ("chat-stream-max_tokens-negative", CHAT, chat(max_tokens=-1, stream=True), "max_tokens"),
    ("prompt-over-context", CMPL, completion(prompt="fox " * 300), "prompt"),
    ("prompt-ids-over-context", CMPL, completion(prompt=[5] * CONTEXT), "prompt"),
    (
        "message-over-context",
        CHAT,
        chat(messages=[{"role": "user", "content": "fox " * 300}]),
        "messages",
    ),
    ("embed-over-context", EMBED, {"model": MODEL, "input": "fox " * 300}, "input"),
    # sampling values out of range
    ("temperature-high", CMPL, completion(temperature=5), "temperature"),
    ("temperature-negative", CMPL, completion(temperature=-0.5), "temperature"),
    ("temperature-nan", CMPL, raw(completion(), "temperature", "NaN"), "temperature"),
    ("temperature-inf", CMPL, raw(completion(), "temperature", "Infinity"), "temperature"),
    ("chat-temperature-nan", CHAT, raw(chat(), "temperature", "NaN"), "temperature"),
    ("chat-temperature-high", CHAT, chat(temperature=5), "temperature"),
    ("n-huge", CMPL, completion(n=10**6), "n"),
    ("n-zero", CMPL, completion(n=0), "n"),
    ("chat-n-huge", CHAT, chat(n=10**6), "n"),
    ("top_p-2", CMPL, completion(top_p=2), "top_p"),
    ("top_p-0", CMPL, completion(top_p=0), "top_p"),
    ("top_p-nan", CMPL, raw(completion(), "top_p", "NaN"), "top_p"),
    ("chat-top_p-2", CHAT, chat(top_p=2), "top_p"),
    ("top_k-negative", CMPL, completion(top_k=-1), "top_k"),
    ("min_p-1", CMPL, completion(min_p=1), "min_p"),
    ("logprobs-99", CMPL, completion(logprobs=99), "logprobs"),
    ("logprobs-negative", CMPL, completion(logprobs=-1), "logprobs"),
    ("top_logprobs-50", CHAT, chat(logprobs=True, top_logprobs=50), "top_logprobs"),
    ("top_logprobs-without-logprobs", CHAT, chat(top_logprobs=2), "top_logprobs"),
    ("presence_penalty-3", CMPL, completion(presence_penalty=3), "presence_penalty"),
    ("chat-presence_penalty-3", CHAT, chat(presence_penalty=3), "presence_penalty"),
    ("frequency_penalty-minus-3", CMPL, completion(frequency_penalty=-3), "frequency_penalty"),
    (
        "presence_penalty-nan",
        CMPL,
        raw(completion(), "presence_penalty", "NaN"),
        "presence_penalty",
    ),
    ("repetition_penalty-0", CMPL, completion(repetition_penalty=0), "repetition_penalty"),
    ("seed-below-int64", CMPL, completion(seed=-(2**63) - 1), "seed"),  # -1 is valid (OpenAI)
    ("seed-huge", CMPL, completion(seed=2**70), "seed"),
    ("stop-17", CMPL, completion(stop=[f"s{i}" for i in range(17)]), "stop"),
    ("stop-empty-string", CMPL, completion(stop=[""]), "stop"),
    ("stop_token_ids-negative", CMPL, completion(stop_token_ids=[-1]), "stop_token_ids"),
    # token ids in the prompt
    ("prompt-id-out-of-vocab", CMPL, completion(prompt=[10**6]), "prompt"),
    ("prompt-id-vocab", CMPL, completion(prompt=[1, VOCAB]), "prompt"),
    ("prompt-id-bignum", CMPL, completion(prompt=[10**30]), "prompt"),
    ("prompt-id-negative", CMPL, completion(prompt=[1, -1]), "prompt"),
    ("prompt-ids-batch-out-of-vocab", CMPL, completion(prompt=[[1, 2], [10**6]]), "prompt"),
    ("prompt-ids-batch-negative", CMPL, completion(prompt=[[1, 2], [-5]]), "prompt"),
    ("prompt-ids-empty", CMPL, completion(prompt=[]), "prompt"),
    ("prompt-ids-batch-empty", CMPL, completion(prompt=[[1], []]), "prompt"),
    ("prompt-ids-mixed", CMPL, completion(prompt=["a", 5]), "prompt"),
    # more choices than the server's queue (64) holds: a 503 would fail on every retry
    ("prompt-batch-over-queue", CMPL, completion(prompt=["fox"] * 100), "prompt"),
    ("prompt-batch-times-n-over-queue", CMPL, completion(prompt=["fox"] * 10, n=16), "prompt"),
    ("input-id-out-of-vocab", EMBED, {"model": MODEL, "input": [10**6]}, "input"),
    ("input-id-negative", EMBED, {"model": MODEL, "input": [-1]}, "input"),
    # tokenizer routes
    ("detokenize-out-of-vocab", "/detokenize", {"tokens": [1, 10**6]}, "tokens"),
    ("detokenize-bignum", "/detokenize", {"tokens": [10**30]}, "tokens"),
    ("detokenize-negative", "/detokenize", {"tokens": [-1]}, "tokens"),
    ("detokenize-str", "/detokenize", {"tokens": "abc"}, "tokens"),
    ("detokenize-strs", "/detokenize", {"tokens": ["a"]}, "tokens"),
    ("detokenize-no-tokens", "/detokenize", {"model": MODEL}, "tokens"),
    ("tokenize-no-prompt", "/tokenize", {"model": MODEL}, "prompt"),
    ("tokenize-prompt-int", "/tokenize", {"prompt": 5}, "prompt"),
]


@pytest.mark.parametrize(
    ("path", "payload", "param"),
    [pytest.param(path, payload, param, id=name) for name, path, payload, param in BAD_FIELDS],
)
def test_bad_field_is_400_naming_it(
    client: httpx.Client, path: str, payload: dict[str, Any] | bytes, param: str
) -> None:
    assert_error(post(client, path, payload), 400, param)


@pytest.mark.parametrize(
    ("path", "payload"),
    [
        pytest.param(CMPL, completion(model="no-such-model"), id="completions"),
        pytest.param(CHAT, chat(model="no-such-model"), id="chat"),
        pytest.param(CMPL, completion(model="no-such-model", stream=True), id="stream"),
        pytest.param(EMBED, {"model": "no-such-model", "input": "hi"}, id="embeddings"),
        pytest.param("/tokenize", {"model": "no-such-model", "prompt": "hi"}, id="tokenize"),
        pytest.param("/detokenize", {"model": "no-such-model", "tokens": [1]}, id="detokenize"),
    ],
)
def test_unknown_model_is_404_model_not_found(
    client: httpx.Client, path: str, payload: dict[str, Any]
) -> None:
    error = assert_error(post(client, path, payload), 404, "model", "model_not_found")
    assert "no-such-model" in error["message"]


def test_unknown_model_in_models_route_is_404(client: httpx.Client) -> None:
    assert_error(client.get("/v1/models/no-such-model"), 404, "model", "model_not_found")


def test_huge_top_k_is_a_no_op_not_a_crash(client: httpx.Client) -> None:
    """top_k beyond the vocabulary keeps every token (as vLLM does); it must not break the
    engine thread."""
    r = post(client, CMPL, completion(top_k=10**6, temperature=1.0, seed=1))
    assert r.status_code in (200, 400), r.text
    if r.status_code == 400:
        assert_error(r, 400, "top_k")
    assert_serving(client)


def test_text_content_parts_work_and_an_image_part_is_refused(client: httpx.Client) -> None:
    parts = [{"type": "text", "text": "Pack my"}, {"type": "text", "text": " box"}]
    r = post(client, CHAT, chat(messages=[{"role": "user", "content": parts}]))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["role"] == "assistant"
    # The image used to be dropped silently: the model answered without what it was asked about.
    image = [*parts, {"type": "image_url", "image_url": {"url": "x"}}]
    r = post(client, CHAT, chat(messages=[{"role": "user", "content": image}]))
    error = assert_error(r, 400, "messages")
    assert "messages[0].content[2] is a 'image_url' part" in error["message"]


def test_server_still_serves_after_bad_fields(client: httpx.Client) -> None:
    for _, path, payload, param in BAD_FIELDS[::7]:
        assert_error(post(client, path, payload), 400, param)
    assert_serving(client)
    assert client.get("/ready").status_code == 200


# ---------------------------------------------------------------------------------------------
# Routes and methods


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/nope"), ("POST", "/v1/nope"), ("GET", "/"), ("POST", "/v1/completions/x")],
)
def test_unknown_route_is_404_in_error_shape(client: httpx.Client, method: str, path: str) -> None:
    assert_error(client.request(method, path, json={}), 404, None)


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", CMPL, "POST"),
        ("GET", CHAT, "POST"),
        ("PUT", CHAT, "POST"),
        ("DELETE", "/tokenize", "POST"),
        ("POST", "/v1/models", "GET"),
        ("POST", "/health", "GET"),
    ],
)
def test_wrong_method_is_405_in_error_shape(
    client: httpx.Client, method: str, path: str, allowed: str
) -> None:
    r = client.request(method, path)
    assert_error(r, 405, None)
    assert allowed in r.headers.get("allow", ""), r.headers


# ---------------------------------------------------------------------------------------------
# Oversized bodies


def _big_body() -> bytes:
    body = json.dumps(completion(prompt="a" * TEN_MB)).encode()
    assert len(body) > TEN_MB
    return body


def test_oversized_body_with_content_length_is_413(client: httpx.Client) -> None:
    r = post(client, CMPL, _big_body())
    assert r.request.headers["content-length"] == str(len(r.request.content))
    assert_error(r, 413, None)
    assert_serving(client)


def test_oversized_chunked_body_without_content_length_is_413(client: httpx.Client) -> None:
    body = _big_body()

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(body), 64 * 1024):
            yield body[i : i + 64 * 1024]

    r = client.post(CMPL, content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers
    assert r.request.headers["transfer-encoding"] == "chunked"
    assert_error(r, 413, None)
    assert_serving(client)


def test_oversized_embedding_and_tokenize_bodies_are_413(client: httpx.Client) -> None:
    payload = {"model": MODEL, "input": "a" * TEN_MB, "prompt": "a" * TEN_MB}
    for path in (EMBED, "/tokenize"):
        assert_error(post(client, path, payload), 413, None)
    assert_serving(client)


# ---------------------------------------------------------------------------------------------
# Many bad requests in a row


def test_hundred_over_context_requests_then_a_normal_one(
    client: httpx.Client,
    tiny_server: Server,
) -> None:
    prompt = [(7 * i) % VOCAB for i in range(200)]
    for _ in range(100):
        assert_error(post(client, CMPL, completion(prompt=prompt)), 400, "prompt")
    assert_serving(client)
    # Nothing was left behind in the engine by the refused requests.
    assert tiny_server.metric("num_requests_waiting") == 0
    assert tiny_server.metric("num_requests_running") == 0


# ---------------------------------------------------------------------------------------------
# A bounded queue: 503 with Retry-After, never a hang or a 500


async def _burst(server: Server, count: int) -> list[httpx.Response]:
    long = {"max_tokens": 100, "ignore_eos": True, "temperature": 0}
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=120) as c:
        jobs = []
        for i in range(count):
            path, body = (CMPL, completion(**long)) if i % 2 else (CHAT, chat(**long))
            if i % 4 == 3:
                body["stream"] = True
            jobs.append(c.post(path, json=body))
        return list(await asyncio.gather(*jobs))


def test_full_queue_is_503_with_retry_after(tmp_path: Path, tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    server = start_server(
        make_model_dir(tmp_path, tiny_tokenizer),
        tmp_path / "home",
        "--max-batch",
        "1",
        "--max-queue",
        "1",
    )
    try:
        responses = asyncio.run(_burst(server, 8))
        refused = [r for r in responses if r.status_code == 503]
        accepted = [r for r in responses if r.status_code == 200]
        assert refused, [r.status_code for r in responses]
        assert accepted, [(r.status_code, r.text) for r in responses]
        assert len(refused) + len(accepted) == len(responses), [r.text for r in responses]
        for r in refused:
            assert_error(r, 503, None)
            assert int(r.headers["retry-after"]) >= 1
        for r in accepted:
            if r.headers["content-type"].startswith("text/event-stream"):
                assert r.text.rstrip().endswith("data: [DONE]"), r.text[-200:]
            else:
                assert r.json()["usage"]["completion_tokens"] == 100, r.text
        with server.client(timeout=60) as c:
            assert_serving(c)
            # Two choices never fit a queue of one: 400, not a 503 to retry forever.
            assert_error(post(c, CMPL, completion(n=2)), 400, "n")
            assert_serving(c)
        assert server.metric("num_requests_waiting") == 0
        assert server.metric("num_requests_running") == 0
    finally:
        stop_server(server)
