"""The continuous-batching scheduler: which tokens of which requests each engine step computes.

Pure Python (no torch): it decides, the `ModelRunner` computes, and `update` applies the result.
The KV cache is paged (`blocks.BlockPool`): a running request holds a block table that covers
its tokens, and the cache is shared out block by block as tokens arrive.

Every step (`schedule`):

1. Decodes first: every running request with exactly one token left to compute (its last
   sampled token) gets that token. When that token starts a new block and no block is free,
   the most recently arrived running request is preempted — its blocks are released and it
   goes back to the front of the queue, to recompute its prompt and output later (vLLM's
   recompute preemption; with prefix caching, its own blocks are often still cached then).
2. Then running requests still in their prefill continue with a chunk, oldest first.
3. Then waiting requests (preempted ones first) are admitted while there is room for another
   running request (`max_batch`), step budget, and free blocks for all their tokens. With
   prefix caching, the longest run of cached full blocks is shared and only the rest is
   computed (a prompt-logprobs request computes everything: its logprobs need every
   position). A request whose next block is being computed right now by another request
   waits for it instead (so `n` choices of one prompt prefill it once).

At most `max_batched_tokens` tokens are computed per step (chunked prefill: a long prompt takes
several steps while the running requests keep decoding). `update` appends each sampled token,
registers newly full blocks in the prefix cache, and finishes a request on a stop token
(unless `ignore_eos`), at `max_tokens`, at `max_model_len`, or with an error of its own.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from lmforge.errors import LmforgeError
from lmforge.infer.blocks import NULL_BLOCK, BlockPool, hash_block
from lmforge.infer.request import Request, RequestStatus, TokenLogprob


class QueueFullError(LmforgeError):
    """The waiting queue is at `max_queue`: try again later (HTTP 503)."""


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch: int = 16
    """Requests running at once."""
    max_model_len: int = 2048
    """Tokens (prompt + output) one request may hold."""
    max_batched_tokens: int = 512
    """Tokens computed per step, decode tokens and prefill chunks together."""
    cache_tokens: int | None = None
    """Token slots in the KV cache pool, rounded up to whole blocks (None: `max_batch` ×
    `max_model_len`, room for every running request at full length)."""
    max_queue: int = 256
    """Waiting requests at most; one more is refused with `QueueFullError`."""
    block_size: int = 16
    """Tokens per KV cache block (the unit of allocation and of prefix sharing)."""
    prefix_caching: bool = True
    """Share the keys and values of equal prompt prefixes between requests."""
    cache_salt: str = ""
    """Mixed into every prefix hash: the model version (and adapter), so that two models never
    share blocks."""

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_model_len", "max_batched_tokens", "max_queue"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise LmforgeError(f"{name} must be an integer >= 1, got {value!r}")
        if not _is_int(self.block_size) or not 1 <= self.block_size <= 1024:
            raise LmforgeError(
                f"block_size must be an integer in [1, 1024], got {self.block_size!r}"
            )
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

    @property
    def num_blocks(self) -> int:
        """Blocks in the KV cache pool."""
        return -(-self.cache_capacity // self.block_size)


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
    decodes: list[Chunk] = field(default_factory=list)  # one token each, in arrival order
    prefills: list[Chunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(c.length for c in self.prefills)

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills

    @property
    def chunks(self) -> list[Chunk]:
        return self.decodes + self.prefills


@dataclass
class Sampled:
    """The runner's result for one request whose chunk `samples`."""

    token_id: int
    logprob: TokenLogprob | None = None


class Scheduler:
    """Admission, chunked prefill and decode, preemption, blocks and the prefix cache.

    WINDOW > 0 says every layer of the model attends only to the last WINDOW positions
    (sliding-window attention in all layers): blocks that no later query can see go back to
    the pool as a request advances, so a long generation holds about WINDOW tokens of cache.
    """

    def __init__(self, config: SchedulerConfig, window: int = 0) -> None:
        self.config = config
        self.window = window
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in arrival order
        self.blocks = BlockPool(config.num_blocks, config.block_size, caching=config.prefix_caching)
        self._salt = config.cache_salt.encode()
        self._pending: dict[bytes, Request] = {}  # prefix hash → the request computing it

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
                self._finish(request, RequestStatus.FINISHED_ABORTED)
                return request
        return None

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def cache_used(self) -> int:
        """Tokens whose keys and values running requests hold (computed ones)."""
        return sum(r.num_computed for r in self.running)

    # -- one step -----------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_batched_tokens
        # 1. decodes, preempting the newest running requests while no block is free
        for request in [r for r in self.running if r.num_remaining == 1]:
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted below to make room for an older one
            while not self._grow(request, request.num_tokens):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is request:
                    break
            if request.status is RequestStatus.RUNNING:
                out.decodes.append(Chunk(request, request.num_computed, 1))
        budget -= len(out.decodes)
        # 2. running prefills continue (their blocks were allocated at admission)
        for request in self.running:
            if request.num_remaining <= 1 or budget == 0:
                continue
            length = min(request.num_remaining, budget)
            out.prefills.append(Chunk(request, request.num_computed, length))
            budget -= length
        # 3. admit waiting requests whose tokens all fit in the free blocks
        while self.waiting and len(self.running) < self.config.max_batch and budget > 0:
            request = self.waiting[0]
            if any(request is r for r in out.preempted) or not self._admit(request):
                break  # first come, first served: nobody overtakes the head of the queue
            self.waiting.popleft()
            request.move_to(RequestStatus.RUNNING)
            self.running.append(request)
            length = min(request.num_remaining, budget)
            out.prefills.append(Chunk(request, request.num_computed, length))
            budget -= length
        return out

    def update(
        self,
        out: SchedulerOutput,
        sampled: dict[str, Sampled],
        prompt_logprobs: dict[str, list[TokenLogprob]] | None = None,
        failed: dict[str, str] | None = None,
    ) -> list[Request]:
        """Apply a step's results: SAMPLED holds the new token of every chunk that `samples`,
        PROMPT_LOGPROBS the prompt logprobs computed for echo requests, FAILED the requests
        that failed on their own (id → error; they finish with it, the others go on). Return
        the requests that computed this step (finished ones included)."""
        touched = []
        for chunk in out.chunks:
            request = chunk.request
            if request.status is not RequestStatus.RUNNING:
                continue  # aborted while the step ran
            touched.append(request)
            error = (failed or {}).get(request.request_id)
            if error is not None:
                self._finish(request, RequestStatus.FINISHED_ERROR)
                request.error = error
                continue
            request.num_computed += chunk.length
            self._register(request)
            self._drop_outside_window(request)
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

    # -- blocks ---------------------------------------------------------------------------------

    def _hashes(self, request: Request, num_blocks: int) -> list[bytes]:
        """The prefix hashes of REQUEST's first NUM_BLOCKS full blocks (computed once)."""
        hashes, size = request.block_hashes, self.config.block_size
        while len(hashes) < num_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block(parent, request.tokens(i * size, (i + 1) * size), self._salt))
        return hashes[:num_blocks]

    def _admit(self, request: Request) -> bool:
        """Give REQUEST its block table (cached prefix + new blocks for the rest of its
        tokens) if the pool has room; False (nothing taken) if not, or if it should wait for a
        prefix that another request is computing now."""
        pool, size = self.blocks, self.config.block_size
        hits: list[int] = []
        if pool.caching and not request.params.echo:
            # At most num_tokens - 1 from the cache: the last token is computed for its logits.
            hashes = self._hashes(request, (request.num_tokens - 1) // size)
            hits = pool.lookup(hashes)
            if len(hits) < len(hashes) and hashes[len(hits)] in self._pending:
                return False
        need = pool.blocks_for(request.num_tokens) - len(hits)
        if need > pool.num_free_after_taking(hits):
            return False
        pool.take(hits)
        request.block_ids = hits + pool.allocate(need)
        request.num_computed = len(hits) * size
        if request.num_preemptions == 0:
            request.num_cached_tokens = request.num_computed
        if pool.caching and not request.params.echo:
            pool.stats.queries += request.num_tokens
            pool.stats.hits += request.num_computed
            full = len(request.prompt_ids) // size  # blocks this request will fill and cache
            for h in self._hashes(request, full)[len(hits) :]:
                self._pending.setdefault(h, request)
        return True

    def _grow(self, request: Request, num_tokens: int) -> bool:
        """Make REQUEST's block table cover NUM_TOKENS tokens; False if no block is free."""
        need = self.blocks.blocks_for(num_tokens) - len(request.block_ids)
        if need <= 0:
            return True
        if need > self.blocks.num_free:
            return False
        request.block_ids += self.blocks.allocate(need)
        return True

    def _register(self, request: Request) -> None:
        """Put REQUEST's newly full, computed blocks in the prefix cache."""
        if not self.blocks.caching:
            return
        full = request.num_computed // self.config.block_size
        if full <= request.num_registered:
            return
        hashes = self._hashes(request, full)
        for i in range(request.num_registered, full):
            self.blocks.register(request.block_ids[i], hashes[i])
            if self._pending.get(hashes[i]) is request:
                del self._pending[hashes[i]]
        request.num_registered = full

    def _drop_outside_window(self, request: Request) -> None:
        """Give back the leading blocks no later query of REQUEST can see: the next query is
        at position num_computed and sees keys num_computed − window < j ≤ num_computed."""
        if not self.window:
            return
        gone = min(
            (request.num_computed - self.window + 1) // self.config.block_size,
            len(request.block_ids),
        )
        for i in range(request.num_dropped, gone):
            self.blocks.release([request.block_ids[i]])
            request.block_ids[i] = NULL_BLOCK
        request.num_dropped = max(request.num_dropped, gone)

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
        self.blocks.release([b for b in request.block_ids if b != NULL_BLOCK])
        for h in request.block_hashes:
            if self._pending.get(h) is request:
                del self._pending[h]
        request.block_ids = []
        request.num_computed = 0
        request.num_registered = 0
        request.num_dropped = 0
