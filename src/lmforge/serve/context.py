"""Per-request context: the request id, the headers every response carries, and `Caller`.

`RequestContext` is pure ASGI middleware (outermost): it gives each request an id
(`req-<32 hex>`, the ledger's and `lmforge lineage`'s key), stores it and an empty header dict
in the request's state, and adds `x-request-id` plus whatever the request's handlers put in
that dict (the `x-ratelimit-*` headers) to the response's start — errors, streams and 429s
included.

`Caller` is what the code below a route needs of its HTTP request (the route gets it as the
`deps.Call` dependency): the request id, the caller's key, the response's extra headers and
whether the client is still there. The Starlette request itself stops at the route.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmforge.registry.keys import KeyRecord


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex}"


async def _still_here() -> bool:
    return False


@dataclass(frozen=True)
class Caller:
    """Who is calling, and how to reach the response (see the module doc)."""

    request_id: str
    key: KeyRecord | None  # None without auth (`--no-auth`)
    response_headers: dict[str, str]
    """Sent with the response (added by `RequestContext` when it starts)."""
    is_disconnected: Callable[[], Awaitable[bool]] = _still_here

    def add_headers(self, headers: dict[str, str]) -> None:
        """Send HEADERS with this request's response (unsent responses only)."""
        self.response_headers.update(headers)

    @property
    def actor(self) -> str:
        """Who the audit log says acted."""
        return "anonymous" if self.key is None else f"key:{self.key.name}"


class RequestContext:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = new_request_id()
        extra: dict[str, str] = {}
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        state["response_headers"] = extra

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", rid.encode()))
                headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in extra.items()]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
