"""Who is calling: API keys from the `Authorization: Bearer lmf-…` header, and `Caller`.

Deny by default: every route but `/health` and `/ready` depends on `authenticate` (or
`require_admin`), which looks the key up by its prefix and compares hashes in constant time
(`registry.keys.find_key`) on every request — no cache, so a revoked key is refused on the very
next request, by every worker. 401 for a missing, unknown, revoked or expired key; 403 for a
non-admin key on an admin route; a key limited to some models sees the others as missing (404,
as OpenAI does), in `/v1/models` too.

Routes take the caller as the `Call` dependency (`context.Caller`: the key, the request id, the
response's headers, whether the client is still there), which needs `authenticate`'s key, so a
route cannot forget to authenticate; FastAPI runs `authenticate` once per request however many
dependencies ask for it.

`lmforge serve --no-auth` turns this off for local experiments (loopback only): requests are
then anonymous, unlimited, and still metered.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from lmforge.registry.keys import KeyRecord, find_key
from lmforge.serve.context import Caller
from lmforge.serve.errors import OpenAIError
from lmforge.serve.state import ServedHead, ServedModel, ServerState, State

_BEARER = "bearer "


def _unauthorized(message: str) -> OpenAIError:
    return OpenAIError(401, message, code="invalid_api_key", type_="invalid_request_error")


def authenticate(http: Request, state: State) -> KeyRecord | None:
    """The caller's key (a FastAPI dependency; sync, so it runs in the thread pool)."""
    if not state.settings.auth:
        return None
    header = http.headers.get("authorization", "")
    if not header.lower().startswith(_BEARER) or not header[len(_BEARER) :].strip():
        raise _unauthorized(
            "You didn't provide an API key. Send it in the Authorization header: "
            "'Authorization: Bearer lmf-…' (create one with `lmforge keys create`)."
        )
    presented = header[len(_BEARER) :].strip()
    with state.registry.connect() as conn:
        key = find_key(conn, key=presented)
    if key is None:
        raise _unauthorized("Incorrect API key provided.")
    if key.revoked_at is not None:
        raise _unauthorized(f"The API key {key.prefix}… has been revoked.")
    if key.expired():
        raise _unauthorized(f"The API key {key.prefix}… expired at {key.expires_at}.")
    return key


Key = Annotated[KeyRecord | None, Depends(authenticate)]
"""The caller's key (None without auth)."""


def require_admin(key: Key) -> KeyRecord | None:
    """The caller's key, which must be an admin key (403 otherwise)."""
    if key is not None and not key.admin:
        raise OpenAIError(403, "This route needs an admin key.", code="admin_key_required")
    return key


async def caller(http: Request, key: Key) -> Caller:
    """What the code below the route needs of this request (a FastAPI dependency)."""
    return Caller(
        request_id=http.state.request_id,
        key=key,
        response_headers=http.state.response_headers,
        is_disconnected=http.is_disconnected,
    )


Call = Annotated[Caller, Depends(caller)]
"""A route's caller: `def route(..., caller: Call)`."""


def check_model_access(key: KeyRecord | None, name: str) -> None:
    """404, as if missing, unless KEY may use model NAME."""
    if key is not None and not key.allows(name):
        raise OpenAIError(
            404,
            f"The model {name!r} does not exist or you do not have access to it.",
            param="model",
            code="model_not_found",
        )


def allowed_model(state: ServerState, key: KeyRecord | None, name: str) -> ServedModel:
    """The served language model NAME if KEY may use it; 404 as if missing otherwise."""
    check_model_access(key, name)
    return state.model(name)


def allowed_served(
    state: ServerState, key: KeyRecord | None, name: str
) -> ServedModel | ServedHead:
    """The served model NAME, of either kind, if KEY may use it; 404 as if missing otherwise."""
    check_model_access(key, name)
    return state.lookup(name)
