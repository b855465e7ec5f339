"""Per-request context: the request id and the headers every response carries.

`RequestContext` is pure ASGI middleware (outermost): it gives each request an id
(`req-<32 hex>`, the ledger's and `lmforge lineage`'s key), stores it and an empty header list
in the request's state, and adds `x-request-id` plus whatever the request's handlers put in
`state.response_headers` (the `x-ratelimit-*` headers) to the response's start — errors,
streams and 429s included.
"""

from __future__ import annotations

import uuid

from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex}"


def request_id(http: Request) -> str:
    rid: str = http.state.request_id
    return rid


def add_headers(http: Request, headers: dict[str, str]) -> None:
    """Send HEADERS with this request's response (added when the response starts)."""
    http.state.response_headers.update(headers)


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
