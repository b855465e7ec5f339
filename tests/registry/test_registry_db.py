"""`lmforge.registry.db` and `migrations` against real SQLite files in a tmp dir."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, UniqueConstraint, inspect, text

import pgtest
from conftest import free_port
from lmforge.errors import LmforgeError
from lmforge.registry import db
from lmforge.registry.migrations import MIGRATIONS, Migration, applied_migrations, migrate
from lmforge.registry.tables import metadata


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = db.connect(home=tmp_path)  # make test-pg: PostgreSQL, by $LMFORGE_DB
    yield engine
    engine.dispose()


@pytest.mark.sqlite_only
def test_default_url_is_registry_db_under_lmforge_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path / "env-home"))
    db.connect().dispose()
    assert (tmp_path / "env-home" / "registry.db").is_file()

    db.connect(home=tmp_path / "a" / "b").dispose()  # creates missing parents
    assert (tmp_path / "a" / "b" / "registry.db").is_file()


@pytest.mark.sqlite_only
def test_every_connection_uses_wal_full_sync_foreign_keys_busy_timeout(engine: Engine) -> None:
    for _ in range(2):  # a fresh pooled connection as well as the one migrate used
        with engine.connect() as conn:
            pragma = {
                name: conn.exec_driver_sql(f"PRAGMA {name}").scalar()
                for name in ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")
            }
            assert pragma == {
                "journal_mode": "wal",
                "synchronous": 2,  # FULL
                "foreign_keys": 1,
                "busy_timeout": 5000,
            }
        engine.dispose()


@pytest.mark.sqlite_only  # PostgreSQL's default isolation (read committed) takes new snapshots
def test_transactions_cover_ddl_and_reads(engine: Engine) -> None:
    # pysqlite's legacy mode would autocommit the CREATE TABLE and not BEGIN before a SELECT.
    with pytest.raises(RuntimeError), engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE scratch (x INTEGER)")
        raise RuntimeError("roll back")
    assert "scratch" not in inspect(engine).get_table_names()

    with engine.connect() as reader:
        before = reader.exec_driver_sql("SELECT count(*) FROM models").scalar()
        with engine.begin() as writer:
            writer.exec_driver_sql(
                "INSERT INTO models (name, version, path, sha256, created_at)"
                " VALUES ('x', 1, '/m', 'sha', 'now')"
            )
        # Same transaction, same snapshot: the reader does not see the new row yet.
        assert reader.exec_driver_sql("SELECT count(*) FROM models").scalar() == before


def test_migrations_are_numbered_one_to_n() -> None:
    assert [m.number for m in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1))


def test_migrations_are_recorded_once_and_idempotent_on_reconnect(tmp_path: Path) -> None:
    url = pgtest.registry_url(tmp_path)
    first = db.connect(url)
    assert migrate(first) == []  # connect already applied everything
    first.dispose()
    second = db.connect(url)
    with second.connect() as conn:
        rows = conn.execute(text("SELECT number, name FROM schema_migrations")).all()
    assert rows == [(m.number, m.name) for m in MIGRATIONS]
    assert applied_migrations(second) == [m.number for m in MIGRATIONS]
    second.dispose()


def test_failed_migration_leaves_neither_tables_nor_record(engine: Engine) -> None:
    broken = Migration(99, "broken", ("CREATE TABLE half_done (x INTEGER)", "SELECT * FROM nope"))
    with pytest.raises(Exception, match="nope"):
        migrate(engine, [*MIGRATIONS, broken])
    assert "half_done" not in inspect(engine).get_table_names()
    assert 99 not in applied_migrations(engine)


def test_database_from_a_newer_lmforge_is_refused(tmp_path: Path) -> None:
    engine = db.connect(home=tmp_path)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO schema_migrations VALUES (999, 'future', 'x')"))
    engine.dispose()
    with pytest.raises(LmforgeError, match="999"):
        db.connect(home=tmp_path)


# PostgreSQL's spelling of the migrations' SQLite types (see `registry.dialects.ddl`).
_SAME_TYPE = {
    "BIGINT": "INTEGER",
    "DOUBLE PRECISION": "REAL",
    "DOUBLE": "REAL",
    'TEXT COLLATE "C"': "TEXT",
}


def test_tables_mirror_the_migrated_schema(engine: Engine) -> None:
    inspector = inspect(engine)
    assert set(inspector.get_table_names()) == set(metadata.tables)
    for table in metadata.tables.values():
        # SQLite reports an INTEGER PRIMARY KEY as nullable, so nullability of keys is skipped.
        keys = set(inspector.get_pk_constraint(table.name)["constrained_columns"])
        reflected = {
            c["name"]: (
                _SAME_TYPE.get(str(c["type"]), str(c["type"])),
                c["nullable"] or c["name"] in keys,
                c["name"] in keys,
            )
            for c in inspector.get_columns(table.name)
        }
        declared = {
            c.name: (
                _SAME_TYPE.get(c.type.compile(engine.dialect), c.type.compile(engine.dialect)),
                c.nullable or c.primary_key,
                c.primary_key,
            )
            for c in table.columns
        }
        assert reflected == declared, table.name
        unique = {tuple(u["column_names"]) for u in inspector.get_unique_constraints(table.name)}
        declared_unique = {
            tuple(c.name for c in constraint.columns)
            for constraint in table.constraints
            if isinstance(constraint, UniqueConstraint)
        }
        assert unique == declared_unique, table.name


@pytest.mark.sqlite_only
def test_garbage_file_is_refused_with_one_line_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    garbage = b"this is not a database\n" * 500
    path.write_bytes(garbage)
    with pytest.raises(LmforgeError) as raised:
        db.connect(home=tmp_path)
    message = str(raised.value)
    assert str(path) in message
    assert "\n" not in message
    assert path.read_bytes() == garbage  # refused without writing to it


def test_other_databases_are_refused_naming_the_supported_ones() -> None:
    with pytest.raises(LmforgeError, match=r"only sqlite:/// and postgresql:// URLs"):
        db.connect("mysql://user@localhost/registry")
    with pytest.raises(LmforgeError, match="not a database URL"):
        db.connect("::not a url::")


def test_an_unreachable_postgresql_is_one_line_without_the_password() -> None:
    port = free_port()
    with pytest.raises(LmforgeError) as raised:
        db.connect(f"postgresql://lmf:s3cret-pw@127.0.0.1:{port}/registry?connect_timeout=2")
    message = str(raised.value)
    assert "s3cret-pw" not in message and "***" in message
    assert f"127.0.0.1:{port}/registry" in message
    assert "\n" not in message


def test_lmforge_db_names_the_registry_for_every_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    monkeypatch.setenv("LMFORGE_DB", url)
    for home in (tmp_path / "a", tmp_path / "b"):
        engine = db.connect(home=home)
        assert engine.url.database == str(tmp_path / "shared.db")
        engine.dispose()
        assert not (home / "registry.db").exists()


@pytest.mark.sqlite_only
def test_read_existing_never_creates_a_registry(tmp_path: Path) -> None:
    from lmforge.registry import repo
    from lmforge.registry.db import connect, read_existing

    with read_existing(home=tmp_path) as conn:
        assert conn is None
    assert not (tmp_path / "registry.db").exists()
    engine = connect(home=tmp_path)
    with engine.begin() as c:
        repo.register_model(c, name="m", path="/x", sha256="a" * 64)
    engine.dispose()
    with read_existing(home=tmp_path) as conn:
        assert conn is not None
        assert repo.model_names(conn) == ["m"]
