"""Who is calling: API keys from the `Authorization: Bearer lmf-…` header.

Deny by default: every route but `/health` and `/ready` depends on `authenticate` (or
`require_admin`), which looks the key up by its prefix and compares hashes in constant time
(`registry.keys.find_key`) on every request — no cache, so a revoked key is refused on the very
next request, by every worker. 401 for a missing, unknown, revoked or expired key; 403 for a
non-admin key on an admin route; a key limited to some models sees the others as missing (404,
as OpenAI does), in `/v1/models` too.

`lmforge serve --no-auth` turns this off for local experiments (loopback only): requests are
then anonymous, unlimited, and still metered.
"""

from __future__ import annotations

from fastapi import Request

from lmforge.registry.keys import KeyRecord, find_key
from lmforge.serve.app import ServedModel, ServerState
from lmforge.serve.errors import OpenAIError

_BEARER = "bearer "


def _state(http: Request) -> ServerState:
    state: ServerState = http.app.state.server
    return state


def _unauthorized(message: str) -> OpenAIError:
    return OpenAIError(401, message, code="invalid_api_key", type_="invalid_request_error")


def authenticate(http: Request) -> KeyRecord | None:
    """The caller's key (a FastAPI dependency; sync, so it runs in the thread pool)."""
    state = _state(http)
    if not state.settings.auth:
        http.state.key = None
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
    http.state.key = key
    return key


def require_admin(http: Request) -> KeyRecord | None:
    """The caller's key, which must be an admin key (403 otherwise)."""
    key = authenticate(http)
    if key is not None and not key.admin:
        raise OpenAIError(403, "This route needs an admin key.", code="admin_key_required")
    return key


def current_key(http: Request) -> KeyRecord | None:
    """The key `authenticate` found for this request (None without auth)."""
    key: KeyRecord | None = getattr(http.state, "key", None)
    return key


def check_model_access(http: Request, name: str) -> None:
    """404, as if missing, unless the caller's key may use model NAME."""
    key = current_key(http)
    if key is not None and not key.allows(name):
        raise OpenAIError(
            404,
            f"The model {name!r} does not exist or you do not have access to it.",
            param="model",
            code="model_not_found",
        )


def allowed_model(http: Request, name: str) -> ServedModel:
    """The served model NAME if the caller's key may use it; 404 as if missing otherwise."""
    check_model_access(http, name)
    return _state(http).model(name)
