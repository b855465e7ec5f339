"""The registry: which artifacts exist, where they live, and where they came from.

SQLAlchemy Core over SQLite (WAL, one writer). `db.connect` opens the database and applies the
ordered, recorded `migrations`; `tables` mirrors the schema; `repo` holds every SQL query as a
keyword-only function returning frozen dataclasses. Torch-free; imports only `lmforge.errors`
and `lmforge.home` from lmforge.

    from lmforge.registry import connect, register_model, get_model

    engine = connect()  # sqlite:///$LMFORGE_HOME/registry.db
    with engine.begin() as conn:
        record = register_model(conn, name="tiny", path=model_dir, sha256=digest)
"""

from __future__ import annotations

from lmforge.registry.db import connect
from lmforge.registry.repo import (
    ModelRecord,
    get_model,
    list_models,
    list_versions,
    model_names,
    register_model,
)

__all__ = [
    "ModelRecord",
    "connect",
    "get_model",
    "list_models",
    "list_versions",
    "model_names",
    "register_model",
]
