"""`Engine` (synchronous: `step()` = schedule → run → update) and `AsyncEngine`, the
`EngineClient` the server talks to.

Faults stay where they start: the runner reports a request's own failure (a logits processor
that raised, a NaN, nothing left to sample) and `update` finishes that request alone with
finish_reason "error"; a failure of the shared forward pass fails the requests of its step and
the next step runs as usual. A request whose logits came out non-finite has the blocks only it
held zeroed and dropped from the prefix cache (masked attention still multiplies what it
reads by 0, and 0 × NaN is NaN for the next owner).

`AsyncEngine` runs the engine loop in one background thread (torch releases the GIL while it
computes, so the event loop keeps serving HTTP). Requests and aborts cross into that thread
through a lock-protected inbox, taken at the start of every step: an abort takes effect
within one step. Outputs come back to each request's `asyncio.Queue` via
`loop.call_soon_threadsafe`. Other work on the model (embeddings) runs in the same thread
between steps, so the model is only ever used by one thread.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from lmforge.errors import LmforgeError
from lmforge.infer.blocks import NULL_BLOCK
from lmforge.infer.generate import check_prompt
from lmforge.infer.logits import LogitsProcessor
from lmforge.infer.params import SamplingParams
from lmforge.infer.request import Request, RequestOutput
from lmforge.infer.runner import ModelRunner, StepResult
from lmforge.infer.scheduler import Scheduler, SchedulerConfig
from lmforge.model.transformer import Transformer

log = logging.getLogger(__name__)

T = TypeVar("T")


class RequestFailedError(LmforgeError):
    """One request failed inside the engine (its logits processing, sampling, a non-finite
    value); the others in its step went on. `AsyncEngine.generate` raises it for that request
    alone (HTTP 500 with this message)."""


@dataclass(frozen=True)
class EngineInfo:
    """What a caller needs to know of an engine: its model's vocabulary and its limits."""

    vocab_size: int
    max_model_len: int
    """Tokens (prompt + output) one request may hold."""
    max_queue: int
    """Requests waiting at most; more are refused (`QueueFullError`)."""
    max_batch: int
    """Requests running at once."""


@dataclass(frozen=True)
class EngineMetrics:
    """A snapshot of an engine's gauges and counters (for /metrics), safe to read from any
    thread: the engine thread publishes a new one after every step."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage_tokens: int = 0
    """Tokens whose keys and values running requests hold."""
    kv_cache_blocks_used: int = 0
    kv_cache_blocks_total: int = 0
    steps: int = 0
    prompt_tokens: int = 0
    """Prompt tokens computed (recomputes included, cache hits not)."""
    generated_tokens: int = 0
    preemptions: int = 0
    prefix_cache_queries: int = 0
    """Prompt tokens looked up in the prefix cache."""
    prefix_cache_hits: int = 0
    """Of those, tokens found (not computed)."""
    failed_requests: int = 0
    """Requests finished by an error of their own (the others went on)."""


@dataclass
class EngineStats:
    steps: int = 0
    prompt_tokens: int = 0  # computed in prefill chunks (recomputes included, cache hits not)
    generated_tokens: int = 0
    preemptions: int = 0
    failed_requests: int = 0  # finished by an error of their own
    failed_steps: int = 0  # forward passes that failed (their requests failed with them)


DEFAULT_MAX_MODEL_LEN = 2048
"""Tokens per request when not given: the model's context, up to this."""


def default_max_model_len(model: Transformer) -> int:
    return min(model.config.max_seq_len, DEFAULT_MAX_MODEL_LEN)


