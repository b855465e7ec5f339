"""The official `openai` client (sync, async, streaming) against a real `lmforge serve`."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import struct
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from served import Server, make_model_dir, start_server, stop_server, tiny_server

from conftest import tiny_config
from lmforge.infer.generate import generate_ids
from lmforge.infer.params import SamplingParams
from lmforge.model.formats import LoadedModel, load_model, save_model
from lmforge.model.transformer import Transformer
from lmforge.serve.app import create_app
from lmforge.serve.state import ServerSettings


@pytest.fixture(scope="module")
def local(tiny_server: Server) -> LoadedModel:
    """The served model, loaded in this process: the reference."""
    return load_model(tiny_server.model_dir)


@pytest.fixture(scope="module")
def client(tiny_server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key=tiny_server.key, max_retries=0)


def _reference(local: LoadedModel, prompt_ids: list[int], max_tokens: int) -> list[int]:
    params = SamplingParams(max_tokens=max_tokens, stop_token_ids=local.stop_token_ids())
    return [s.token_id for s in generate_ids(local.model, prompt_ids, params)]


def test_completion_equals_in_process_generation(
    client: openai.OpenAI,
    tiny_server: Server,
    local: LoadedModel,
) -> None:
    prompt = "To be, or not to be"
    r = client.completions.create(
        model=tiny_server.model, prompt=prompt, max_tokens=20, temperature=0
    )
    ids = _reference(local, local.tokenizer.encode(prompt), 20)
    assert r.choices[0].text == local.tokenizer.decode(ids)
    assert r.usage is not None and r.usage.completion_tokens == len(ids)
    assert r.usage.prompt_tokens == len(local.tokenizer.encode(prompt))
    assert r.model == tiny_server.model and r.object == "text_completion"


def test_echo_logprobs_with_max_tokens_zero_equal_a_full_forward(
    client: openai.OpenAI,
    tiny_server: Server,
    local: LoadedModel,
) -> None:
    ids = [5, 17, 99, 3, 250, 42, 7]
    r = client.completions.create(
        model=tiny_server.model, prompt=ids, max_tokens=0, echo=True, logprobs=2
    )
    lp = r.choices[0].logprobs
    assert lp is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids)
    with torch.inference_mode():
        ref = local.model(torch.tensor([ids]))[0].float().log_softmax(-1)
    want = [ref[i - 1, ids[i]].item() for i in range(1, len(ids))]
    assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    for i, top in enumerate(lp.top_logprobs[1:], start=1):
        # keyed by token text: two tokens with the same text share one entry, as in OpenAI's
        assert top is not None and 1 <= len(top) <= 2
        assert max(top.values()) == pytest.approx(ref[i - 1].max().item(), abs=1e-4)
    assert r.choices[0].text == local.tokenizer.decode(ids, skip_special_tokens=False)
    assert r.usage is not None and r.usage.completion_tokens == 0


def test_chat_stream_equals_chat_and_ends_with_usage(
    client: openai.OpenAI,
    tiny_server: Server,
) -> None:
    messages = [{"role": "user", "content": "Hello there"}]
    plain = client.chat.completions.create(
        model=tiny_server.model,
        messages=messages,
        max_tokens=15,
        temperature=0,  # type: ignore[arg-type]
    )
    chunks = list(
        client.chat.completions.create(
            model=tiny_server.model,
            messages=messages,  # type: ignore[arg-type]
            max_tokens=15,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == plain.choices[0].finish_reason and not any(finishes[:-1])
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == plain.usage.completion_tokens  # type: ignore[union-attr]
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_stream_n_and_seed(client: openai.OpenAI, tiny_server: Server) -> None:
    kwargs = dict(
        model=tiny_server.model, prompt="The king", max_tokens=12, temperature=1.0, n=3, seed=7
    )
    a = client.completions.create(**kwargs)  # type: ignore[call-overload]
    b = client.completions.create(**kwargs)  # type: ignore[call-overload]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # same seed, same text
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    assert len({c.text for c in a.choices}) > 1  # each choice draws from its own seed
    streamed: dict[int, str] = {}
    usage = None
    for chunk in client.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}
    ):  # type: ignore[call-overload]
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
        usage = chunk.usage or usage
    assert [streamed[i] for i in range(3)] == [c.text for c in a.choices]
    assert usage is not None and usage.completion_tokens == a.usage.completion_tokens  # type: ignore[union-attr]


def test_stop_string_cuts_the_text(
    client: openai.OpenAI,
    tiny_server: Server,
) -> None:
    free = client.completions.create(
        model=tiny_server.model, prompt="Once", max_tokens=30, temperature=0
    ).choices[0]
    stop = free.text[8:11]
    assume = stop.strip() and free.text.index(stop) >= 1
    if not assume:
        pytest.skip("the random model's text has no usable stop string")
    cut = client.completions.create(
        model=tiny_server.model, prompt="Once", max_tokens=30, temperature=0, stop=[stop]
    ).choices[0]
    assert cut.text == free.text[: free.text.index(stop)]
    assert cut.finish_reason == "stop"


def test_async_clients_in_parallel_get_single_sequence_results(
    tiny_server: Server,
    local: LoadedModel,
) -> None:
    prompts = [f"prompt number {i} " * (1 + i % 4) for i in range(8)]

    async def run() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=f"{tiny_server.url}/v1", api_key=tiny_server.key)
        calls = [
            aclient.completions.create(
                model=tiny_server.model, prompt=p, max_tokens=10 + i, temperature=0
            )
            for i, p in enumerate(prompts)
        ]
        results = await asyncio.gather(*calls)
        await aclient.close()
        return [r.choices[0].text for r in results]

    texts = asyncio.run(run())
    for i, (prompt, text) in enumerate(zip(prompts, texts, strict=True)):
        ids = _reference(local, local.tokenizer.encode(prompt), 10 + i)
        assert text == local.tokenizer.decode(ids)


def test_embeddings(client: openai.OpenAI, tiny_server: Server) -> None:
    r = client.embeddings.create(model=tiny_server.model, input=["hello world", "good night"])
    vectors = [d.embedding for d in r.data]
    assert len(vectors) == 2 and len(vectors[0]) == 32  # d_model of the tiny model
    for v in vectors:
        assert sum(x * x for x in v) == pytest.approx(1.0, abs=1e-4)
    assert vectors[0] != vectors[1]
    again = client.embeddings.create(model=tiny_server.model, input="hello world")
    assert again.data[0].embedding == pytest.approx(vectors[0], abs=1e-5)
    raw = httpx.post(
        f"{tiny_server.url}/v1/embeddings",
        headers=tiny_server.headers,
        json={"model": tiny_server.model, "input": "hello world", "encoding_format": "base64"},
    ).json()
    decoded = struct.unpack("<32f", base64.b64decode(raw["data"][0]["embedding"]))
    assert list(decoded) == pytest.approx(vectors[0], abs=1e-5)
    assert r.usage.prompt_tokens > 0


def test_models_and_tokenizer_routes(
    client: openai.OpenAI,
    tiny_server: Server,
    local: LoadedModel,
) -> None:
    assert [m.id for m in client.models.list().data] == [tiny_server.model]
    text = "Hello, world"
    tokens = httpx.post(
        f"{tiny_server.url}/tokenize",
        json={"prompt": text, "add_special_tokens": False},
        headers=tiny_server.headers,
    ).json()["tokens"]
    assert tokens == local.tokenizer.encode(text, add_special_tokens=False)
    back = httpx.post(
        f"{tiny_server.url}/detokenize", json={"tokens": tokens}, headers=tiny_server.headers
    ).json()
    assert back["prompt"] == text
    info = httpx.get(f"{tiny_server.url}/tokenizer_info", headers=tiny_server.headers).json()
    assert info["eos_token"] == local.tokenizer.eos_token


def test_a_disconnected_stream_stops_generating(tiny_server: Server) -> None:
    body = {
        "model": tiny_server.model,
        "prompt": "a long story",
        "max_tokens": 100,
        "ignore_eos": True,
        "stream": True,
    }
    before = tiny_server.metric("engine_generation_tokens_total")
    with httpx.stream(
        "POST", f"{tiny_server.url}/v1/completions", json=body, headers=tiny_server.headers
    ) as r:
        lines = r.iter_lines()
        got = 0
        for line in lines:
            got += line.startswith("data: {")
            if got == 3:
                break  # leave with the stream open: closing the connection disconnects
    deadline = time.monotonic() + 5
    while tiny_server.metric("num_requests_running") > 0:
        assert time.monotonic() < deadline, "the request kept running after the disconnect"
        time.sleep(0.05)
    stopped_at = tiny_server.metric("engine_generation_tokens_total")
    time.sleep(0.5)
    assert tiny_server.metric("engine_generation_tokens_total") == stopped_at
    assert stopped_at - before < 100  # it did not run to max_tokens


def test_sigterm_drains_streams_then_exits_zero(
    tmp_path: Path,
    tiny_tokenizer,  # type: ignore[no-untyped-def]
) -> None:
    server = start_server(make_model_dir(tmp_path, tiny_tokenizer), tmp_path / "home")
    try:
        body = {
            "model": server.model,
            "prompt": "drain me",
            "max_tokens": 60,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        events: list[str] = []

        def read() -> None:
            with httpx.stream(
                "POST",
                f"{server.url}/v1/completions",
                json=body,
                timeout=60,
                headers=server.headers,
            ) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])

        reader = threading.Thread(target=read)
        reader.start()
        while not events:
            time.sleep(0.01)
        server.process.send_signal(signal.SIGTERM)
        reader.join(60)
        assert server.process.wait(60) == 0
        assert events[-1] == "[DONE]"
        usage = json.loads(events[-2])["usage"]
        assert usage["completion_tokens"] == 60  # the stream ran to its end
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{server.url}/health", timeout=2)
    finally:
        stop_server(server)


def test_echo_without_logprobs_returns_the_prompt_text(
    client: openai.OpenAI, tiny_server: Server, local: LoadedModel
) -> None:
    prompt = "Hello world"
    plain = client.completions.create(
        model=tiny_server.model, prompt=prompt, max_tokens=3, temperature=0, echo=True
    )
    assert plain.choices[0].text.startswith(prompt) and plain.choices[0].logprobs is None
    only = client.completions.create(
        model=tiny_server.model, prompt=prompt, max_tokens=0, echo=True
    )
    assert only.choices[0].text == local.tokenizer.decode(local.tokenizer.encode(prompt))
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=tiny_server.model,
            prompt=prompt,
            max_tokens=3,
            temperature=0,
            echo=True,
            stream=True,
        )
    )
    assert streamed == plain.choices[0].text


def test_two_models_in_one_server_are_chosen_by_name(tmp_path: Path, tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    llama = make_model_dir(tmp_path, tiny_tokenizer)
    torch.manual_seed(1)
    gpt2 = save_model(
        Transformer(tiny_config("gpt2")).eval(), tiny_tokenizer, tmp_path / "tiny-gpt2"
    )
    server = start_server(llama, tmp_path / "home", str(gpt2))
    try:
        c = openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.key, max_retries=0)
        assert sorted(m.id for m in c.models.list().data) == ["tiny-gpt2", "tiny-llama"]
        texts = {}
        for name, directory in (("tiny-llama", llama), ("tiny-gpt2", gpt2)):
            r = c.completions.create(model=name, prompt=[5, 6, 7], max_tokens=8, temperature=0)
            assert r.model == name
            ref = load_model(directory)
            ids = _reference(ref, [5, 6, 7], 8)
            texts[name] = r.choices[0].text
            assert texts[name] == ref.tokenizer.decode(ids)
        assert texts["tiny-llama"] != texts["tiny-gpt2"]
    finally:
        stop_server(server)


def test_ready_is_503_until_the_models_are_loaded(tmp_path: Path) -> None:
    # The app without its lifespan: nothing has been loaded.
    app = create_app(ServerSettings(models=[str(tmp_path)], auth=False))

    async def probe() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            body = {"model": "m", "prompt": "hi"}
            return (
                await http.get("/health"),
                await http.get("/ready"),
                await http.post("/v1/completions", json=body),
            )

    health, ready, completion = asyncio.run(probe())
    assert health.status_code == 200
    assert ready.status_code == 503 and ready.headers["retry-after"] == "1"
    assert "loading" in ready.json()["error"]["message"]
    assert completion.status_code == 503 and completion.json()["error"]["type"]


def test_oversized_headers_are_refused(tiny_server: Server) -> None:
    r = httpx.get(f"{tiny_server.url}/v1/models", headers={"x-big": "a" * 100_000})
    assert r.status_code == 431 and r.json()["error"]["message"]
    assert httpx.get(f"{tiny_server.url}/health").status_code == 200


def test_ignore_eos_still_honours_stop_token_ids(
    client: openai.OpenAI, tiny_server: Server, local: LoadedModel
) -> None:
    # Regression: ignore_eos used to switch off every stop id, the caller's too.
    greedy = SamplingParams(max_tokens=12, ignore_eos=True)
    stop_at = [s.token_id for s in generate_ids(local.model, [9, 8, 7], greedy)][4]
    r = client.completions.create(
        model=tiny_server.model,
        prompt=[9, 8, 7],
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True, "stop_token_ids": [stop_at]},
    )
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None and r.usage.completion_tokens <= 5
