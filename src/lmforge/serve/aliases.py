"""Hot swap: a server serving an alias follows it to the version it points at now.

Every `ServerSettings.alias_poll_s` seconds the server reads each served alias's target from the
registry. When it moved (`lmforge models promote` or `rollback`), the new version is loaded in a
worker thread while the old one keeps serving; then the alias's entry in `ServerState` is
replaced in one assignment. A request takes its model from that entry once, when it starts, so
requests in flight finish on the version they started on (and the ledger records that version),
and new ones go to the new version: no request is dropped or moved between versions. The old
version's engine is shut down once it has no request left. A version that fails to load is
logged and skipped until the alias moves again; the old version stays in service.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from lmforge.resolve import alias_target
from lmforge.serve.state import ServedHead, ServedModel, ServerState

log = logging.getLogger(__name__)

RETIRE_GRACE_S = 2.0
"""How long a replaced version waits before it starts watching for its last request: a request
that took it from `ServerState` just before the swap may still be in admission (a few database
calls), not yet in its engine."""
RETIRE_TIMEOUT_S = 3600.0
"""An old version is shut down after its last request, or after this long regardless."""


async def follow_aliases(state: ServerState) -> None:
    """Run until cancelled: swap in the version each served alias points at."""
    failed: dict[str, str] = {}  # alias → the target that would not load
    while True:
        await asyncio.sleep(state.settings.alias_poll_s)
        if not state.ready:
            continue
        served_now: list[ServedModel | ServedHead] = [*state.models.values(), *state.heads.values()]
        for served in served_now:
            if served.alias is None:
                continue
            try:
                await _follow(state, served, failed)
            except Exception:  # a busy database now is no reason to stop following later
                log.exception("cannot follow alias %s", served.alias)


async def _follow(
    state: ServerState, served: ServedModel | ServedHead, failed: dict[str, str]
) -> None:
    alias = served.alias
    assert alias is not None
    target = await asyncio.to_thread(alias_target, alias, state.settings.home)
    if target is None:
        return  # the alias is gone: keep serving what it pointed at
    spec = f"{target[0]}@{target[1]}"
    if spec == served.version or failed.get(alias) == spec:
        return
    log.info("alias %s moved: %s → %s; loading it", alias, served.version, spec)
    try:
        new = await asyncio.to_thread(state.loader, alias, state.settings)
    except Exception as exc:
        failed[alias] = spec
        log.error(
            "alias %s: cannot load %s (%s); still serving %s", alias, spec, exc, served.version
        )
        return
    failed.pop(alias, None)
    if isinstance(new, ServedHead) != isinstance(served, ServedHead):
        log.error("alias %s: %s is not the same kind of model; still serving %s", alias, spec,
                  served.version)  # fmt: skip
        _retire(new)
        return
    if isinstance(new, ServedHead):
        state.heads[alias] = new
    else:
        state.models[alias] = new
    log.info("alias %s now serves %s", alias, new.version)
    _retire(served)


def _retire(served: ServedModel | ServedHead) -> None:
    """Shut SERVED's engine down once its requests are done (in a thread of its own)."""
    if isinstance(served, ServedHead):
        return  # no engine: a head model runs in request threads
    engine = served.engine

    def wait_then_stop() -> None:
        time.sleep(RETIRE_GRACE_S)
        deadline = time.monotonic() + RETIRE_TIMEOUT_S
        while engine.num_requests and time.monotonic() < deadline:
            time.sleep(0.05)
        engine.shutdown()
        log.info("retired %s", served.version)

    threading.Thread(target=wait_then_stop, name=f"retire-{served.version}", daemon=True).start()
