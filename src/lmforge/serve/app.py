"""`create_app(settings)`: the FastAPI application behind `lmforge serve`, and its lifespan.

Startup returns at once and loads the models in a background thread, so `/health` answers
while they load and `/ready` says 503 until every model is loaded (and again while the
server drains on SIGTERM). Each model gets its own `AsyncEngine` (engine thread + KV cache);
requests pick one by the `model` field. Request bodies are capped (413) before any parsing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmforge.errors import LmforgeError
from lmforge.infer.engine import AsyncEngine, Engine, default_max_model_len
from lmforge.infer.scheduler import SchedulerConfig
from lmforge.model.checkpoint import LSTM_ARCHITECTURE, load_model
from lmforge.model.transformer import Transformer, optimize_weight_layout
from lmforge.resolve import resolve
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


class ServerState:
    """What the routes share: the loaded models, readiness and draining."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.models: dict[str, ServedModel] = {}
        self.loaded = threading.Event()
        self.load_error: str | None = None
        self.on_load_error: Callable[[], None] | None = None  # e.g. stop the server
        self.draining = False

    @property
    def ready(self) -> bool:
        return self.loaded.is_set() and self.load_error is None and not self.draining

    def model(self, name: str) -> ServedModel:
        if not self.ready:
            raise OpenAIError(
                503,
                "the server is draining" if self.draining else "the model is still loading",
                headers={"Retry-After": "1"},
            )
        served = self.models.get(name)
        if served is None:
            known = ", ".join(sorted(self.models))
            raise OpenAIError(
                404,
                f"the model {name!r} does not exist; this server has: {known}",
                param="model",
                code="model_not_found",
            )
        return served

    def load(self) -> None:
        """Load every model (in a background thread); sets `loaded` when done or failed."""
        try:
            for spec in self.settings.models:
                served = load_served(spec or None, self.settings)
                if served.name in self.models:
                    raise LmforgeError(f"model {served.name!r} is given twice")
                self.models[served.name] = served
                log.info("serving %s (max_model_len %d)", served.name, served.max_model_len)
        except Exception as e:
            self.load_error = str(e)
            log.error("cannot load the models: %s", e)
            if self.on_load_error is not None:
                self.on_load_error()
        finally:
            self.loaded.set()

    def shutdown(self) -> None:
        for served in self.models.values():
            served.engine.shutdown()


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


def load_served(spec: str | None, settings: ServerSettings) -> ServedModel:
    import torch

    ref = resolve(spec, home=settings.home)
    dtype = torch.bfloat16 if settings.dtype == "bfloat16" else torch.float32
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
    # A directory or file given by path is served under its base name ("runs/x/model" → "model").
    name = ref.path.stem if ref.kind == "path" else ref.name
    engine = AsyncEngine(Engine(model, config), name=f"engine-{name}")
    return ServedModel(
        name=name,
        tokenizer=loaded.tokenizer,
        engine=engine,
        max_model_len=max_len,
        stop_token_ids=loaded.stop_token_ids(),
        created=int(time.time()),
        path=ref.path,
    )


MAX_HEADER_BYTES = 32 * 1024
"""Request headers (names and values) at most; more is 431."""


class SizeLimits:
    """ASGI middleware: 431 for headers over MAX_HEADER_BYTES; read the whole request body up to
    LIMIT bytes, 413 beyond, then replay it to the app (so no route parses an oversized body)."""

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
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # http.disconnect, when the client goes away

        await self.app(scope, replay, send)


def render_metrics(state: ServerState) -> bytes:
    """Prometheus text for the engines: requests running and waiting, tokens, preemptions."""
    registry = CollectorRegistry()
    gauges = {
        name: Gauge(f"lmforge_{name}", text, ["model"], registry=registry)
        for name, text in (
            ("requests_running", "Requests holding a KV cache slot"),
            ("requests_waiting", "Requests queued (preempted ones included)"),
            ("kv_cache_tokens", "KV cache tokens held by running requests"),
        )
    }
    counters = {
        name: Counter(f"lmforge_{name}", text, ["model"], registry=registry)
        for name, text in (
            ("generated_tokens", "Tokens generated"),
            ("prompt_tokens", "Prompt tokens computed (recomputes included)"),
            ("preemptions", "Requests preempted because the KV cache was full"),
            ("engine_steps", "Engine steps run"),
        )
    }
    for name, served in list(state.models.items()):
        engine = served.engine.engine
        scheduler, stats = engine.scheduler, engine.stats
        gauges["requests_running"].labels(name).set(len(scheduler.running))
        gauges["requests_waiting"].labels(name).set(len(scheduler.waiting))
        gauges["kv_cache_tokens"].labels(name).set(scheduler.cache_used)
        counters["generated_tokens"].labels(name).inc(stats.generated_tokens)
        counters["prompt_tokens"].labels(name).inc(stats.prompt_tokens)
        counters["preemptions"].labels(name).inc(stats.preemptions)
        counters["engine_steps"].labels(name).inc(stats.steps)
    return generate_latest(registry)


def create_app(settings: ServerSettings, *, state: ServerState | None = None) -> FastAPI:
    from lmforge.serve import openai_routes

    state = state or ServerState(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loader = threading.Thread(target=state.load, name="model-loader", daemon=True)
        loader.start()
        try:
            yield
        finally:
            state.draining = True
            await asyncio.to_thread(loader.join)
            state.shutdown()

    app = FastAPI(title="lmforge", version="0.1.0", lifespan=lifespan)
    app.state.server = state
    install_error_handlers(app)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if state.ready:
            return JSONResponse({"status": "ready", "models": sorted(state.models)})
        if state.load_error:
            message = f"the models failed to load: {state.load_error}"
        elif state.draining:
            message = "the server is draining"
        else:
            message = "the models are loading"
        return error_response(OpenAIError(503, message, headers={"Retry-After": "1"}))

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(render_metrics(state), media_type=CONTENT_TYPE_LATEST)

    app.include_router(openai_routes.router)
    app.add_middleware(SizeLimits, limit=settings.max_body_bytes)
    return app
