"""Running a request's choices on an engine: each choice (`n` per prompt) is one engine
request, all started at once so they batch; text and logprobs are gathered per choice, and
streamed as Server-Sent Events when asked.

Stop strings are found in the decoded text (`TextStream`), which then closes the choice's
output stream: closing it aborts the engine request. A client that disconnects cancels the
streaming response (or is noticed between outputs when not streaming), which aborts its
requests within one engine step.
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

from fastapi import Request
from fastapi.responses import StreamingResponse

from lmforge.infer.params import SamplingParams
from lmforge.infer.request import RequestOutput, TokenLogprob
from lmforge.infer.scheduler import QueueFullError
from lmforge.serve.app import ServedModel
from lmforge.serve.content_policy import OutputFilter
from lmforge.serve.errors import OpenAIError, error_body
from lmforge.serve.metering import Meter
from lmforge.tokenizer.stream import TextStream

log = logging.getLogger(__name__)


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
    finished: bool = False  # False: cut short (the client went away, or an error)
    first_token_at: float | None = None  # time.perf_counter()
    last_token_at: float | None = None


async def run_choice(
    served: ServedModel,
    choice: Choice,
    params: SamplingParams,
    request_id: str,
    emit: asyncio.Queue[Piece | BaseException] | None,
    http: Request,
) -> None:
    """Generate CHOICE to the end, filling it in; with EMIT, also send each new piece."""
    stream = TextStream(served.tokenizer, params.stop)
    outputs = served.engine.generate(choice.prompt_ids, params, request_id)
    try:
        async for out in outputs:
            if emit is None and await http.is_disconnected():
                return  # closing `outputs` (below) aborts the engine request
            piece = take(choice, stream, out)
            if piece.token_ids:
                choice.last_token_at = time.perf_counter()
                if choice.first_token_at is None:
                    choice.first_token_at = choice.last_token_at
            if emit is not None and (piece.text or piece.finish_reason or piece.prompt_logprobs):
                await emit.put(piece)
            if piece.finish_reason:
                return
    finally:
        await outputs.aclose()  # type: ignore[attr-defined]


def take(choice: Choice, stream: TextStream, out: RequestOutput) -> Piece:
    """Add an engine output to CHOICE through its text STREAM; return what is new."""
    piece = Piece(choice.index, "", [], [])
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
        choice.finished = True
    return piece


def seeded(params: SamplingParams, i: int) -> SamplingParams:
    """Choice I's params: with a seed, each choice draws from its own seed + I."""
    if params.seed is None or i == 0:
        return params
    return dataclasses.replace(params, seed=(params.seed + i) % 2**63)


# ---------------------------------------------------------------------------------------------
# Running choices, plain or streamed


async def run_all(
    served: ServedModel,
    prompts: list[list[int]],
    params: SamplingParams,
    http: Request,
    emit: asyncio.Queue[Piece | BaseException] | None = None,
    meter: Meter | None = None,
) -> list[Choice]:
    """Run every choice (`n` per prompt) at once; with a METER, settle the request's bill
    when they end, however they end (before the result or the error reaches the caller)."""
    base = uuid.uuid4().hex
    choices: list[Choice] = []
    jobs = []
    for ids in prompts:
        for i in range(params.n):
            choice = Choice(len(choices), ids)
            choices.append(choice)
            request_id = f"{base}-{choice.index}"
            jobs.append(run_choice(served, choice, seeded(params, i), request_id, emit, http))
    tasks = [asyncio.ensure_future(job) for job in jobs]
    status, http_status = "error", 500
    try:
        await asyncio.gather(*tasks)
        status, http_status = "ok", 200
    except QueueFullError as e:
        http_status = 503
        raise OpenAIError(503, str(e), headers={"Retry-After": "1"}) from e
    except asyncio.CancelledError:
        status, http_status = "cancelled", 499  # the client went away mid-stream
        raise
    finally:
        for task in tasks:
            task.cancel()
        if meter is not None:
            if status == "ok" and not all(c.finished for c in choices):
                status, http_status = "cancelled", 499
            await settle(meter, prompts, choices, status, http_status)
    return choices


