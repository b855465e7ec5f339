"""The continuous-batching scheduler: which tokens of which requests each engine step computes.

Pure Python (no torch): it decides, the `ModelRunner` computes, and `update` applies the result.

Every step (`schedule`):

1. Decodes first: every running request with exactly one token left to compute (its last
   sampled token) gets that token. Each needs one more KV cache token; when the cache is full,
   the most recently arrived running request is preempted — its slot and cache tokens are freed
   and it goes back to the front of the queue, to recompute its prompt and output later
   (vLLM's recompute preemption).
2. Then running requests still in their prefill continue with a chunk, oldest first.
3. Then waiting requests (preempted ones first) are admitted between decode steps while there is
   a free slot, step budget, and room in the cache for all their tokens.

At most `max_batched_tokens` tokens are computed per step (chunked prefill: a long prompt takes
several steps while the running requests keep decoding). `update` appends each sampled token
and finishes a request on a stop token (unless `ignore_eos`), at `max_tokens`, or when its
tokens reach `max_model_len`.

Slots: the KV cache has `max_batch` rows and a running request owns one (the lowest free one,
so the rows in use stay packed at the front). The KV cache budget `cache_tokens` counts the
tokens held by all running requests; by default it is the whole cache (`max_batch` ×
`max_model_len`), so preemption only happens when it is set lower.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from lmforge.errors import LmforgeError
from lmforge.infer.request import Request, RequestStatus, TokenLogprob


class QueueFullError(LmforgeError):
    """The waiting queue is at `max_queue`: try again later (HTTP 503)."""


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch: int = 16
    """Requests running at once (KV cache slots)."""
    max_model_len: int = 2048
    """Tokens (prompt + output) one request may hold."""
    max_batched_tokens: int = 512
    """Tokens computed per step, decode tokens and prefill chunks together."""
    cache_tokens: int | None = None
    """KV cache tokens all running requests may hold together (None: the whole cache)."""
    max_queue: int = 256
    """Waiting requests at most; one more is refused with `QueueFullError`."""

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_model_len", "max_batched_tokens", "max_queue"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise LmforgeError(f"{name} must be an integer >= 1, got {value!r}")
        if self.cache_tokens is not None and not _is_int(self.cache_tokens):
            raise LmforgeError(f"cache_tokens must be an integer, got {self.cache_tokens!r}")
        if self.max_batched_tokens < self.max_batch:
            raise LmforgeError(
                f"max_batched_tokens ({self.max_batched_tokens}) must be at least max_batch "
                f"({self.max_batch}): every running request decodes one token per step"
            )
        if self.cache_tokens is not None and self.cache_tokens < self.max_model_len:
            raise LmforgeError(
                f"cache_tokens ({self.cache_tokens}) must hold at least one whole request "
                f"(max_model_len {self.max_model_len})"
            )

    @property
    def cache_capacity(self) -> int:
        if self.cache_tokens is not None:
            return self.cache_tokens
        return self.max_batch * self.max_model_len


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class Chunk:
    """Tokens [start, start + length) of REQUEST's prompt + output, computed this step."""

    request: Request
    start: int
    length: int

    @property
    def samples(self) -> bool:
        """True when the chunk reaches the request's last token: its logits pick the next one."""
        return self.start + self.length == self.request.num_tokens


@dataclass
class SchedulerOutput:
    decodes: list[Chunk] = field(default_factory=list)  # one token each, ordered by slot
    prefills: list[Chunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    parked: dict[int, int] = field(default_factory=dict)
    """Slot → position for running requests below the last decode slot that do not decode this
    step. The runner decodes cache rows [0, last decode slot] as one batch and gives these rows
    a dummy token at that position: their next prefill chunk starts there and overwrites it
    before anything reads it. Free rows in that range take position 0."""

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(c.length for c in self.prefills)

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills


@dataclass
class Sampled:
    """The runner's result for one request whose chunk `samples`."""

    token_id: int
    logprob: TokenLogprob | None = None


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in arrival order
        self.free_slots = list(range(config.max_batch))  # kept sorted: lowest first
        self.cache_used = 0  # tokens held by running requests (their num_computed)

    # -- requests in and out ------------------------------------------------------------------

    def add(self, request: Request) -> None:
        if len(self.waiting) >= self.config.max_queue:
            raise QueueFullError(
                f"the queue is full ({self.config.max_queue} requests waiting); retry later"
            )
        if request.num_tokens >= self.config.max_model_len:
            raise LmforgeError(
                f"the prompt has {request.num_tokens} tokens; at most "
                f"{self.config.max_model_len - 1} fit (max_model_len {self.config.max_model_len})"
            )
        self.waiting.append(request)

    def abort(self, request_id: str) -> Request | None:
        """Finish the request as aborted and free what it holds; None if it is not here."""
        for request in self.waiting:
            if request.request_id == request_id:
                self.waiting.remove(request)
                request.move_to(RequestStatus.FINISHED_ABORTED)
                return request
        for request in self.running:
            if request.request_id == request_id:
                self._release(request)
                request.move_to(RequestStatus.FINISHED_ABORTED)
                return request
        return None

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step -----------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_batched_tokens
        # 1. decodes, preempting the newest running requests while the cache is full
        decoding = [r for r in self.running if r.num_remaining == 1]
        kept: list[Request] = []
        for request in decoding:
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted below to make room for an older one
            while self._cache_free(kept) < 1:
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is request:
                    break
            if request.status is RequestStatus.RUNNING:
                kept.append(request)
        out.decodes = sorted(
            (Chunk(r, r.num_computed, 1) for r in kept), key=lambda c: c.request.slot or 0
        )
        budget -= len(out.decodes)
        if out.decodes:
            top = max(c.request.slot or 0 for c in out.decodes)
            out.parked = {
                r.slot: r.num_computed
                for r in self.running
                if r.slot is not None and r.slot < top and r.num_remaining > 1
            }
        free = self._cache_free(kept)
        # 2. running prefills continue
        for request in self.running:
            if request.num_remaining <= 1 or budget == 0 or free == 0:
                continue
            length = min(request.num_remaining, budget, free)
            out.prefills.append(Chunk(request, request.num_computed, length))
            budget -= length
            free -= length
        # 3. admit waiting requests whose tokens all fit in the cache
        while self.waiting and self.free_slots and budget > 0:
            request = self.waiting[0]
            if request.num_tokens > free:
                break  # first come, first served: nobody overtakes the head of the queue
            self.waiting.popleft()
            request.slot = self.free_slots.pop(0)
            request.move_to(RequestStatus.RUNNING)
            self.running.append(request)
            length = min(request.num_remaining, budget)
            out.prefills.append(Chunk(request, 0, length))
            budget -= length
            free -= request.num_tokens  # reserved: it will need them all
        if out.empty and self.running:
            # Only prefills left and no cache room for them (decodes ate the reserve): free
            # the newest so the others can go on.
            victim = self.running[-1]
            self._preempt(victim)
            out.preempted.append(victim)
        return out

    def update(
        self,
        out: SchedulerOutput,
        sampled: dict[str, Sampled],
        prompt_logprobs: dict[str, list[TokenLogprob]] | None = None,
    ) -> list[Request]:
        """Apply a step's results: SAMPLED holds the new token of every chunk that `samples`,
        PROMPT_LOGPROBS the prompt logprobs computed for echo requests. Return the requests
        that computed this step (finished ones included)."""
        touched = []
        for chunk in out.decodes + out.prefills:
            request = chunk.request
            if request.status is not RequestStatus.RUNNING:
                continue  # aborted while the step ran
            request.num_computed += chunk.length
            self.cache_used += chunk.length
            touched.append(request)
            if prompt_logprobs and request.request_id in prompt_logprobs:
                assert request.prompt_logprobs is not None
                request.prompt_logprobs.extend(prompt_logprobs[request.request_id])
            if not chunk.samples:
                continue
            if request.params.max_tokens == 0:  # prompt only (echo / scoring)
                self._finish(request, RequestStatus.FINISHED_LENGTH)
                continue
            self._append(request, sampled[request.request_id])
        return touched

    # -- internals ----------------------------------------------------------------------------

    def _append(self, request: Request, result: Sampled) -> None:
        params = request.params
        request.output_ids.append(result.token_id)
        if result.logprob is not None:
            request.logprobs.append(result.logprob)
        if not params.ignore_eos and result.token_id in params.stop_token_ids:
            self._finish(request, RequestStatus.FINISHED_STOPPED)
        elif (
            len(request.output_ids) >= params.max_tokens
            or request.num_tokens >= self.config.max_model_len
        ):
            self._finish(request, RequestStatus.FINISHED_LENGTH)

    def _finish(self, request: Request, status: RequestStatus) -> None:
        self._release(request)
        request.move_to(status)

    def _preempt(self, request: Request) -> None:
        self._release(request)
        request.move_to(RequestStatus.PREEMPTED)
        request.num_preemptions += 1
        self.waiting.appendleft(request)

    def _release(self, request: Request) -> None:
        self.running.remove(request)
        self.cache_used -= request.num_computed
        request.num_computed = 0
        assert request.slot is not None
        self.free_slots.append(request.slot)
        self.free_slots.sort()
        request.slot = None

    def _cache_free(self, decoding: list[Request]) -> int:
        """Cache tokens left after the DECODING requests' next token each."""
        return self.config.cache_capacity - self.cache_used - len(decoding)
