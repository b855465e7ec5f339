"""`FakeEngine`: an `EngineClient` without a model, so route tests run in milliseconds.

It keeps the protocol's contract as `AsyncEngine` does (`infer/engine.py`): token ids in and
out; a bad prompt (`check_prompt`, the engine's own guard) or a full queue raises before the
first output; the last output has a finish reason; closing the iterator early aborts the
request, and so does `abort`; a request the engine fails alone raises `RequestFailedError`.

Deterministic instead of a model: output token k of a request is `FakeEngine.token(prompt, k,
seed)`, so a test knows the text before it asks (`expected`). It honours `max_tokens`, the
context (`max_model_len`: "length"), `stop_token_ids` (the stop token is the last output,
"stop"), `logprobs`/`top_logprobs` (one `TokenLogprob` per token with `top_logprobs`
alternatives, most likely first) and `echo` (prompt logprobs in the first output, the first
None). `n` is the server's business: it sends n requests, each with its own seed. Prefix
caching as the real engine reports it: a prompt's `num_cached_tokens` is the longest prefix it
shares with an earlier prompt, in whole blocks of `BLOCK`, short of its last token.

Tell it to misbehave: `fail_next(after_tokens=…)` fails the next request with
`RequestFailedError` once it has sent that many tokens (the others go on); `queue_full = True`
refuses every new request with `QueueFullError`.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from lmforge.errors import LmforgeError
from lmforge.infer.engine import EngineInfo, EngineMetrics, RequestFailedError
from lmforge.infer.generate import check_prompt
from lmforge.infer.params import SamplingParams
from lmforge.infer.request import RequestOutput, TokenLogprob
from lmforge.infer.scheduler import QueueFullError

FIRST_ID = 3
"""Generated ids start here: 0-2 are the tiny tokenizer's special tokens."""
EMBED_DIM = 8
BLOCK = 16


@dataclass
class Started:
    """A request the fake engine accepted, as it came."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    finish_reason: str | None = None  # None while running (or cut off without one)
    output_ids: list[int] = field(default_factory=list)
    cached: int = 0  # prompt tokens "found in the prefix cache"


class FakeEngine:
    """An `EngineClient` (see the module doc)."""

    def __init__(
        self,
        *,
        vocab_size: int = 384,
        max_model_len: int = 64,
        max_queue: int = 8,
        max_batch: int = 4,
    ) -> None:
        self._info = EngineInfo(
            vocab_size=vocab_size,
            max_model_len=max_model_len,
            max_queue=max_queue,
            max_batch=max_batch,
        )
        self.started: list[Started] = []  # every accepted request, in order
        self._seen: list[list[int]] = []  # prompts whose blocks the "cache" holds
        self.aborted: list[str] = []  # request ids aborted (by `abort` or an early close)
        self.queue_full = False
        self.shut_down = False
        self._live: dict[str, Started] = {}
        self._abort_flags: set[str] = set()
        self._failures: list[tuple[int, str]] = []  # armed by fail_next: (after_tokens, why)
        self._counts = {"steps": 0, "prompt_tokens": 0, "generated_tokens": 0, "failed": 0}

    # -- what a test tells it or asks it -------------------------------------------------------

    def fail_next(self, *, after_tokens: int = 0, message: str = "non-finite logits") -> None:
        """Fail the next request with RequestFailedError(MESSAGE) after AFTER_TOKENS tokens."""
        self._failures.append((after_tokens, message))

    def token(self, prompt_ids: Sequence[int], k: int, seed: int | None = None) -> int:
        """Output token K of a request for PROMPT_IDS (with SEED)."""
        span = self._info.vocab_size - FIRST_ID
        return FIRST_ID + (31 * sum(prompt_ids) + 17 * k + 7 * (seed or 0)) % span

    def expected(
        self, prompt_ids: Sequence[int], max_tokens: int, seed: int | None = None
    ) -> list[int]:
        """The ids a request generates without a stop token (the context permitting)."""
        room = self._info.max_model_len - len(prompt_ids)
        return [self.token(prompt_ids, k, seed) for k in range(min(max_tokens, room))]

    # -- EngineClient --------------------------------------------------------------------------

    @property
    def info(self) -> EngineInfo:
        return self._info

    @property
    def num_requests(self) -> int:
        return len(self._live)

    def metrics(self) -> EngineMetrics:
        c = self._counts
        return EngineMetrics(
            num_running=len(self._live),
            kv_cache_usage_tokens=sum(
                len(r.prompt_ids) + len(r.output_ids) for r in self._live.values()
            ),
            kv_cache_blocks_used=len(self._live),
            kv_cache_blocks_total=self._info.max_batch,
            steps=c["steps"],
            prompt_tokens=c["prompt_tokens"],
            generated_tokens=c["generated_tokens"],
            failed_requests=c["failed"],
        )

    def shutdown(self, timeout: float = 10.0) -> None:
        self.shut_down = True

    async def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        if self.shut_down:
            raise LmforgeError("the engine is shutting down")
        if request_id in self._live:
            raise LmforgeError(f"request id {request_id!r} is already in use")
        check_prompt(prompt_ids, self._info.max_model_len, self._info.vocab_size)  # its guard
        if self.queue_full or len(self._live) >= self._info.max_queue:
            raise QueueFullError(f"the queue is full ({len(self._live)} requests waiting)")
        failure = self._failures.pop(0) if self._failures else None
        request = Started(request_id, list(prompt_ids), params)
        request.cached = 0 if params.echo else self._cached(request.prompt_ids)
        self._seen.append(request.prompt_ids)
        self.started.append(request)
        self._live[request_id] = request
        self._counts["prompt_tokens"] += len(prompt_ids)
        try:
            async for out in self._outputs(request, failure):
                yield out
        finally:
            if request.finish_reason is None:  # closed early: the request is aborted
                self.aborted.append(request_id)
            del self._live[request_id]

    async def abort(self, request_id: str) -> None:
        if request_id in self._live:
            self._abort_flags.add(request_id)

    async def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        vectors = []
        for ids in inputs:
            check_prompt(ids, None, self._info.vocab_size)
            raw = [float((sum(ids) * (d + 1)) % 13 + 1) for d in range(EMBED_DIM)]
            norm = math.sqrt(sum(v * v for v in raw))
            vectors.append([v / norm for v in raw])
        return vectors

    # -- one request ---------------------------------------------------------------------------

    async def _outputs(
        self, request: Started, failure: tuple[int, str] | None
    ) -> AsyncIterator[RequestOutput]:
        params, prompt = request.params, request.prompt_ids
        prompt_logprobs: list[TokenLogprob | None] | None = None
        if params.echo:
            prompt_logprobs = [None] + [self._logprob(t, params) for t in prompt[1:]]
        k = 0
        while True:
            await asyncio.sleep(0)  # one "step": the other requests and the event loop go on
            self._counts["steps"] += 1
            if request.request_id in self._abort_flags:
                self._abort_flags.discard(request.request_id)
                self.aborted.append(request.request_id)
                request.finish_reason = "abort"
                yield self._output(request, [], params, prompt_logprobs, "abort")
                return
            if failure is not None and k >= failure[0]:
                self._counts["failed"] += 1
                request.finish_reason = "error"
                raise RequestFailedError(failure[1])
            reason = self._finish(request)
            if reason is not None and params.max_tokens == 0:  # prompt only (echo / scoring)
                request.finish_reason = reason
                yield self._output(request, [], params, prompt_logprobs, reason)
                return
            tid = self.token(prompt, k, params.seed)
            request.output_ids.append(tid)
            self._counts["generated_tokens"] += 1
            k += 1
            reason = "stop" if tid in params.stop_token_ids else self._finish(request)
            request.finish_reason = reason
            yield self._output(request, [tid], params, prompt_logprobs, reason)
            prompt_logprobs = None  # sent once, in the first output
            if reason is not None:
                return

    def _cached(self, prompt: list[int]) -> int:
        best = 0
        for seen in self._seen:
            n = 0
            while n < min(len(seen), len(prompt) - 1) and seen[n] == prompt[n]:
                n += 1
            best = max(best, n // BLOCK * BLOCK)
        return best

    def _finish(self, request: Started) -> str | None:
        done = len(request.output_ids)
        if done >= request.params.max_tokens:
            return "length"
        if len(request.prompt_ids) + done >= self._info.max_model_len:
            return "length"
        return None

    def _logprob(self, tid: int, params: SamplingParams) -> TokenLogprob:
        value = -0.25 - (tid % 7) / 8
        alternatives = [(tid, value)] + [
            (FIRST_ID + (tid + j) % (self._info.vocab_size - FIRST_ID), value - j)
            for j in range(1, params.top_logprobs)
        ]
        return TokenLogprob(tid, value, alternatives[: params.top_logprobs])

    def _output(
        self,
        request: Started,
        new_ids: list[int],
        params: SamplingParams,
        prompt_logprobs: list[TokenLogprob | None] | None,
        reason: str | None,
    ) -> RequestOutput:
        return RequestOutput(
            request_id=request.request_id,
            new_token_ids=new_ids,
            new_logprobs=[self._logprob(t, params) for t in new_ids] if params.logprobs else [],
            finish_reason=reason,
            num_prompt_tokens=len(request.prompt_ids),
            num_output_tokens=len(request.output_ids),
            prompt_logprobs=prompt_logprobs,
            num_cached_tokens=request.cached,
        )