class Engine:
    """Continuous batching over one model, token ids in and out.

    A request's own failure (its logits processors, sampling, a non-finite value) finishes
    that request alone with finish_reason "error"; a failure of the shared forward pass fails
    the requests of that step, and the next step runs as usual.
    """

    def __init__(self, model: Transformer, config: SchedulerConfig | None = None) -> None:
        config = config or SchedulerConfig(max_model_len=default_max_model_len(model))
        if config.max_model_len > model.config.max_seq_len:
            raise LmforgeError(
                f"max_model_len {config.max_model_len} exceeds the model's context "
                f"{model.config.max_seq_len}"
            )
        self.config = config
        self.model = model
        layers = set(model.config.layer_types or ())
        window = model.config.sliding_window if layers == {"sliding"} else 0
        self.scheduler = Scheduler(config, window)
        self.runner = ModelRunner(model, config)
        self.requests: dict[str, Request] = {}
        self.stats = EngineStats()
        self._emitted: dict[str, int] = {}  # request id → output tokens already sent
        self._started: set[str] = set()  # request ids with an output sent
        self._ids = itertools.count()

    def add_request(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        request_id: str | None = None,
        *,
        processors: Sequence[LogitsProcessor] = (),
    ) -> Request:
        """Queue a request; raises `LmforgeError` for a bad prompt or parameter and
        `QueueFullError` (a subclass) when the queue is full. PROCESSORS act on its logits
        before sampling (`infer.logits`)."""
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise LmforgeError(f"request id {request_id!r} is already in use")
        # The length against max_model_len is the scheduler's check.
        check_prompt(prompt_ids, None, self.model.config.vocab_size)
        request = Request(request_id, list(prompt_ids), params)
        self.runner.add(request, processors)  # checks logit_bias against the vocabulary
        try:
            self.scheduler.add(request)
        except LmforgeError:
            self.runner.release(request_id)
            raise
        self.requests[request_id] = request
        self._emitted[request_id] = 0
        return request

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now; its final output (finish_reason "abort"), or None if unknown."""
        request = self.scheduler.abort(request_id)
        if request is None:
            return None
        return self._output(request)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    @property
    def info(self) -> EngineInfo:
        return EngineInfo(
            vocab_size=self.model.config.vocab_size,
            max_model_len=self.config.max_model_len,
            max_queue=self.config.max_queue,
            max_batch=self.config.max_batch,
        )

    def metrics(self) -> EngineMetrics:
        """The gauges and counters now (call it from the engine's own thread)."""
        scheduler, stats, blocks = self.scheduler, self.stats, self.scheduler.blocks
        return EngineMetrics(
            num_running=len(scheduler.running),
            num_waiting=len(scheduler.waiting),
            kv_cache_usage_tokens=scheduler.cache_used,
            kv_cache_blocks_used=blocks.num_used,
            kv_cache_blocks_total=blocks.num_blocks,
            steps=stats.steps,
            prompt_tokens=stats.prompt_tokens,
            generated_tokens=stats.generated_tokens,
            preemptions=stats.preemptions,
            prefix_cache_queries=blocks.stats.queries,
            prefix_cache_hits=blocks.stats.hits,
            failed_requests=stats.failed_requests,
        )

    def step(self) -> list[RequestOutput]:
        scheduled = self.scheduler.schedule()
        self.stats.preemptions += len(scheduled.preempted)
        if scheduled.empty:
            return []
        try:
            result = self.runner.run(scheduled)
        except Exception as e:  # the shared forward pass: its requests fail, the engine goes on
            log.exception("the forward pass failed; its %d request(s) fail", len(scheduled.chunks))
            self.stats.failed_steps += 1
            why = f"the model's forward pass failed: {type(e).__name__}: {e}"
            result = StepResult(failed={c.request.request_id: why for c in scheduled.chunks})
        for request_id in result.poisoned:
            self._quarantine(self.requests[request_id])
        touched = self.scheduler.update(
            scheduled, result.sampled, result.prompt_logprobs, result.failed
        )
        self.stats.steps += 1
        self.stats.prompt_tokens += sum(c.length for c in scheduled.prefills)
        self.stats.generated_tokens += len(result.sampled)
        self.stats.failed_requests += len(result.failed)
        for request_id, error in result.failed.items():
            log.warning("request %s failed: %s", request_id, error)
        return [self._output(r) for r in touched if r.finished or self._has_news(r)]

    def _quarantine(self, request: Request) -> None:
        """Zero the blocks only REQUEST holds (its logits were not finite, so they may hold NaN,
        which attention's masked reads would spread to their next owner) and drop them from the
        prefix cache. Shared prefix blocks were computed by others and stay."""
        pool = self.scheduler.blocks
        private = [b for b in request.block_ids if b != NULL_BLOCK and pool.ref_counts[b] == 1]
        pool.forget(private)
        self.runner.cache.zero_blocks(private)

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[Request]:
        """Run PROMPTS to the end (all queued at once); the finished requests, in order."""
        each = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        requests = [self.add_request(p, sp) for p, sp in zip(prompts, each, strict=True)]
        while self.has_work:
            self.step()
        return requests

    # -- outputs ------------------------------------------------------------------------------

    def _has_news(self, request: Request) -> bool:
        return len(request.output_ids) > self._emitted[request.request_id]

    def _output(self, request: Request) -> RequestOutput:
        rid = request.request_id
        sent = self._emitted[rid]
        first = rid not in self._started
        self._started.add(rid)
        out = RequestOutput(
            request_id=rid,
            new_token_ids=request.output_ids[sent:],
            new_logprobs=request.logprobs[sent:] if request.params.logprobs else [],
            finish_reason=request.status.finish_reason,
            num_prompt_tokens=len(request.prompt_ids),
            num_output_tokens=len(request.output_ids),
            prompt_logprobs=request.prompt_logprobs if first else None,
            num_cached_tokens=request.num_cached_tokens,
            error=request.error,
        )
        self._emitted[rid] = len(request.output_ids)
        if request.finished:
            self.runner.release(rid)
            del self._emitted[rid]
            del self.requests[rid]
            self._started.discard(rid)
        return out


# ---------------------------------------------------------------------------------------------
# Async


class EngineClient(Protocol):
    """What the server needs from an engine (`AsyncEngine`, or a fake in route tests)."""

    @property
    def info(self) -> EngineInfo: ...

    @property
    def num_requests(self) -> int:
        """Requests in the engine now (waiting or running)."""
        ...

    def metrics(self) -> EngineMetrics: ...

    def shutdown(self, timeout: float = 10.0) -> None: ...

    def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Outputs for one request as they come; the last has a finish_reason. Closing the
        iterator early aborts the request. Raises `LmforgeError` for a bad request before the
        first output (`QueueFullError` when the queue is full) and `RequestFailedError` when
        this request fails in the engine."""
        ...

    async def abort(self, request_id: str) -> None: ...

    async def embed(self, inputs: list[list[int]]) -> list[list[float]]: ...


class AsyncEngine:
    """`EngineClient` over an `Engine` driven by a background thread."""

    def __init__(self, engine: Engine, *, name: str = "engine") -> None:
        self.engine = engine
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._inbox: list[tuple[Request | None, Any]] = []
        self._aborts: list[str] = []
        self._calls: list[tuple[Callable[[], Any], Future[Any]]] = []
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[Any]]] = {}
        self._stopping = False
        self._info = engine.info
        self._metrics = engine.metrics()  # replaced (not mutated) by the engine thread
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # -- EngineClient -------------------------------------------------------------------------

    async def generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        request_id: str,
        *,
        processors: Sequence[LogitsProcessor] = (),
    ) -> AsyncIterator[RequestOutput]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        finished = False
        try:
            # Added by a call into the engine thread: errors (bad prompt, full queue) raise
            # here, before the first output. Cancelled while waiting, the request may still be
            # added: the abort below then removes it.
            await self._call(
                lambda: self._add(prompt_ids, params, request_id, processors, loop, queue)
            )
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.error is not None:
                    finished = True
                    raise RequestFailedError(item.error)
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self._abort_soon(request_id)

    async def abort(self, request_id: str) -> None:
        self._abort_soon(request_id)

    async def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        return await self._call(lambda: self.engine.runner.embed(inputs))

    async def run(self, fn: Callable[[], T]) -> T:
        """Run FN in the engine thread between steps (it may use the model)."""
        return await self._call(fn)

    @property
    def num_requests(self) -> int:
        return len(self.engine.requests)

    @property
    def info(self) -> EngineInfo:
        return self._info

    def metrics(self) -> EngineMetrics:
        return self._metrics

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout)

    # -- engine thread ------------------------------------------------------------------------

    def _add(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        request_id: str,
        processors: Sequence[LogitsProcessor],
        loop: asyncio.AbstractEventLoop,
        queue: asyncio.Queue[Any],
    ) -> None:
        self.engine.add_request(prompt_ids, params, request_id, processors=processors)
        self._queues[request_id] = (loop, queue)

    def _abort_soon(self, request_id: str) -> None:
        with self._wake:
            self._aborts.append(request_id)
            self._wake.notify()

    async def _call(self, fn: Callable[[], T]) -> T:
        future: Future[T] = Future()
        with self._wake:
            if self._stopping:
                raise LmforgeError("the engine is shutting down")
            self._calls.append((fn, future))
            self._wake.notify()
        return await asyncio.wrap_future(future)

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._stopping or self._calls or self._aborts or self.engine.has_work):
                    self._wake.wait()
                if self._stopping:
                    self._fail_all(LmforgeError("the engine was shut down"))
                    return
                calls, self._calls = self._calls, []
                aborts, self._aborts = self._aborts, []
            for fn, future in calls:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as e:  # delivered to the awaiting caller
                        future.set_exception(e)
            for request_id in aborts:
                output = self.engine.abort(request_id)
                if output is not None:
                    self._deliver(output)
            if not self.engine.has_work:
                self._metrics = self.engine.metrics()  # aborts and calls change it too
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # a bug or a model failure: fail the requests, keep serving
                log.exception("engine step failed")
                self._fail_all(e)
                continue
            for output in outputs:
                self._deliver(output)
            self._metrics = self.engine.metrics()

    def _deliver(self, output: RequestOutput) -> None:
        target = self._queues.get(output.request_id)
        if target is None:
            return
        if output.finished:
            del self._queues[output.request_id]
        loop, queue = target
        loop.call_soon_threadsafe(queue.put_nowait, output)

    def _fail_all(self, error: BaseException) -> None:
        for request_id in list(self.engine.requests):
            self.engine.abort(request_id)
        for loop, queue in self._queues.values():
            loop.call_soon_threadsafe(queue.put_nowait, error)
        self._queues.clear()
