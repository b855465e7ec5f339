"""`SizeLimits`: the ASGI middleware that caps a request's headers (431) and body (413) and
refuses a body that is not UTF-8 (400), before any route parses it.

`create_app` installs it inside `context.RequestContext`, so these errors carry a request id.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmforge.serve.errors import OpenAIError, error_response

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
