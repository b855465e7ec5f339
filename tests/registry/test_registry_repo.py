"""`lmforge.registry.repo` against real SQLite files in a tmp dir, including two processes."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

import pgtest
from lmforge.errors import LmforgeError
from lmforge.registry import db
from lmforge.registry.repo import (
    get_model,
    list_models,
    list_versions,
    model_names,
    register_model,
)

SHA = hashlib.sha256(b"weights").hexdigest()


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = db.connect(home=tmp_path)
    yield engine
    engine.dispose()


def test_register_then_get_returns_the_same_record(engine: Engine, tmp_path: Path) -> None:
    with engine.begin() as conn:
        registered = register_model(
            conn,
            name="tiny-chat",
            path=tmp_path / "models" / "tiny-chat" / "1",
            sha256=SHA,
            parent="smollm2-135m-instruct",
            arch="LlamaForCausalLM",
            n_params=135_000_000,
            source="hf:HuggingFaceTB/SmolLM2-135M-Instruct",
        )
    assert registered.version == 1
    assert registered.ref == "tiny-chat@1"
    assert registered.created_at.endswith("Z")
    with engine.connect() as conn:  # a new connection: the record was committed
        assert get_model(conn, name="tiny-chat") == registered
        assert get_model(conn, name="tiny-chat", version=1) == registered
        assert get_model(conn, name="tiny-chat", version=2) is None
        assert get_model(conn, name="missing") is None
    assert registered.path == tmp_path / "models" / "tiny-chat" / "1"
    assert (registered.parent, registered.arch, registered.n_params) == (
        "smollm2-135m-instruct",
        "LlamaForCausalLM",
        135_000_000,
    )


def test_versions_increment_per_name_and_list_shows_the_latest(engine: Engine) -> None:
    with engine.begin() as conn:
        for name in ["zeta", "alpha", "zeta", "zeta", "alpha"]:
            register_model(conn, name=name, path=f"/m/{name}", sha256=SHA)
    with engine.connect() as conn:
        assert [r.version for r in list_versions(conn, name="zeta")] == [1, 2, 3]
        assert [r.version for r in list_versions(conn, name="alpha")] == [1, 2]
        assert list_versions(conn, name="missing") == []
        assert [(r.name, r.version) for r in list_models(conn)] == [("alpha", 2), ("zeta", 3)]
        assert get_model(conn, name="zeta") == get_model(conn, name="zeta", version=3)
        assert model_names(conn) == ["alpha", "zeta"]


def test_rolled_back_registration_leaves_no_record(engine: Engine) -> None:
    with pytest.raises(RuntimeError), engine.begin() as conn:
        register_model(conn, name="tiny", path="/m/tiny", sha256=SHA)
        raise RuntimeError("the copy of the weights failed")
    with engine.connect() as conn:
        assert model_names(conn) == []


@pytest.mark.parametrize(
    "name", ["a", "smollm2-135m-instruct", "tiny.v2_final-3", "0" * 64, "a..b"]
)
def test_valid_names_are_accepted(engine: Engine, name: str) -> None:
    with engine.begin() as conn:
        assert register_model(conn, name=name, path="/m", sha256=SHA).name == name


@pytest.mark.parametrize(
    "name",
    ["", "Tiny", "-x", ".x", "..", "a/b", "../etc", "a b", "a" * 65, "tiny\n", "café", "a\\b"],
)
def test_bad_names_are_rejected_naming_them(engine: Engine, name: str) -> None:
    with pytest.raises(LmforgeError) as raised, engine.begin() as conn:
        register_model(conn, name=name, path="/m", sha256=SHA)
    assert repr(name) in str(raised.value)
    with engine.connect() as conn:
        assert model_names(conn) == []


@pytest.mark.parametrize("sha256", ["", "abc", SHA.upper(), SHA + "0", "g" * 64])
def test_bad_sha256_is_rejected(engine: Engine, sha256: str) -> None:
    with pytest.raises(LmforgeError, match="sha256"), engine.begin() as conn:
        register_model(conn, name="tiny", path="/m", sha256=sha256)


_WORKER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from lmforge.registry.db import connect
    from lmforge.registry.repo import register_model

    url, go, worker = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    engine = connect(url)  # both workers migrate the same fresh file at once
    (go.parent / f"{worker}.ready").touch()
    while not go.exists():
        time.sleep(0.001)
    for i in range(20):
        with engine.begin() as conn:
            register_model(conn, name="shared", path=f"/m/{worker}/{i}", sha256="0" * 64,
                           source=worker)
    """
)


def test_two_processes_registering_one_name_get_versions_1_to_40(tmp_path: Path) -> None:
    url = pgtest.registry_url(tmp_path)
    go = tmp_path / "go"
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, url, str(go), f"worker{i}"],
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"worker{i}.ready").exists() for i in range(2)):
        assert time.monotonic() < deadline, "workers did not connect"
        for worker in workers:
            assert worker.poll() is None, worker.communicate()[1]
        time.sleep(0.01)
    go.touch()  # release both at once
    for worker in workers:
        _, stderr = worker.communicate(timeout=120)
        assert worker.returncode == 0, stderr

    engine = db.connect(url)
    with engine.connect() as conn:
        records = list_versions(conn, name="shared")
    engine.dispose()
    assert [r.version for r in records] == list(range(1, 41))
    for name in ("worker0", "worker1"):
        mine = [r for r in records if r.source == name]
        assert [r.path for r in mine] == [Path(f"/m/{name}/{i}") for i in range(20)]


@pytest.mark.sqlite_only
def test_many_connections_opening_a_fresh_file_at_once_all_succeed(tmp_path: Path) -> None:
    # Regression: switching a fresh file to WAL can fail with "database is locked" without
    # SQLite calling the busy handler; CI saw it with two processes. Threads race the same way.
    errors: list[BaseException] = []
    for round_ in range(60):
        url = f"sqlite:///{tmp_path / f'{round_}.db'}"
        barrier = threading.Barrier(8)

        def open_it(url: str = url, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            try:
                db.connect(url).dispose()
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=open_it) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors == []
