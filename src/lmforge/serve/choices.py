"""Running a generation request after admission: its content policy, its choices, its bill.

`generate` is the one path of every generation: under `metering.settling` (so the bill is
settled once, however it ends) it applies the input policy, runs the choices and applies the
output policy. Each choice (`n` per prompt) is one engine request, all started at once so they
batch; text and logprobs are gathered per choice, and streamed as Server-Sent Events by
`stream_response` when asked. The engine is an `EngineClient`: token ids in and out.

Stop strings are found in the decoded text (`TextStream`), which then closes the choice's
output stream: closing it aborts the engine request. A client that disconnects cancels the
streaming response (or is noticed between outputs when not streaming), which aborts its
requests within one engine step. Engine errors become OpenAI's: a full queue 503, a request the
engine failed 500 (`request_failed`), in the stream as an error event once it has started.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import StreamingResponse

from lmforge.infer.engine import RequestFailedError
from lmforge.infer.params import SamplingParams
from lmforge.infer.request import RequestOutput, TokenLogprob
from lmforge.infer.scheduler import QueueFullError
from lmforge.serve.content_policy import OutputFilter, PolicyContext, check_input
from lmforge.serve.context import Caller
from lmforge.serve.errors import ClientDisconnected, OpenAIError, error_body
from lmforge.serve.metering import Meter, Used, settling
from lmforge.serve.moderation import ModerationService
from lmforge.serve.state import ServedModel
from lmforge.tokenizer.stream import TextStream

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Generation:
    """One admitted generation request, as the route hands it down."""

    served: ServedModel
    prompts: list[list[int]]
    params: SamplingParams
    caller: Caller
    meter: Meter
    moderation: ModerationService
    prompt_param: str
    """The parameter the prompts came from ("prompt", "messages"): the input policy's 400
    names it."""

    @property
    def policy(self) -> PolicyContext:
        registry = self.meter.state.registry
        return PolicyContext(self.moderation, registry, self.caller, self.served)


# ---------------------------------------------------------------------------------------------
# One choice: an engine request, its text and logprobs


@dataclass
class Piece:
    """New output of one choice: text, the tokens behind it, and their logprobs."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    finish_reason: str | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class Choice:
    """One choice as it grows: its text, tokens and logprobs so far."""

    index: int
    prompt_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: str = "length"
    num_cached_tokens: int = 0  # prompt tokens the engine found in its prefix cache
    first_token_at: float | None = None  # time.perf_counter()
    last_token_at: float | None = None


class _Withheld(Exception):
    """A streamed choice was stopped by the output policy: the generation ends there."""


async def run_choice(
    gen: Generation,
    choice: Choice,
    params: SamplingParams,
    request_id: str,
    emit: asyncio.Queue[Piece] | None,
    output_filter: OutputFilter | None,
) -> None:
    """Generate CHOICE to the end, filling it in; with EMIT, also send each new piece (checked
    by OUTPUT_FILTER first: a blocked piece ends the generation with "content_filter")."""
    stream = TextStream(gen.served.tokenizer, params.stop)
    outputs = gen.served.engine.generate(choice.prompt_ids, params, request_id)
    try:
        async for out in outputs:
            if emit is None and await gen.caller.is_disconnected():
                raise ClientDisconnected()  # closing `outputs` (below) aborts the request
            piece = take(choice, stream, out)
            if piece.token_ids:
                choice.last_token_at = time.perf_counter()
                if choice.first_token_at is None:
                    choice.first_token_at = choice.last_token_at
            if emit is not None and (piece.text or piece.finish_reason or piece.prompt_logprobs):
                if output_filter is not None and await output_filter.blocks(
                    piece.index, piece.text
                ):
                    await emit.put(Piece(piece.index, "", [], [], "content_filter"))
                    raise _Withheld
                await emit.put(piece)
            if piece.finish_reason:
                return
    finally:
        await outputs.aclose()  # type: ignore[attr-defined]


def take(choice: Choice, stream: TextStream, out: RequestOutput) -> Piece:
    """Add an engine output to CHOICE through its text STREAM; return what is new."""
    piece = Piece(choice.index, "", [], [])
    choice.num_cached_tokens = out.num_cached_tokens
    if out.prompt_logprobs is not None:
        choice.prompt_logprobs = piece.prompt_logprobs = out.prompt_logprobs
    for i, tid in enumerate(out.new_token_ids):
        if stream.stopped:
            break
        piece.token_ids.append(tid)
        if out.new_logprobs:
            piece.logprobs.append(out.new_logprobs[i])
        is_stop_token = out.finish_reason == "stop" and i == len(out.new_token_ids) - 1
        if not is_stop_token:  # a stop token counts as generated but is not shown
            piece.text += stream.push(tid)
    if stream.stopped:
        piece.finish_reason = "stop"
    elif out.finished:
        piece.text += stream.finish()
        piece.finish_reason = "stop" if out.finish_reason == "stop" else "length"
    choice.text += piece.text
    choice.token_ids += piece.token_ids
    choice.logprobs += piece.logprobs
    if piece.finish_reason:
        choice.finish_reason = piece.finish_reason
    return piece


def seeded(params: SamplingParams, i: int) -> SamplingParams:
    """Choice I's params: with a seed, each choice draws from its own seed + I."""
    if params.seed is None or i == 0:
        return params
    return dataclasses.replace(params, seed=(params.seed + i) % 2**63)


# ---------------------------------------------------------------------------------------------
# Running choices, plain or streamed


async def generate(gen: Generation, emit: asyncio.Queue[Piece] | None = None) -> list[Choice]:
    """Everything GEN does after admission, settled once however it ends: the input policy,
    every choice (`run_all`), the output policy. With EMIT, the pieces go there as they come,
    each checked by the output policy."""
    async with settling(gen.meter):
        policy = gen.policy
        await check_input(policy, gen.prompts, gen.prompt_param)
        output_filter = await OutputFilter.of(policy)
        if emit is not None:
            return await run_all(gen, emit, output_filter)
        choices = await run_all(gen)
        await output_filter.apply(choices)
        return choices


async def run_all(
    gen: Generation,
    emit: asyncio.Queue[Piece] | None = None,
    output_filter: OutputFilter | None = None,
) -> list[Choice]:
    """Run every choice (`n` per prompt) at once; what they used goes to the meter, however
    they end. Engine errors become OpenAI's (503 for a full queue, 500 for a failed request)."""
    params = gen.params
    base = uuid.uuid4().hex
    choices: list[Choice] = []
    jobs = []
    for ids in gen.prompts:
        for i in range(params.n):
            choice = Choice(len(choices), ids)
            choices.append(choice)
            request_id = f"{base}-{choice.index}"
            jobs.append(run_choice(gen, choice, seeded(params, i), request_id, emit, output_filter))
    tasks = [asyncio.ensure_future(job) for job in jobs]
    try:
        await asyncio.gather(*tasks)
    except _Withheld:
        pass  # the stream ends at the withheld piece: what was generated is billed
    except QueueFullError as e:
        raise OpenAIError(503, str(e), headers={"Retry-After": "1"}) from e
    except RequestFailedError as e:
        raise OpenAIError(500, str(e), type_="server_error", code="request_failed") from e
    finally:
        for task in tasks:
            task.cancel()
        gen.meter.used = used(gen.meter, gen.prompts, choices)
    return choices


def used(meter: Meter, prompts: list[list[int]], choices: list[Choice]) -> Used:
    """What CHOICES used: their tokens, time to first token and per output token."""
    counts = usage(prompts, choices)
    firsts = [c.first_token_at for c in choices if c.first_token_at is not None]
    tpot = None
    longest = max(choices, key=lambda c: len(c.token_ids), default=None)
    if longest is not None and len(longest.token_ids) > 1:
        assert longest.first_token_at is not None and longest.last_token_at is not None
        tpot = (longest.last_token_at - longest.first_token_at) / (len(longest.token_ids) - 1)
    return Used(
        prompt_tokens=counts["prompt_tokens"],
        completion_tokens=counts["completion_tokens"],
        ttft_s=min(firsts) - meter.started if firsts else None,
        tpot_s=tpot,
    )


def sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def stream_response(
    gen: Generation,
    *,
    chunk: Callable[[Piece], dict[str, Any]],
    first_chunks: list[dict[str, Any]],
    usage_head: dict[str, Any] | None,
) -> StreamingResponse:
    """An SSE response: FIRST_CHUNKS, then CHUNK(piece) for each piece of output, then —
    with a USAGE_HEAD (`stream_options.include_usage`) — one chunk of it with empty
    `choices` and the usage, then `[DONE]`. An error once the stream has started is an error
    event (OpenAI's shape) before `[DONE]`."""
    queue: asyncio.Queue[Piece] = asyncio.Queue()
    runner = asyncio.ensure_future(generate(gen, queue))
    # Wait for the first piece (or an error) so that errors such as a full queue or a refused
    # prompt get a proper status code instead of a broken stream.
    try:
        first = await next_piece(queue, runner)
    except BaseException:
        runner.cancel()  # this request was cancelled (a no-op if the runner failed)
        raise

    async def body() -> AsyncIterator[str]:
        try:
            for c in first_chunks:
                yield sse(c)
            piece = first
            while piece is not None:
                yield sse(chunk(piece))
                if piece.finish_reason == "content_filter":
                    break  # withheld: the stream ends here (the runner ends by itself)
                piece = await next_piece(queue, runner)
            choices = await runner  # settled before the stream ends
            if usage_head is not None:
                yield sse({**usage_head, "choices": [], "usage": usage(gen.prompts, choices)})
        except Exception as e:  # headers are sent: report in the stream, as OpenAI does
            if isinstance(e, OpenAIError):
                log.warning("stream failed: %s", e.message)
                yield sse(error_body(e.message, e.type, e.param, e.code))
            else:
                log.exception("stream failed")
                yield sse(error_body("internal server error", "server_error"))
        finally:
            runner.cancel()  # the client went away: the choices stop, what was made is billed
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")


async def next_piece(
    queue: asyncio.Queue[Piece], runner: asyncio.Future[list[Choice]]
) -> Piece | None:
    """The next piece, or None when every choice is done; re-raises the runner's error."""
    while True:
        if not queue.empty():
            return queue.get_nowait()
        if runner.done():
            runner.result()  # raises the error, if any
            return None
        getter: asyncio.Future[Piece] = asyncio.ensure_future(queue.get())
        waiting: set[asyncio.Future[Any]] = {getter, runner}
        done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if getter in done:
            return getter.result()
        getter.cancel()


def usage(prompts: list[list[int]], choices: list[Choice]) -> dict[str, Any]:
    """OpenAI's usage: each prompt counted once (whatever `n`), with the prompt tokens served
    from the prefix cache (`prompt_tokens_details.cached_tokens`): per prompt, those of its
    choice that found the fewest (the first choice computes what the others then share)."""
    prompt = sum(len(p) for p in prompts)
    completion = sum(len(c.token_ids) for c in choices)
    n = len(choices) // len(prompts) if prompts else 0
    cached = sum(
        min((c.num_cached_tokens for c in choices[i * n : (i + 1) * n]), default=0)
        for i in range(len(prompts))
    )
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }
