"""Admission, limits and metering of the model-calling routes; the billing-side Prometheus metrics.

A metered request goes: `admit` (after its body is checked, before any model work) → work under
`settling(meter)` → settled. `admit` reserves prompt + max_tokens tokens and their cost against
the caller's key in one conditional UPDATE (`registry.keys.admit`) and sets the
`x-ratelimit-*` headers; a refusal is a 429 — `rate_limit_exceeded` with `Retry-After`, or
`insufficient_quota` with `x-should-retry: false` for budgets — and a ledger row.

`settling` is the one place a request's bill is settled, however its work ends: served ("ok"),
refused by the content policy ("blocked"), the client gone ("cancelled", 499), bad input
("invalid"), or failed ("error": a full queue, a request the engine failed, a bug); `ending`
says which. The work records what it used in `Meter.used` as it goes. Settling appends the
request's one ledger row and gives the reservation back in the same transaction, then counts
the request in the metrics, so the metrics, the ledger and the invoices agree.

What is billed: prompt tokens (once per request, whatever `n`) and the tokens generated, at the
model's price in force at admission. A request cancelled midway (the client went away) pays for
what was generated; a request that failed on the server's side (queue full, error) pays nothing.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import Request
from prometheus_client import CollectorRegistry, Counter, Histogram

from lmforge.errors import LmforgeError
from lmforge.ops.pricing import cost_nusd, format_usd
from lmforge.registry import keys as key_sql
from lmforge.registry.keys import Admitted, KeyRecord, budget_period_of
from lmforge.registry.ledger import PriceRecord, get_price, record_usage
from lmforge.serve.auth import Call
from lmforge.serve.context import Caller
from lmforge.serve.errors import ClientDisconnected, OpenAIError
from lmforge.serve.state import ServedHead, ServedModel, ServerState, State

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


class MeteringMetrics:
    """Counters of what was billed (vLLM-style names, no per-key labels), one set per process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "lmforge:requests", "Requests by final status", ["status"], registry=r
        )
        self.prompt_tokens = Counter("lmforge:prompt_tokens", "Prompt tokens billed", registry=r)
        self.generation_tokens = Counter(
            "lmforge:generation_tokens", "Generated tokens billed", registry=r
        )
        self.cost = Counter("lmforge:cost_nanousd", "Cost billed, in nano-USD", registry=r)
        self.ttft = Histogram(
            "lmforge:time_to_first_token_seconds",
            "Time to first token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "lmforge:time_per_output_token_seconds",
            "Time per output token after the first",
            buckets=_TPOT_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "lmforge:e2e_request_latency_seconds",
            "Request latency, admission to settlement",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )


def metrics_of(state: ServerState) -> MeteringMetrics:
    metrics = getattr(state, "metering_metrics", None)
    if metrics is None:
        metrics = MeteringMetrics()
        state.metering_metrics = metrics
    return metrics


