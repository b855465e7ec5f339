"""Aliases (migration 5), `registry.aliases` and eval-gated promotion (`ops.promotion`) against
real SQLite files: the gate reads real eval rows, rollbacks walk back one promotion at a time,
and every change leaves its event and its audit entry."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from conftest import assert_one_line_error, lmforge_here
from lmforge.errors import LmforgeError
from lmforge.ops.promotion import parse_requirement, promote_model, rollback_alias
from lmforge.registry import aliases, db, repo
from lmforge.registry.audit import list_audit
from lmforge.registry.evals import record_eval
from lmforge.resolve import resolve


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture
def engine(lmforge_home: Path) -> Iterator[Engine]:
    engine = db.connect(home=lmforge_home)
    with engine.begin() as conn:
        for version in (1, 2, 3):
            path = lmforge_home / "models" / "shakes" / str(version)
            path.mkdir(parents=True)
            repo.register_model(conn, name="shakes", path=path, sha256=sha(f"w{version}"))
    yield engine
    engine.dispose()


def evaluate(
    engine: Engine, version: int, metrics: dict[str, Any], task: str = "perplexity"
) -> int:
    with engine.begin() as conn:
        rec = repo.get_model(conn, name="shakes", version=version)
        assert rec is not None
        return record_eval(
            conn, model=rec.ref, model_name="shakes", model_path=rec.path,
            weights_sha256=rec.sha256, task=task, data_path="/data/held-out.txt",
            data_sha256=sha("held-out"), examples=1, metrics=metrics, seconds=0.1,
        )  # fmt: skip


def target(engine: Engine, name: str = "prod") -> str | None:
    with engine.connect() as conn:
        found = aliases.get_alias(conn, name=name)
    return None if found is None else found.target


def test_promotion_passes_only_on_recorded_evals_of_that_version(engine: Engine) -> None:
    evaluate(engine, 1, {"perplexity": 14.0})
    evaluate(engine, 2, {"perplexity": 11.0, "accuracy": 0.9}, task="classify")
    with pytest.raises(LmforgeError, match=r"shakes@3 not promoted to prod: perplexity<12 fails"):
        promote_model(engine, actor="t", spec="shakes", alias="prod", requires=["perplexity<12"])
    with pytest.raises(LmforgeError, match=re.escape("perplexity 14 on /data/held-out.txt")):
        promote_model(engine, actor="t", spec="shakes@1", alias="prod", requires=["perplexity<12"])
    assert target(engine) is None  # nothing was pointed anywhere

    alias, checks = promote_model(
        engine, actor="t", spec="shakes@2", alias="prod",
        requires=["perplexity<12", "accuracy>=0.85"],
    )  # fmt: skip
    assert alias.target == "shakes@2" and target(engine) == "shakes@2"
    assert [(c["require"], c["passed"], c["value"]) for c in checks] == [
        ("perplexity<12", True, 11.0), ("accuracy>=0.85", True, 0.9)
    ]  # fmt: skip
    # The newest eval of a version is the one that counts.
    evaluate(engine, 2, {"perplexity": 13.0})
    with pytest.raises(LmforgeError, match="perplexity 13"):
        promote_model(engine, actor="t", spec="shakes@2", alias="prod", requires=["perplexity<12"])
    with pytest.raises(LmforgeError, match=r"no recorded eval of shakes@3 has 'bleu'"):
        promote_model(engine, actor="t", spec="shakes@3", alias="x", requires=["bleu>1"])


def test_rollback_walks_back_one_promotion_at_a_time(engine: Engine) -> None:
    for version in (1, 2, 3):
        promote_model(engine, actor="alice", spec=f"shakes@{version}", alias="prod", requires=[])
    assert rollback_alias(engine, actor="bob", alias="prod").target == "shakes@2"
    assert rollback_alias(engine, actor="bob", alias="prod").target == "shakes@1"
    with pytest.raises(LmforgeError, match="nothing to roll back to: it points at shakes@1"):
        rollback_alias(engine, actor="bob", alias="prod")
    promote_model(engine, actor="alice", spec="shakes@3", alias="prod", requires=[])
    assert rollback_alias(engine, actor="bob", alias="prod").target == "shakes@1"
    with engine.connect() as conn:
        events = aliases.alias_history(conn, name="prod")
        audit = list_audit(conn)
    assert [(e.action, e.from_target, e.to_target, e.undone) for e in reversed(events)] == [
        ("promote", None, "shakes@1", False),
        ("promote", "shakes@1", "shakes@2", True),
        ("promote", "shakes@2", "shakes@3", True),
        ("rollback", "shakes@3", "shakes@2", False),
        ("rollback", "shakes@2", "shakes@1", False),
        ("promote", "shakes@1", "shakes@3", True),
        ("rollback", "shakes@3", "shakes@1", False),
    ]
    entries = [(a.actor, a.action, a.target) for a in audit if a.action.startswith("alias.")]
    assert len(entries) == 7 and entries.count(("bob", "alias.rollback", "prod")) == 3


def test_resolve_follows_the_alias(engine: Engine, lmforge_home: Path) -> None:
    promote_model(engine, actor="t", spec="shakes@2", alias="prod", requires=[])
    ref = resolve("prod", home=lmforge_home)
    assert (ref.name, ref.version, ref.alias, ref.path.name) == ("shakes@2", 2, "prod", "2")
    assert resolve("shakes", home=lmforge_home).alias is None  # a model name stays a model


@pytest.mark.parametrize(
    ("text", "needle"),
    [("perplexity", "want METRIC OP NUMBER"), ("ppl < abc", "'abc' is not a number"),
     ("ppl<nan", "finite"), ("ppl => 3", "want METRIC OP NUMBER")],
)  # fmt: skip
def test_bad_requirements(text: str, needle: str) -> None:
    with pytest.raises(LmforgeError, match=needle):
        parse_requirement(text)


def test_cli_promote_rollback_and_their_errors(
    engine: Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    evaluate(engine, 3, {"perplexity": 9.5})
    ok = lmforge_here(capsys, "models", "promote", "shakes", "--alias", "prod", "--require",
                      "perplexity<=10")  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "perplexity<=10: perplexity 9.5" in ok.stdout and "prod → shakes@3" in ok.stdout
    listed = lmforge_here(capsys, "models", "aliases")
    assert "prod" in listed.stdout and "shakes@3" in listed.stdout
    for args, needle in [
        (("models", "promote", "shakes", "--alias", "p2", "--require", "perplexity<9"),
         "perplexity<9 fails: perplexity 9.5"),
        (("models", "promote", "nope", "--alias", "p2"), "no registry model 'nope'"),
        (("models", "promote", "shakes@9", "--alias", "p2"), "no registry model 'shakes@9'"),
        (("models", "promote", "shakes", "--alias", "shakes"), "is a model's name"),
        (("models", "promote", "shakes", "--alias", "../up"), "invalid alias name"),
        (("models", "rollback", "prod"), "nothing to roll back to"),
        (("models", "rollback", "ghost"), "no alias named 'ghost'"),
        (("models", "aliases", "ghost"), "no alias named 'ghost'"),
    ]:  # fmt: skip
        assert_one_line_error(lmforge_here(capsys, *args), needle)
    assert target(engine) == "shakes@3" and target(engine, "p2") is None


def test_a_model_cannot_be_registered_under_an_alias_name(engine: Engine) -> None:
    # Regression: registering a model named like an alias silently hid the alias from resolve.
    with engine.begin() as conn:
        aliases.promote(conn, name="prod", model="shakes", version=2, actor="test")
    refused = pytest.raises(LmforgeError, match=r"'prod' is an alias \(of shakes@2\)")
    with refused, engine.begin() as conn:
        repo.register_model(conn, name="prod", path="/m", sha256=sha("other"))
    with engine.connect() as conn:
        assert repo.get_model(conn, name="prod") is None
    assert target(engine) == "shakes@2"


def test_unknown_names_suggest_close_aliases(engine: Engine) -> None:
    from lmforge.errors import ModelNotFoundError

    with engine.begin() as conn:
        aliases.promote(conn, name="production", model="shakes", version=1, actor="test")
    with pytest.raises(ModelNotFoundError, match="did you mean production"):
        resolve("productoin")
