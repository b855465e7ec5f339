"""`Request`: one sequence in the engine, its status state machine, and what the engine emits.

A request is token ids in, token ids out. Its tokens are `prompt_ids + output_ids`;
`num_computed` of them have their keys and values in the KV cache. Each engine step computes
some of the rest (a prefill chunk, or the one last-sampled token when decoding) and, when the
step reaches the last token, samples the next one. Prefill, decode and recompute after a
preemption are therefore the same operation on different amounts of tokens.

Status moves only along these edges (anything else is a bug and raises):

    WAITING ──► RUNNING ──► FINISHED_STOPPED | FINISHED_LENGTH
       │          │  ▲
       │          ▼  │
       │       PREEMPTED          (lost its cache blocks; recomputes prompt + output later)
       └──────────┴──────► FINISHED_ABORTED | FINISHED_ERROR (this request alone failed)

Torch-free: the scheduler and the server import it.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from lmforge.infer.params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH = "finished_length"
    FINISHED_ABORTED = "finished_aborted"
    FINISHED_ERROR = "finished_error"

    @property
    def finished(self) -> bool:
        return self in _FINISH_REASONS

    @property
    def finish_reason(self) -> str | None:
        """OpenAI's finish_reason: "stop", "length", "abort" or (this request failed alone)
        "error"; None while unfinished."""
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}

_EDGES = {
    RequestStatus.WAITING: {
        RequestStatus.RUNNING,
        RequestStatus.FINISHED_ABORTED,
        RequestStatus.FINISHED_ERROR,
    },
    RequestStatus.RUNNING: {
        RequestStatus.PREEMPTED,
        RequestStatus.FINISHED_STOPPED,
        RequestStatus.FINISHED_LENGTH,
        RequestStatus.FINISHED_ABORTED,
        RequestStatus.FINISHED_ERROR,
    },
    RequestStatus.PREEMPTED: {
        RequestStatus.RUNNING,
        RequestStatus.FINISHED_ABORTED,
        RequestStatus.FINISHED_ERROR,
    },
}


@dataclass
class TokenLogprob:
    """A token's log-probability under the model (before penalties and temperature), with the
    `top` most likely alternatives at that position as (token id, logprob), most likely first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    status: RequestStatus = RequestStatus.WAITING
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    """Tokens (from the start of prompt + output) whose keys and values are in the cache."""
    block_ids: list[int] = field(default_factory=list)
    """The block table while RUNNING: the KV cache blocks of tokens 0.., in order."""
    block_hashes: list[bytes] = field(default_factory=list)
    """Prefix hashes of the full blocks of prompt + output (computed as they are needed)."""
    num_registered: int = 0
    """Blocks of `block_ids` already put in the prefix cache."""
    num_dropped: int = 0
    """Leading blocks given back because no layer can see them any more (sliding window);
    their `block_ids` entries are the null block."""
    num_cached_tokens: int = 0
    """Prompt tokens found in the prefix cache when the request was first admitted."""
    error: str | None = None
    """Why the request failed (status FINISHED_ERROR)."""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    """One per output token when `params.logprobs`."""
    prompt_logprobs: list[TokenLogprob | None] | None = None
    """With `params.echo`: one per prompt token, the first None (nothing predicts it)."""
    num_preemptions: int = 0
    finished_at: float | None = None

    def __post_init__(self) -> None:
        if self.params.echo and self.prompt_logprobs is None:
            self.prompt_logprobs = [None]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_remaining(self) -> int:
        """Tokens to compute before the next token can be sampled."""
        return self.num_tokens - self.num_computed

    def token(self, index: int) -> int:
        """Token INDEX of prompt + output."""
        n = len(self.prompt_ids)
        return self.prompt_ids[index] if index < n else self.output_ids[index - n]

    def tokens(self, start: int, stop: int) -> list[int]:
        return [self.token(i) for i in range(start, stop)]

    @property
    def finished(self) -> bool:
        return self.status.finished

    def move_to(self, status: RequestStatus) -> None:
        if status not in _EDGES.get(self.status, set()):
            raise RuntimeError(
                f"request {self.request_id}: {self.status.value} -> {status.value} is not allowed"
            )
        self.status = status
        if status.finished:
            self.finished_at = time.monotonic()


@dataclass
class RequestOutput:
    """What one engine step produced for one request: the new tokens since the last output."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprob]
    finish_reason: str | None  # None while going on: "stop", "length", "abort" or "error"
    num_prompt_tokens: int
    num_output_tokens: int
    prompt_logprobs: list[TokenLogprob | None] | None = None
    """Sent once, in the first output of a request with `params.echo`."""
    num_cached_tokens: int = 0
    """Prompt tokens whose keys and values came from the prefix cache (not computed)."""
    error: str | None = None
    """With finish_reason "error": what failed, in one line."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