@dataclass
class Used:
    """What a request used so far: what its bill charges, if its ending is billed."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float | None = None
    tpot_s: float | None = None


_STATUS_OF_CODE = {
    "content_policy_violation": "blocked",
    "insufficient_quota": "quota_exceeded",
    "rate_limit_exceeded": "rate_limited",
    "invalid_api_key": "unauthorized",
}


def ending(error: BaseException | None) -> tuple[str, int]:
    """The ledger status and HTTP status of a request whose work ended with ERROR (None: it
    was served). Only "ok" and "cancelled" are billed."""
    if error is None:
        return "ok", 200
    if isinstance(error, (asyncio.CancelledError, GeneratorExit, ClientDisconnected)):
        return "cancelled", 499  # the client went away: it pays for what was generated
    if isinstance(error, OpenAIError):
        fallback = "invalid" if error.status < 500 else "error"
        return _STATUS_OF_CODE.get(error.code or "", fallback), error.status
    if isinstance(error, LmforgeError):  # bad input: the error handlers answer 400
        return "invalid", 400
    return "error", 500


@dataclass
class Meter:
    """One request's bill in the making."""

    state: ServerState
    request_id: str
    key: KeyRecord | None
    endpoint: str
    model: str | None
    model_version: str | None
    price: PriceRecord | None
    admitted: bool = False
    started: float = field(default_factory=time.perf_counter)
    used: Used = field(default_factory=Used)
    settled: bool = False

    def cost(self, prompt_tokens: int, completion_tokens: int) -> int:
        if self.price is None:
            return 0
        return cost_nusd(
            prompt_tokens, completion_tokens, self.price.input_musd, self.price.output_musd
        )

    def settle(self, status: str, http_status: int) -> None:
        """Append the ledger row (once), charging `used` if STATUS is billed, and release the
        reservation; blocking (call it in a thread). Callers go through `settling`."""
        if self.settled:
            return
        self.settled = True
        latency_s = time.perf_counter() - self.started
        billed = status in ("ok", "cancelled")
        prompt_tokens = self.used.prompt_tokens if billed else 0
        completion_tokens = self.used.completion_tokens if billed else 0
        ttft_s, tpot_s = self.used.ttft_s, self.used.tpot_s
        cost = self.cost(prompt_tokens, completion_tokens) if billed else 0
        with self.state.registry.begin() as conn:
            new = record_usage(
                conn,
                request_id=self.request_id,
                key_id=None if self.key is None else self.key.id,
                endpoint=self.endpoint,
                model=self.model,
                model_version=self.model_version,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                ttft_ms=None if ttft_s is None else ttft_s * 1000,
                latency_ms=latency_s * 1000,
                status=status,
                http_status=http_status,
                cost_nusd=cost,
                price_input=None if self.price is None else self.price.input_musd,
                price_output=None if self.price is None else self.price.output_musd,
            )
            if new and self.admitted and self.key is not None:
                key_sql.settle(
                    conn,
                    request_id=self.request_id,
                    key_id=self.key.id,
                    tokens=prompt_tokens + completion_tokens,
                    cost_nusd=cost,
                )
        if not new:
            log.warning("request %s was already in the ledger", self.request_id)
            return
        metrics = metrics_of(self.state)
        metrics.requests.labels(status).inc()
        metrics.prompt_tokens.inc(prompt_tokens)
        metrics.generation_tokens.inc(completion_tokens)
        metrics.cost.inc(cost)
        metrics.latency.observe(latency_s)
        if ttft_s is not None:
            metrics.ttft.observe(ttft_s)
        if tpot_s is not None:
            metrics.tpot.observe(tpot_s)

    async def asettle(self, status: str, http_status: int) -> None:
        """`settle` in a worker thread, carried to its end even if the caller is cancelled."""
        await asyncio.shield(asyncio.to_thread(self.settle, status, http_status))


@asynccontextmanager
async def settling(meter: Meter) -> AsyncIterator[Meter]:
    """Run a request's work inside; when it ends — returned, raised, cancelled — settle METER
    with what that ending means (`ending`) and what the work put in `meter.used`. Every
    metered path goes through here, and only here."""
    try:
        yield meter
    except BaseException as e:
        await meter.asettle(*ending(e))
        raise
    await meter.asettle(*ending(None))


def _duration(seconds: float) -> str:
    """OpenAI's reset format: "20ms", "1.5s", "6m0s"."""
    seconds = max(0.0, seconds)
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    if seconds < 60:
        return f"{round(seconds, 3):g}s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{round(rest):d}s"


def _limit_headers(key: KeyRecord, admitted: Admitted | None, now: float) -> dict[str, str]:
    """x-ratelimit-* for KEY's limited dimensions, from ADMITTED (or the key's row)."""
    source: KeyRecord | Admitted = admitted if admitted is not None else key
    headers: dict[str, str] = {}
    for what, limit, window, used in (
        ("requests", key.rpm, source.req_window, source.req_used),
        ("tokens", key.tpm, source.tok_window, source.tok_used),
    ):
        if limit is None:
            continue
        live = now < window + key_sql.WINDOW_S
        headers[f"x-ratelimit-limit-{what}"] = str(limit)
        headers[f"x-ratelimit-remaining-{what}"] = str(max(0, limit - (used if live else 0)))
        headers[f"x-ratelimit-reset-{what}"] = _duration(
            window + key_sql.WINDOW_S - now if live else 0.0
        )
    return headers


def _model_version(served: ServedModel | ServedHead | None) -> str | None:
    return None if served is None else served.version