async def settle(
    meter: Meter, prompts: list[list[int]], choices: list[Choice], status: str, http_status: int
) -> None:
    """Bill what CHOICES generated, with their time to first token and per output token."""
    counts = usage(prompts, choices)
    firsts = [c.first_token_at for c in choices if c.first_token_at is not None]
    ttft = min(firsts) - meter.started if firsts else None
    tpot = None
    longest = max(choices, key=lambda c: len(c.token_ids), default=None)
    if longest is not None and len(longest.token_ids) > 1:
        assert longest.first_token_at is not None and longest.last_token_at is not None
        tpot = (longest.last_token_at - longest.first_token_at) / (len(longest.token_ids) - 1)
    await meter.asettle(
        status=status,
        http_status=http_status,
        prompt_tokens=counts["prompt_tokens"],
        completion_tokens=counts["completion_tokens"],
        ttft_s=ttft,
        tpot_s=tpot,
    )


def sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def stream_response(
    served: ServedModel,
    prompts: list[list[int]],
    params: SamplingParams,
    http: Request,
    chunk: Callable[[Piece], dict[str, Any]],
    first_chunks: list[dict[str, Any]],
    usage_head: dict[str, Any] | None,
    meter: Meter | None = None,
    output_filter: OutputFilter | None = None,
) -> StreamingResponse:
    """An SSE response: FIRST_CHUNKS, then CHUNK(piece) for each piece of output, then —
    with a USAGE_HEAD (`stream_options.include_usage`) — one chunk of it with empty
    `choices` and the usage, then `[DONE]`."""
    queue: asyncio.Queue[Piece | BaseException] = asyncio.Queue()
    runner = asyncio.ensure_future(run_all(served, prompts, params, http, queue, meter))
    # Wait for the first piece (or an error) so that errors such as a full queue get a
    # proper status code instead of a broken stream.
    first = await next_piece(queue, runner)

    async def body() -> AsyncIterator[str]:
        try:
            for c in first_chunks:
                yield sse(c)
            piece, filtered = first, False
            while piece is not None:
                if output_filter is not None and await output_filter.blocks(
                    piece.index, piece.text
                ):
                    # Withheld: the stream ends here; `finally` cancels the rest, and what was
                    # generated is billed.
                    yield sse(chunk(Piece(piece.index, "", [], [], "content_filter")))
                    filtered = True
                    break
                yield sse(chunk(piece))
                piece = await next_piece(queue, runner)
            if usage_head is not None and not filtered:
                yield sse({**usage_head, "choices": [], "usage": usage(prompts, runner.result())})
        except Exception as e:  # headers are sent: report in the stream, as OpenAI does
            log.exception("stream failed")
            message = e.message if isinstance(e, OpenAIError) else "internal server error"
            yield sse(error_body(message, "server_error"))
        finally:
            runner.cancel()
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")


async def next_piece(
    queue: asyncio.Queue[Piece | BaseException], runner: asyncio.Future[list[Choice]]
) -> Piece | None:
    """The next piece, or None when every choice is done; re-raises a choice's error."""
    while True:
        if not queue.empty():
            item = queue.get_nowait()
            if isinstance(item, BaseException):
                raise item
            return item
        if runner.done():
            runner.result()  # raises the error, if any
            return None
        getter: asyncio.Future[Any] = asyncio.ensure_future(queue.get())
        waiting: set[asyncio.Future[Any]] = {getter, runner}
        done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if getter in done:
            item = getter.result()
            if isinstance(item, BaseException):
                raise item
            return item
        getter.cancel()


def usage(prompts: list[list[int]], choices: list[Choice]) -> dict[str, int]:
    prompt = sum(len(p) for p in prompts)
    completion = sum(len(c.token_ids) for c in choices)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
