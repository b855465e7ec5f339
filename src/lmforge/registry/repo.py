"""All of the registry's SQL: keyword-only functions over a `Connection`, returning dataclasses.

Convention: every function takes a `sqlalchemy.Connection` and never commits; the caller owns
the transaction, so several calls can commit together:

    with engine.begin() as conn:   # writes: committed when the block exits
        record = register_model(conn, name="tiny", path=model_dir, sha256=digest)
    with engine.connect() as conn:  # reads
        latest = get_model(conn, name="tiny")

Transactions start with a deferred BEGIN (see `db`), so a write transaction should start with
its write; each write here is one statement that reads and writes atomically (no
read-modify-write in Python), which is what makes concurrent writers safe.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, func, insert, select

from lmforge.errors import LmforgeError
from lmforge.registry import dialects
from lmforge.registry.tables import aliases, datasets, models, utc_now

# Names become directory names: no slashes, no leading dot, so no "..".
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class ModelRecord:
    """One row of `models`: version VERSION of model NAME."""

    id: int
    name: str
    version: int  # 1, 2, … per name
    path: Path
    sha256: str  # of the model's weights file, lowercase hex
    parent: str | None  # free text: "smollm2-135m-instruct" or "name@3"
    arch: str | None
    n_params: int | None
    source: str | None  # where it was imported from
    created_at: str  # ISO-8601 UTC

    @property
    def ref(self) -> str:
        """`name@version`, the form `parent` uses to point at this exact version."""
        return f"{self.name}@{self.version}"


def validate_name(name: str, *, kind: str = "model") -> str:
    """Return NAME if it is a valid model (or data set) name, else raise `LmforgeError`."""
    if not NAME_PATTERN.fullmatch(name):
        raise LmforgeError(
            f"invalid {kind} name {name!r}: use 1-64 of a-z 0-9 . _ - starting with a-z or 0-9"
        )
    return name


def register_model(
    conn: Connection,
    *,
    name: str,
    path: Path | str,
    sha256: str,
    parent: str | None = None,
    arch: str | None = None,
    n_params: int | None = None,
    source: str | None = None,
) -> ModelRecord:
    """Record a new version of NAME (previous highest version + 1, or 1) and return it.

    The version is computed inside the INSERT itself, so two processes registering the same name
    at once get distinct consecutive versions (on PostgreSQL, which does not serialize the
    INSERT's read, after taking a lock on the name first).
    """
    validate_name(name)
    if not _SHA256_PATTERN.fullmatch(sha256):
        raise LmforgeError(f"invalid sha256 {sha256!r} for model {name!r}: want 64 hex digits")
    next_version = (
        select(func.coalesce(func.max(models.c.version), 0) + 1)
        .where(models.c.name == name)
        .scalar_subquery()
    )
    dialects.serialize(conn, f"model:{name}")
    statement = (
        insert(models)
        .values(
            name=name,
            version=next_version,
            path=str(path),
            sha256=sha256,
            parent=parent,
            arch=arch,
            n_params=n_params,
            source=source,
            created_at=utc_now(),
        )
        .returning(*models.c)
    )
    record = _record(conn.execute(statement).one()._mapping)
    # Checked after the write (SQLite: a transaction starts with its write), so this error
    # rolls the caller's transaction back: a model of that name would hide the alias.
    alias = conn.execute(select(aliases.c.model, aliases.c.version).where(aliases.c.name == name))
    if (target := alias.first()) is not None:
        raise LmforgeError(
            f"{name!r} is an alias (of {target.model}@{target.version}); "
            "register the model under a name of its own"
        )
    return record


def get_model(conn: Connection, *, name: str, version: int | None = None) -> ModelRecord | None:
    """Version VERSION of NAME (the latest when None), or None if there is no such model."""
    query = select(models).where(models.c.name == name)
    if version is None:
        query = query.order_by(models.c.version.desc()).limit(1)
    else:
        query = query.where(models.c.version == version)
    row = conn.execute(query).one_or_none()
    return None if row is None else _record(row._mapping)


def list_models(conn: Connection) -> list[ModelRecord]:
    """The latest version of every model, sorted by name."""
    latest = (
        select(models.c.name, func.max(models.c.version).label("version"))
        .group_by(models.c.name)
        .subquery()
    )
    query = (
        select(models)
        .join(latest, (models.c.name == latest.c.name) & (models.c.version == latest.c.version))
        .order_by(models.c.name)
    )
    return [_record(row._mapping) for row in conn.execute(query)]


def list_versions(conn: Connection, *, name: str) -> list[ModelRecord]:
    """Every version of NAME, oldest first (empty if there is no such model)."""
    query = select(models).where(models.c.name == name).order_by(models.c.version)
    return [_record(row._mapping) for row in conn.execute(query)]


def model_names(conn: Connection) -> list[str]:
    """The names of all registered models, sorted."""
    query = select(models.c.name).distinct().order_by(models.c.name)
    return list(conn.execute(query).scalars())


def _record(row: Any) -> ModelRecord:
    return ModelRecord(**{**row, "path": Path(row["path"])})


# -- data sets ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetRecord:
    """One row of `datasets`: the prepared data set NAME (one row per name)."""

    id: int
    name: str
    path: Path  # the data set directory, with manifest.json
    content_key: str  # sha256 of the inputs' hashes + options: the same key is the same data
    manifest_sha256: str
    tokenizer: str  # "bpe", "char", "byte" or the model/path it was taken from
    vocab_size: int
    documents: int  # kept, all splits
    tokens: int  # all splits
    created_at: str  # ISO-8601 UTC
    updated_at: str  # last (re)preparation


def put_dataset(
    conn: Connection,
    *,
    name: str,
    path: Path | str,
    content_key: str,
    manifest_sha256: str,
    tokenizer: str,
    vocab_size: int,
    documents: int,
    tokens: int,
) -> DatasetRecord:
    """Record data set NAME, replacing its previous row (one statement: insert or update)."""
    validate_name(name, kind="data set")
    for label, digest in (("content key", content_key), ("manifest sha256", manifest_sha256)):
        if not _SHA256_PATTERN.fullmatch(digest):
            raise LmforgeError(f"invalid {label} {digest!r} for data set {name!r}")
    now = utc_now()
    values = {
        "path": str(path),
        "content_key": content_key,
        "manifest_sha256": manifest_sha256,
        "tokenizer": tokenizer,
        "vocab_size": vocab_size,
        "documents": documents,
        "tokens": tokens,
        "updated_at": now,
    }
    statement = (
        dialects.insert(conn, datasets)
        .values(name=name, created_at=now, **values)
        .on_conflict_do_update(index_elements=[datasets.c.name], set_=values)
        .returning(*datasets.c)
    )
    return _dataset(conn.execute(statement).one()._mapping)


def get_dataset(conn: Connection, *, name: str) -> DatasetRecord | None:
    """Data set NAME, or None if there is none."""
    row = conn.execute(select(datasets).where(datasets.c.name == name)).one_or_none()
    return None if row is None else _dataset(row._mapping)


def list_datasets(conn: Connection) -> list[DatasetRecord]:
    """Every data set, sorted by name."""
    query = select(datasets).order_by(datasets.c.name)
    return [_dataset(row._mapping) for row in conn.execute(query)]


def delete_dataset(conn: Connection, *, name: str) -> bool:
    """Forget data set NAME (its files are the caller's); True if there was a row."""
    return bool(conn.execute(datasets.delete().where(datasets.c.name == name)).rowcount)


def _dataset(row: Any) -> DatasetRecord:
    return DatasetRecord(**{**row, "path": Path(row["path"])})
