"""`create_app(settings)`: the FastAPI application behind `lmforge serve`, and its lifespan.

Startup returns at once and loads the models in a background thread, so `/health` answers
while they load and `/ready` says 503 until every model is loaded (and again while the
server drains on SIGTERM). Each language model gets its own `AsyncEngine` (engine thread + KV
cache); requests pick one by the `model` field. A classification or extractive QA model (a
directory whose config.json has `lmforge_head`) is a `ServedHead` instead: no engine, served
by `/v1/classifications` or `/v1/answers` (`task_routes.py`) and refused, with the route to
use, by the generation routes. Request bodies are capped (413) before any parsing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)
from sqlalchemy import Engine as SqlEngine
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmforge.errors import LmforgeError
from lmforge.infer.engine import AsyncEngine, Engine, default_max_model_len
from lmforge.infer.scheduler import SchedulerConfig
from lmforge.model.checkpoint import (
    LSTM_ARCHITECTURE,
    WEIGHTS_FILE,
    file_sha256,
    head_of,
    load_head_model,
    load_model,
)
from lmforge.model.heads import HeadModel
from lmforge.model.transformer import Transformer, optimize_weight_layout
from lmforge.registry.db import connect
from lmforge.registry.keys import release_expired
from lmforge.resolve import ModelRef, resolve
from lmforge.serve.errors import OpenAIError, error_response, install_error_handlers
from lmforge.tokenizer import Tokenizer

log = logging.getLogger(__name__)

_DTYPES = {"float32", "bfloat16"}


@dataclass
class ServerSettings:
    models: list[str] = field(default_factory=lambda: [""])
    """Model specs (registry name, directory, .gguf, built-in); "" is the built-in default."""
    max_batch: int = 16
    max_queue: int = 64
    max_model_len: int | None = None  # None: the model's context, at most 2048
    max_batched_tokens: int = 512
    dtype: str = "float32"
    max_body_bytes: int = 2 * 1024 * 1024
    home: Path | None = None
    auth: bool = True
    """Require API keys (deny by default); False only for local experiments on loopback."""
    reservation_ttl_s: float = 3600.0
    """A request's token and budget reservation is released after this long if it never
    settles (its server was killed)."""
    alias_poll_s: float = 1.0
    """How often a served alias is checked for a new target (`serve.aliases`)."""

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise LmforgeError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        for name in ("max_batch", "max_queue", "max_batched_tokens", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise LmforgeError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise LmforgeError(f"max_model_len must be >= 2, got {self.max_model_len}")


@dataclass
class ServedModel:
    name: str
    tokenizer: Tokenizer
    engine: AsyncEngine
    max_model_len: int
    stop_token_ids: list[int]
    created: int
    path: Path
    version: str  # "name@3" for a registry model, else "name@sha256:<12 hex of the weights>"
    alias: str | None = None  # served under this alias, which the server follows


TASK_ROUTES = {"classify": "/v1/classifications", "qa": "/v1/answers"}
"""The route that serves each head task (`HeadConfig.task`)."""
_TASK_NAMES = {"classify": "a classification model", "qa": "an extractive QA model"}


@dataclass
class ServedHead:
    """A classification or extractive QA model: run in a worker thread by `task_routes`, one
    request at a time (`lock`), never by the generation engine."""

    name: str
    tokenizer: Tokenizer
    model: HeadModel
    max_model_len: int  # the model's context; longer texts are truncated (or windowed, QA)
    created: int
    path: Path
    version: str
    alias: str | None = None  # served under this alias, which the server follows
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def task(self) -> str:
        return self.model.head.task


class ServerState:
    """What the routes share: the loaded models, readiness and draining."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.models: dict[str, ServedModel] = {}  # language models (the generation routes')
        self.heads: dict[str, ServedHead] = {}  # classification and QA models
        self.loaded = threading.Event()
        self.load_error: str | None = None
        self.on_load_error: Callable[[], None] | None = None  # e.g. stop the server
        self.draining = False
        self.registry: SqlEngine = connect(home=settings.home)
        self.metering_metrics: Any = None  # serve.metering's counters, made on first use

    @property
    def ready(self) -> bool:
        return self.loaded.is_set() and self.load_error is None and not self.draining

    @property
    def names(self) -> list[str]:
        """Every served model's name, language models and heads alike."""
        return sorted([*self.models, *self.heads])

    def lookup(self, name: str) -> ServedModel | ServedHead:
        """The served model NAME of either kind; 503 while not ready, 404 if unknown."""
        if not self.ready:
            raise OpenAIError(
                503,
                "the server is draining" if self.draining else "the model is still loading",
                headers={"Retry-After": "1"},
            )
        served = self.models.get(name) or self.heads.get(name)
        if served is None:
            raise OpenAIError(
                404,
                f"the model {name!r} does not exist; this server has: {', '.join(self.names)}",
                param="model",
                code="model_not_found",
            )
        return served

    def model(self, name: str) -> ServedModel:
        """The language model NAME; a head model is a 400 naming the route that serves it."""
        served = self.lookup(name)
        if isinstance(served, ServedHead):
            raise OpenAIError(
                400,
                f"{name!r} is {_TASK_NAMES[served.task]}, not a language model: "
                f"use POST {TASK_ROUTES[served.task]}",
                param="model",
                code="wrong_model_type",
            )
        return served

    def head(self, name: str, task: str) -> ServedHead:
        """The head model NAME if it does TASK; any other model is a 400 naming its route."""
        served = self.lookup(name)
        if isinstance(served, ServedHead) and served.task == task:
            return served
        if isinstance(served, ServedHead):
            what, route = _TASK_NAMES[served.task], f"POST {TASK_ROUTES[served.task]}"
        else:
            what, route = "a language model", "POST /v1/completions or /v1/chat/completions"
        raise OpenAIError(
            400,
            f"{name!r} is {what}, not {_TASK_NAMES[task]}: use {route}",
            param="model",
            code="wrong_model_type",
        )

    def load(self) -> None:
        """Load every model (in a background thread); sets `loaded` when done or failed."""
        try:
            for spec in self.settings.models:
                served = load_served(spec or None, self.settings)
                if served.name in self.models or served.name in self.heads:
                    raise LmforgeError(f"model {served.name!r} is given twice")
                if isinstance(served, ServedHead):
                    self.heads[served.name] = served
                else:
                    self.models[served.name] = served
                log.info("serving %s (max_model_len %d)", served.name, served.max_model_len)
        except Exception as e:
            self.load_error = str(e)
            log.error("cannot load the models: %s", e)
            if self.on_load_error is not None:
                self.on_load_error()
        finally:
            self.loaded.set()

    def busy(self) -> bool:
        """Whether any model is generating (or a head model computing) right now."""
        return any(m.engine.num_requests for m in self.models.values()) or any(
            h.lock.locked() for h in self.heads.values()
        )

    def shutdown(self) -> None:
        for served in self.models.values():
            served.engine.shutdown()
        self.registry.dispose()

    def release_expired(self) -> None:
        """Free the reservations of requests that never settled (a killed server's)."""
        with self.registry.begin() as conn:
            released = release_expired(conn, now=time.time())
        if released:
            log.warning("released %d expired reservation(s)", released)


