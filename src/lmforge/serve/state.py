"""What the routes share: the server's settings, the served models and `ServerState`.

`create_app` builds one `ServerState` (or takes one built by its caller) and the routes receive
it as the `deps.State` dependency; nothing here imports a route or the app. A language model is
a `ServedModel`, whose engine the routes see only as an `EngineClient` (`infer.engine`): its
`info` (vocabulary, context, queue), `generate`, `abort`, `embed`, `metrics`. A classification
or extractive QA model (a directory whose config.json has `lmforge_head`) is a `ServedHead`: no
engine, served by `/v1/classifications` or `/v1/answers` and refused, with the route to use, by
the generation routes.

`ServerState.load` (run by the app's lifespan in a background thread) turns each model spec
into a served model with its `loader`, `load_served` unless the caller gives another one (the
route tests give one that serves a fake engine).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, Request

from lmforge.errors import LmforgeError
from lmforge.registry.db import connect
from lmforge.registry.keys import release_expired
from lmforge.resolve import ModelRef, resolve
from lmforge.serve.errors import OpenAIError

if TYPE_CHECKING:
    from sqlalchemy import Engine as SqlEngine

    from lmforge.infer.engine import EngineClient
    from lmforge.model.heads import HeadModel
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
    kv_cache_memory: int | None = None
    """Bytes of each model's KV cache pool (None: enough for max_batch requests at
    max_model_len, at most half the machine's memory; see `infer.memory`)."""
    prefix_caching: bool = True
    """Share the KV cache blocks of equal prompt prefixes between requests."""
    device: str = "cpu"
    """cpu, cuda, cuda:N or auto."""

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise LmforgeError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        for name in ("max_batch", "max_queue", "max_batched_tokens", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise LmforgeError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise LmforgeError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.kv_cache_memory is not None and self.kv_cache_memory < 1:
            raise LmforgeError(f"kv_cache_memory must be >= 1 byte, got {self.kv_cache_memory}")


@dataclass
class ServedModel:
    """A language model: its tokenizer (text ↔ ids is the server's job) and its engine."""

    name: str
    tokenizer: Tokenizer
    engine: EngineClient
    stop_token_ids: list[int]
    created: int
    path: Path
    version: str  # "name@3" for a registry model, else "name@sha256:<12 hex of the weights>"
    alias: str | None = None  # served under this alias, which the server follows

    @property
    def max_model_len(self) -> int:
        """Tokens (prompt + output) one request may hold: the engine's limit."""
        return self.engine.info.max_model_len


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


Loader = Callable[[str | None, ServerSettings], "ServedModel | ServedHead"]
"""Turns a model spec into a served model (`load_served`; the route tests' loader serves a
fake engine)."""


class ServerState:
    """What the routes share: the loaded models, readiness and draining, the registry."""

    def __init__(self, settings: ServerSettings, *, loader: Loader | None = None) -> None:
        self.settings = settings
        self.loader: Loader = loader or load_served
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
                served = self.loader(spec or None, self.settings)
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
    from lmforge.model.formats import LSTM_ARCHITECTURE

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
    from lmforge.model.formats import WEIGHTS_FILE, file_sha256

    if ref.alias is not None:
        return ref.alias, ref.name
    name = ref.path.stem if ref.kind == "path" else ref.name.split("@")[0]
    if ref.kind == "registry" and ref.version is not None:
        return name, f"{name}@{ref.version}"
    weights = ref.path / WEIGHTS_FILE if ref.path.is_dir() else ref.path
    return name, f"{name}@sha256:{file_sha256(weights)[:12]}"


def load_served(spec: str | None, settings: ServerSettings) -> ServedModel | ServedHead:
    """Load model SPEC: a `ServedHead`, or a `ServedModel` with its own `AsyncEngine` (engine
    thread + KV cache) sized by SETTINGS."""
    import torch

    from lmforge.infer.engine import AsyncEngine, Engine, default_max_model_len
    from lmforge.infer.memory import format_size, kv_cache_tokens
    from lmforge.infer.scheduler import SchedulerConfig
    from lmforge.model.devices import resolve_device
    from lmforge.model.formats import head_of, load_head_model, load_model
    from lmforge.model.kv_cache import PagedKVCache
    from lmforge.model.transformer import Transformer, optimize_weight_layout

    ref = resolve(spec, home=settings.home)
    dtype = torch.bfloat16 if settings.dtype == "bfloat16" else torch.float32
    device = resolve_device(settings.device)
    if head_of(ref.path) is not None:
        head_model, tokenizer, _ = load_head_model(ref.path)
        head_model.to(device=device, dtype=dtype)
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
    if device.type == "cpu":
        optimize_weight_layout(model)  # CPU layouts (split small-batch matmuls)
    else:
        model.to(device)
    context = model.config.max_seq_len
    max_len = settings.max_model_len or default_max_model_len(model)
    if max_len > context:
        raise LmforgeError(f"max_model_len {max_len} exceeds {ref.name}'s context {context}")
    cache_dtype = model.model.embed_tokens.weight.dtype
    cache_tokens = kv_cache_tokens(
        model.config,
        cache_dtype,
        max_batch=settings.max_batch,
        max_model_len=max_len,
        budget=settings.kv_cache_memory,
        device=device,
    )
    name, version = _name_and_version(ref)
    config = SchedulerConfig(
        max_batch=settings.max_batch,
        max_model_len=max_len,
        max_batched_tokens=max(settings.max_batched_tokens, settings.max_batch),
        max_queue=settings.max_queue,
        cache_tokens=cache_tokens,
        prefix_caching=settings.prefix_caching,
        cache_salt=version,  # two models (or versions) never share cached blocks
    )
    log.info(
        "%s on %s: KV cache of %d tokens (%s, blocks of %d), prefix caching %s",
        name,
        device,
        cache_tokens,
        format_size(cache_tokens * PagedKVCache.bytes_per_token(model.config, cache_dtype)),
        config.block_size,
        "on" if settings.prefix_caching else "off",
    )
    return ServedModel(
        name=name,
        tokenizer=loaded.tokenizer,
        engine=AsyncEngine(Engine(model, config), name=f"engine-{name}"),
        stop_token_ids=loaded.stop_token_ids(),
        created=int(time.time()),
        path=ref.path,
        version=version,
        alias=ref.alias,
    )


async def server_state(http: Request) -> ServerState:
    """The app's `ServerState` (a FastAPI dependency: routes take it as `State`)."""
    state: ServerState = http.app.state.server
    return state


State = Annotated[ServerState, Depends(server_state)]
"""A route's view of the server: `def route(..., state: State)`."""
