"""`datasets` rows: one per name, replaced in one statement, listed by name."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from lmforge.errors import LmforgeError
from lmforge.registry import db
from lmforge.registry.repo import delete_dataset, get_dataset, list_datasets, put_dataset


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = db.connect(home=tmp_path)
    yield engine
    engine.dispose()


def put(engine: Engine, name: str, key: str, tokens: int = 100) -> None:
    with engine.begin() as conn:
        put_dataset(
            conn,
            name=name,
            path=f"/data/{name}",
            content_key=sha(key),
            manifest_sha256=sha(key + "m"),
            tokenizer="bpe",
            vocab_size=512,
            documents=3,
            tokens=tokens,
        )


def test_put_get_list_and_replace_keeps_one_row_per_name(engine: Engine) -> None:
    put(engine, "web", "a")
    put(engine, "books", "b")
    with engine.connect() as conn:
        first = get_dataset(conn, name="web")
    assert first is not None and first.content_key == sha("a") and first.path == Path("/data/web")
    put(engine, "web", "c", tokens=999)
    with engine.connect() as conn:
        again = get_dataset(conn, name="web")
        names = [r.name for r in list_datasets(conn)]
    assert again is not None
    assert (again.id, again.created_at) == (first.id, first.created_at)
    assert again.content_key == sha("c") and again.tokens == 999
    assert again.updated_at >= first.updated_at
    assert names == ["books", "web"]
    with engine.begin() as conn:
        assert delete_dataset(conn, name="web") is True
        assert delete_dataset(conn, name="web") is False
        assert get_dataset(conn, name="web") is None


def test_bad_names_and_keys_are_refused(engine: Engine) -> None:
    with pytest.raises(LmforgeError, match="invalid data set name"):
        put(engine, "../escape", "a")
    with engine.begin() as conn, pytest.raises(LmforgeError, match="content key"):
        put_dataset(
            conn,
            name="x",
            path="/x",
            content_key="nothex",
            manifest_sha256=sha("m"),
            tokenizer="bpe",
            vocab_size=1,
            documents=1,
            tokens=1,
        )
