"""`create_app(settings)`: the FastAPI application behind `lmforge serve`, and its lifespan.

The app wires what the other modules define: the shared `ServerState` (`state.py`, given to the
routes as the `State` dependency), the routers, the error handlers and the middleware
(`context.RequestContext` outermost, then `middleware.SizeLimits`: bodies are capped before any
parsing). It is the only module that imports the routers.

Startup returns at once and loads the models in a background thread, so `/health` answers
while they load and `/ready` says 503 until every model is loaded (and again while the
server drains on SIGTERM). The lifespan also sweeps expired reservations and follows served
aliases (`aliases.py`), and shuts the engines down at the end.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

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
from lmforge.serve.errors import OpenAIError, error_response, install_error_handlers
from lmforge.serve.metering import metered
from lmforge.serve.metrics import render_metrics
from lmforge.serve.middleware import SizeLimits
from lmforge.serve.state import ServerSettings, ServerState

log = logging.getLogger(__name__)

_SWEEP_S = 60.0


async def _sweep_reservations(state: ServerState) -> None:
    while True:
        try:
            await asyncio.to_thread(state.release_expired)
        except Exception:  # a busy database now is no reason to stop sweeping later
            log.exception("cannot release expired reservations")
        await asyncio.sleep(_SWEEP_S)


def create_app(settings: ServerSettings, *, state: ServerState | None = None) -> FastAPI:
    """The app serving SETTINGS' models; with STATE, that state (and its loader) instead of a
    new one: the route tests give one whose loader serves a fake engine."""
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
    app.state.server = state  # read by `state.server_state` only
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


def settings_from_env() -> ServerSettings:
    """One uvicorn worker process's settings, from SETTINGS_ENV (its torch threads set)."""
    import sys

    import torch

    values = json.loads(os.environ[SETTINGS_ENV])
    threads = values.pop("threads", None)
    if threads:
        torch.set_num_threads(threads)
    sys.setswitchinterval(0.0005)  # see cli/serve.py
    home = values.pop("home", None)
    return ServerSettings(**values, home=None if home is None else Path(home))


def app_from_env() -> FastAPI:
    """The app of one uvicorn worker process (uvicorn's `factory=True`), from SETTINGS_ENV."""
    return create_app(settings_from_env())