def check_servable(spec: str | None, *, home: Path | None = None) -> None:
    """Refuse at once what `load_served` would refuse after loading: an unknown model, an LSTM."""
    ref = resolve(spec, home=home)
    config = ref.path / "config.json"
    if ref.path.is_dir() and config.is_file():
        try:
            architectures = json.loads(config.read_text()).get("architectures") or []
        except (OSError, ValueError, AttributeError):
            return  # the load will say what is wrong with it
        if LSTM_ARCHITECTURE in architectures:
            raise LmforgeError(f"{ref.name}: only Transformer models can be served (not an LSTM)")


def _name_and_version(ref: ModelRef) -> tuple[str, str]:
    """The name a model is served under and the exact version the ledger records.

    A directory or file given by path is served under its base name ("runs/x/model" → "model").
    A registry model is served under its name (prices and key limits use it), whichever version
    was asked for, and an alias under the alias; the ledger records the exact version.
    """
    if ref.alias is not None:
        return ref.alias, ref.name
    name = ref.path.stem if ref.kind == "path" else ref.name.split("@")[0]
    if ref.kind == "registry" and ref.version is not None:
        return name, f"{name}@{ref.version}"
    weights = ref.path / WEIGHTS_FILE if ref.path.is_dir() else ref.path
    return name, f"{name}@sha256:{file_sha256(weights)[:12]}"