async def admit(
    state: ServerState,
    caller: Caller,
    served: ServedModel | ServedHead | None,
    endpoint: str,
    prompt_tokens: int,
    max_completion_tokens: int,
) -> Meter:
    """Admit CALLER's request under its key's limits, or raise the 429 (after metering it)."""
    key = caller.key
    model = None if served is None else served.name
    rid = caller.request_id

    def run() -> tuple[Meter, OpenAIError | None]:
        price = None
        if model is not None:
            with state.registry.connect() as conn:
                price = get_price(conn, model=model)
        meter = Meter(state, rid, key, endpoint, model, _model_version(served), price)
        if key is None or (key.rpm is None and key.tpm is None and key.budget_nusd is None):
            return meter, None  # nothing to count against: the ledger row is all there is
        tokens = prompt_tokens + max_completion_tokens
        reserve = meter.cost(prompt_tokens, max_completion_tokens)
        now = time.time()
        with state.registry.begin() as conn:
            admitted = key_sql.admit(
                conn,
                key=key,
                request_id=rid,
                now=now,
                tokens=tokens,
                cost_nusd=reserve,
                ttl_s=state.settings.reservation_ttl_s,
            )
        if admitted is not None:
            meter.admitted = True
            caller.add_headers(_limit_headers(key, admitted, now))
            return meter, None
        with state.registry.connect() as conn:
            fresh = key_sql.get_key_by_id(conn, key_id=key.id) or key
        refusal = _refusal(fresh, tokens, reserve, now)
        caller.add_headers(_limit_headers(fresh, None, now))
        meter.settle(*ending(refusal))
        return meter, refusal

    meter, refusal = await asyncio.to_thread(run)
    if refusal is not None:
        raise refusal
    return meter


def _refusal(key: KeyRecord, tokens: int, cost: int, now: float) -> OpenAIError:
    """Why `admit` refused KEY (read after the fact, so only the message can be stale)."""
    if key.revoked_at is not None:
        return OpenAIError(
            401, f"The API key {key.prefix}… has been revoked.", code="invalid_api_key"
        )
    no_retry = {"x-should-retry": "false"}
    if key.budget_nusd is not None:
        period = budget_period_of(key.budget_period, now)
        if key.spent_in(period) + key.reserved_nusd + cost > key.budget_nusd:
            where = "this month" if key.budget_period == "month" else "in total"
            return OpenAIError(
                429,
                f"You exceeded your budget: {format_usd(key.spent_in(period))} spent and "
                f"{format_usd(key.reserved_nusd)} held by requests in flight {where}, of "
                f"{format_usd(key.budget_nusd)}; this request may cost up to {format_usd(cost)}.",
                code="insufficient_quota",
                type_="insufficient_quota",
                headers=no_retry,
            )
    if key.tpm is not None and tokens > key.tpm:
        return OpenAIError(
            429,
            f"Request too large: it may use {tokens} tokens (prompt + max_tokens) and this key "
            f"allows {key.tpm} tokens per minute; lower max_tokens.",
            code="rate_limit_exceeded",
            headers=no_retry,
        )
    waits = []
    req_reset, tok_reset = key.req_window + key_sql.WINDOW_S, key.tok_window + key_sql.WINDOW_S
    if key.rpm is not None and now < req_reset and key.req_used + 1 > key.rpm:
        waits.append(("requests", key.rpm, req_reset - now))
    if key.tpm is not None and now < tok_reset and key.tok_used + tokens > key.tpm:
        waits.append(("tokens", key.tpm, tok_reset - now))
    what, limit, wait = max(waits, key=lambda w: w[2]) if waits else ("requests", key.rpm, 1.0)
    return OpenAIError(
        429,
        f"Rate limit reached for {what} per minute: limit {limit}. "
        f"Please try again in {_duration(wait)}.",
        code="rate_limit_exceeded",
        headers={"Retry-After": str(max(1, math.ceil(wait)))},
    )


async def metered(http: Request, state: State, caller: Call) -> AsyncIterator[None]:
    """A route dependency that meters a request with no model work (e.g. /v1/moderations):
    it counts against the key's requests per minute and gets its ledger row."""
    meter = await admit(state, caller, None, http.url.path, 0, 0)
    async with settling(meter):
        yield