def load_served(spec: str | None, settings: ServerSettings) -> ServedModel | ServedHead:
    import torch

    ref = resolve(spec, home=settings.home)
    dtype = torch.bfloat16 if settings.dtype == "bfloat16" else torch.float32
    if head_of(ref.path) is not None:
        head_model, tokenizer, _ = load_head_model(ref.path)
        head_model.to(dtype)
        name, version = _name_and_version(ref)
        return ServedHead(
            name=name,
            tokenizer=tokenizer,
            model=head_model,
            max_model_len=head_model.config.max_seq_len,
            created=int(time.time()),
            path=ref.path,
            version=version,
            alias=ref.alias,
        )
    loaded = load_model(ref.path, dtype=dtype)
    model = loaded.model
    if not isinstance(model, Transformer):
        raise LmforgeError(f"{ref.name}: only Transformer models can be served (not an LSTM)")
    optimize_weight_layout(model)
    context = model.config.max_seq_len
    max_len = settings.max_model_len or default_max_model_len(model)
    if max_len > context:
        raise LmforgeError(f"max_model_len {max_len} exceeds {ref.name}'s context {context}")
    config = SchedulerConfig(
        max_batch=settings.max_batch,
        max_model_len=max_len,
        max_batched_tokens=max(settings.max_batched_tokens, settings.max_batch),
        max_queue=settings.max_queue,
    )
    name, version = _name_and_version(ref)
    engine = AsyncEngine(Engine(model, config), name=f"engine-{name}")
    return ServedModel(
        name=name,
        tokenizer=loaded.tokenizer,
        engine=engine,
        max_model_len=max_len,
        stop_token_ids=loaded.stop_token_ids(),
        created=int(time.time()),
        path=ref.path,
        version=version,
        alias=ref.alias,
    )


MAX_HEADER_BYTES = 32 * 1024
"""Request headers (names and values) at most; more is 431."""


class SizeLimits:
    """ASGI middleware: 431 for headers over MAX_HEADER_BYTES; read the whole request body up to
    LIMIT bytes, 413 beyond; 400 for a body that is not UTF-8 (Python's JSON parser would let
    encoded surrogates through as text); then replay it to the app (so no route parses an
    oversized or undecodable body)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header_bytes = sum(len(k) + len(v) for k, v in scope.get("headers", []))
        if header_bytes > MAX_HEADER_BYTES:
            too_long = f"the request headers are over {MAX_HEADER_BYTES} bytes"
            await error_response(OpenAIError(431, too_long))(scope, receive, send)
            return
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        too_big = OpenAIError(413, f"the request body is over {self.limit} bytes", param=None)
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                await error_response(too_big)(scope, receive, send)
                return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await error_response(too_big)(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as exc:
            bad = OpenAIError(400, f"the request body is not valid UTF-8 (byte {exc.start})")
            await error_response(bad)(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # http.disconnect, when the client goes away

        await self.app(scope, replay, send)


def render_metrics(state: ServerState) -> bytes:
    """Prometheus text, vLLM-style names: the engines' gauges and counters per model, and the
    billed requests, tokens, cost and latencies (`serve.metering`); no per-key labels."""
    registry = CollectorRegistry()
    gauges = {
        name: Gauge(f"lmforge:{name}", text, ["model_name"], registry=registry)
        for name, text in (
            ("num_requests_running", "Requests holding a KV cache slot"),
            ("num_requests_waiting", "Requests queued (preempted ones included)"),
            ("kv_cache_usage_tokens", "KV cache tokens held by running requests"),
        )
    }
    counters = {
        name: Counter(f"lmforge:{name}", text, ["model_name"], registry=registry)
        for name, text in (
            ("engine_generation_tokens", "Tokens generated by the engine"),
            ("engine_prompt_tokens", "Prompt tokens computed (recomputes included)"),
            ("num_preemptions", "Requests preempted because the KV cache was full"),
            ("engine_steps", "Engine steps run"),
        )
    }
    for name, served in list(state.models.items()):
        engine = served.engine.engine
        scheduler, stats = engine.scheduler, engine.stats
        gauges["num_requests_running"].labels(name).set(len(scheduler.running))
        gauges["num_requests_waiting"].labels(name).set(len(scheduler.waiting))
        gauges["kv_cache_usage_tokens"].labels(name).set(scheduler.cache_used)
        counters["engine_generation_tokens"].labels(name).inc(stats.generated_tokens)
        counters["engine_prompt_tokens"].labels(name).inc(stats.prompt_tokens)
        counters["num_preemptions"].labels(name).inc(stats.preemptions)
        counters["engine_steps"].labels(name).inc(stats.steps)
    text = generate_latest(registry)
    if state.metering_metrics is not None:
        text += generate_latest(state.metering_metrics.registry)
    return text


_SWEEP_S = 60.0


async def _sweep_reservations(state: ServerState) -> None:
    while True:
        try:
            await asyncio.to_thread(state.release_expired)
        except Exception:  # a busy database now is no reason to stop sweeping later
            log.exception("cannot release expired reservations")
        await asyncio.sleep(_SWEEP_S)


def create_app(settings: ServerSettings, *, state: ServerState | None = None) -> FastAPI:
    from fastapi import Depends

    from lmforge.serve import (
        admin_routes,
        catalog_routes,
        dashboard,
        moderation,
        openai_routes,
        task_routes,
    )
    from lmforge.serve.aliases import follow_aliases
    from lmforge.serve.auth import authenticate, require_admin
    from lmforge.serve.context import RequestContext
    from lmforge.serve.metering import metered

    state = state or ServerState(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loader = threading.Thread(target=state.load, name="model-loader", daemon=True)
        loader.start()
        sweeper = asyncio.ensure_future(_sweep_reservations(state))
        follower = asyncio.ensure_future(follow_aliases(state))
        try:
            yield
        finally:
            sweeper.cancel()
            follower.cancel()
            state.draining = True
            await asyncio.to_thread(loader.join)
            state.shutdown()

    app = FastAPI(title="lmforge", version="0.1.0", lifespan=lifespan)
    app.state.server = state
    app.state.moderation = moderation.ModerationService(state.registry)
    install_error_handlers(app)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if state.ready:
            return JSONResponse({"status": "ready", "models": state.names})
        if state.load_error:
            message = f"the models failed to load: {state.load_error}"
        elif state.draining:
            message = "the server is draining"
        else:
            message = "the models are loading"
        return error_response(OpenAIError(503, message, headers={"Retry-After": "1"}))

    @app.get("/metrics", dependencies=[Depends(require_admin)])
    async def metrics() -> Response:
        return Response(render_metrics(state), media_type=CONTENT_TYPE_LATEST)

    # Deny by default: every router below needs a key; /health and /ready above do not.
    app.include_router(openai_routes.router, dependencies=[Depends(authenticate)])
    app.include_router(admin_routes.router, dependencies=[Depends(require_admin)])
    app.include_router(catalog_routes.router, dependencies=[Depends(require_admin)])
    app.include_router(dashboard.router)  # static files only: its data comes from the above
    app.include_router(moderation.router, dependencies=[Depends(authenticate), Depends(metered)])
    app.include_router(task_routes.router, dependencies=[Depends(authenticate)])
    app.add_middleware(SizeLimits, limit=settings.max_body_bytes)
    app.add_middleware(RequestContext)  # outermost: 413s and 431s get a request id too
    return app


SETTINGS_ENV = "LMFORGE_SERVE_SETTINGS"
"""`lmforge serve --workers N` passes the settings to each uvicorn worker in this variable."""


def settings_to_env(settings: ServerSettings, threads: int | None) -> str:
    values = dataclasses.asdict(settings)
    values["home"] = None if settings.home is None else str(settings.home)
    return json.dumps({**values, "threads": threads})


def app_from_env() -> FastAPI:
    """The app of one uvicorn worker process (uvicorn's `factory=True`), from SETTINGS_ENV."""
    import sys

    import torch

    values = json.loads(os.environ[SETTINGS_ENV])
    threads = values.pop("threads", None)
    if threads:
        torch.set_num_threads(threads)
    sys.setswitchinterval(0.0005)  # see cli/serve.py
    home = values.pop("home", None)
    settings = ServerSettings(**values, home=None if home is None else Path(home))
    return create_app(settings)
