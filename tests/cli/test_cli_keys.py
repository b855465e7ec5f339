"""`lmforge keys`, `models price`, `usage report` and `bill`, in-process over a real registry."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path

import pytest

import pgtest
from lmforge.cli.main import main
from lmforge.registry.db import connect
from lmforge.registry.ledger import record_usage


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(capsys: pytest.CaptureFixture[str], *argv: str, needle: str) -> None:
    code, _, err = run(capsys, *argv)
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1, (argv, err)
    assert lines[0].startswith("error: ") and needle in lines[0], (argv, err)
    assert "Traceback" not in err


def test_keys_lifecycle_prints_the_key_once_and_stores_only_its_hash(
    capsys: pytest.CaptureFixture[str], lmforge_home: Path
) -> None:
    code, out, err = run(
        capsys,
        "keys",
        "create",
        "--name",
        "app",
        "--rpm",
        "60",
        "--budget",
        "2.5",
        "--budget-period",
        "month",
        "--models",
        "a,b",
    )
    assert code == 0 and "shown only now" in err
    key = out.strip()
    assert key.startswith("lmf-") and len(key) == 47
    if pgtest.server_url() is None:
        raw = (lmforge_home / "registry.db").read_bytes()
        assert key.encode() not in raw
    stored = pgtest.query(lmforge_home, "SELECT key_hash, prefix FROM api_keys")
    assert stored == [(hashlib.sha256(key.encode()).hexdigest(), key[:12])]

    code, out, _ = run(capsys, "keys", "list")
    assert code == 0 and key not in out and "app" in out
    code, out, _ = run(capsys, "keys", "list", "--json")
    (listed,) = json.loads(out)
    assert key not in out and listed["key"] == key[:12] + "…"
    assert (listed["budget"], listed["budget_period"]) == ("$2.500000", "month")
    code, out, _ = run(capsys, "keys", "show", "app", "--json")
    view = json.loads(out)
    assert view["rpm"] == 60 and view["models"] == ["a", "b"] and view["status"] == "active"
    code, out, _ = run(
        capsys,
        "keys",
        "update",
        "app",
        "--rpm",
        "none",
        "--tpm",
        "500",
        "--models",
        "all",
        "--json",
    )
    view = json.loads(out)
    assert code == 0 and view["rpm"] is None and view["tpm"] == 500 and view["models"] is None
    assert run(capsys, "keys", "revoke", "app")[0] == 0
    assert json.loads(run(capsys, "keys", "show", "app", "--json")[1])["status"] == "revoked"
    actions = pgtest.query(lmforge_home, "SELECT action, target, actor FROM audit_log ORDER BY id")
    assert [a[:2] for a in actions] == [
        ("key.create", "app"),
        ("key.update", "app"),
        ("key.revoke", "app"),
    ]
    assert all(actor.startswith("cli:") for _, _, actor in actions)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["keys", "create", "--name", "Bad Name"], "invalid key name"),
        (["keys", "create", "--name", "k", "--budget", "abc"], "budget"),
        (["keys", "create", "--name", "k", "--budget", "-1"], "budget"),
        (["keys", "create", "--name", "k", "--budget", "0.0000000001"], "decimal places"),
        (["keys", "create", "--name", "k", "--budget-period", "weekly"], "budget period"),
        (["keys", "create", "--name", "k", "--expires", "2020-01-01"], "in the past"),
        (["keys", "create", "--name", "k", "--expires", "tomorrow"], "not a date"),
        (["keys", "create", "--name", "k", "--rpm", "-1"], "rpm"),
        (["keys", "create", "--name", "k", "--models", "../etc"], "invalid model name"),
        (["keys", "show", "nope"], "no key named"),
        (["keys", "revoke", "nope"], "no key named"),
        (["keys", "update", "nope", "--rpm", "3"], "no key named"),
        (["keys", "update", "dup", "--rpm", "three"], "not an integer"),
        (["keys", "update", "dup"], "nothing to update"),
        (["keys", "create", "--name", "dup"], "already exists"),
        (["usage", "report", "--group-by", "week"], "--group-by"),
        (["usage", "report", "--format", "xml"], "--format"),
        (["usage", "report", "--since", "last tuesday"], "not a date"),
        (["bill", "--period", "2026-13"], "period"),
        (["bill", "--period", "November"], "period"),
        (["bill", "--period", "2026-11", "--key", "nope"], "no key named"),
        (["models", "price", "no-such-model", "--input", "1", "--output", "2"], "no model"),
        (["models", "price", "dup", "--input", "1"], "both --input and --output"),
    ],
)
def test_bad_input_is_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], needle: str
) -> None:
    assert run(capsys, "keys", "create", "--name", "dup")[0] == 0
    one_line_error(capsys, *argv, needle=needle)


def test_revoking_twice_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "keys", "create", "--name", "twice")[0] == 0
    assert run(capsys, "keys", "revoke", "twice")[0] == 0
    one_line_error(capsys, "keys", "revoke", "twice", needle="revoked")


def _ledger_rows(home: Path) -> int:
    """Two keys' requests on two models; returns the ledger's total cost in nano-USD."""
    assert main(["keys", "create", "--name", "alice"]) == 0
    assert main(["keys", "create", "--name", "bob"]) == 0
    engine = connect(home=home)
    total = 0
    with engine.begin() as conn:
        ids = dict(conn.exec_driver_sql("SELECT name, id FROM api_keys").fetchall())
        for i in range(12):
            cost = 123_456_789 * (i + 1)  # nano-USD: 0.12…, 0.24…, …
            total += cost
            record_usage(
                conn,
                request_id=f"req-{i}",
                key_id=ids["alice" if i % 3 else "bob"],
                endpoint="/v1/completions",
                model="m1" if i % 2 else "m2",
                model_version="m1@1",
                prompt_tokens=10 + i,
                completion_tokens=i,
                ttft_ms=1.0,
                latency_ms=5.0,
                status="ok",
                http_status=200,
                cost_nusd=cost,
                price_input=1_000_000,
                price_output=2_000_000,
            )
    engine.dispose()
    return total


def test_usage_report_groups_and_formats_agree(
    capsys: pytest.CaptureFixture[str], lmforge_home: Path
) -> None:
    total = _ledger_rows(lmforge_home)
    capsys.readouterr()
    for group in ("key", "model", "day"):
        code, out, _ = run(capsys, "usage", "report", "--group-by", group, "--format", "json")
        rows = json.loads(out)
        assert code == 0 and sum(r["cost_nanousd"] for r in rows) == total
        assert sum(r["requests"] for r in rows) == 12
    rows = json.loads(run(capsys, "usage", "report", "--group-by", "key", "--format", "json")[1])
    assert {r["key"]: r["requests"] for r in rows} == {"alice": 8, "bob": 4}
    code, out, _ = run(capsys, "usage", "report", "--model", "m1", "--format", "csv")
    (row,) = list(csv.DictReader(io.StringIO(out)))
    assert row["requests"] == "6" and int(row["cost_nanousd"]) > 0
    code, out, _ = run(capsys, "usage", "report", "--since", "2999-01-01", "--format", "json")
    assert json.loads(out) == []
    assert run(capsys, "usage", "report")[0] == 0


def test_bill_totals_equal_the_ledger_to_the_cent(
    capsys: pytest.CaptureFixture[str], lmforge_home: Path, tmp_path: Path
) -> None:
    from datetime import UTC, datetime
    from decimal import ROUND_HALF_UP, Decimal

    total = _ledger_rows(lmforge_home)
    period = datetime.now(UTC).strftime("%Y-%m")
    code, out, err = run(capsys, "bill", "--period", period, "--out", str(tmp_path))
    assert code == 0, err
    invoice = json.loads((tmp_path / f"LMF-{period}.json").read_text())
    assert invoice["total_nanousd"] == total
    cents = (Decimal(total) / 10**9).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
    assert invoice["total"] == str(cents) and f"${cents}" in out
    assert {(line["key"], line["model"]) for line in invoice["lines"]} == {
        ("alice", "m1"),
        ("alice", "m2"),
        ("bob", "m1"),
        ("bob", "m2"),
    }
    page = (tmp_path / f"LMF-{period}.html").read_text()
    assert page.startswith("<!doctype html>") and f"${cents}" in page
    code, _, _ = run(capsys, "bill", "--period", period, "--key", "bob", "--out", str(tmp_path))
    bob = json.loads((tmp_path / f"LMF-{period}-bob.json").read_text())
    assert code == 0 and {line["key"] for line in bob["lines"]} == {"bob"}
    assert bob["total_nanousd"] == sum(123_456_789 * (i + 1) for i in range(0, 12, 3))
    # Another month has nothing.
    assert run(capsys, "bill", "--period", "2001-01", "--out", str(tmp_path))[0] == 0
    assert json.loads((tmp_path / "LMF-2001-01.json").read_text())["total_nanousd"] == 0


def test_models_price_sets_shows_and_audits(
    capsys: pytest.CaptureFixture[str], lmforge_home: Path
) -> None:
    code, out, err = run(
        capsys, "models", "price", "smollm2-135m-instruct", "--input", "0.15", "--output", "0.6"
    )
    assert code == 0, err
    assert "$0.15 per million input" in out and "$0.60 per million output" in out
    code, out, _ = run(capsys, "models", "price", "smollm2-135m-instruct")
    assert "$0.15" in out
    assert "smollm2-135m-instruct" in run(capsys, "models", "price", "--list")[1]
    assert pgtest.query(lmforge_home, "SELECT input_musd, output_musd FROM prices") == [
        (150_000, 600_000)
    ]
    ((details,),) = pgtest.query(
        lmforge_home, "SELECT details FROM audit_log WHERE action = 'price.set'"
    )
    assert json.loads(details) == {"input": "$0.15", "output": "$0.60"}
    one_line_error(
        capsys,
        "models",
        "price",
        "smollm2-135m-instruct",
        "--input",
        "-1",
        "--output",
        "1",
        needle="input price",
    )


def test_db_option_names_the_registry_and_bad_urls_are_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `--db` sets $LMFORGE_DB for the process; setenv (not delenv, which records nothing for
    # an unset variable) makes monkeypatch put the original back after the test.
    monkeypatch.setenv("LMFORGE_DB", "")
    shared = f"sqlite:///{tmp_path / 'shared.db'}"
    assert run(capsys, "--db", shared, "keys", "create", "--name", "there")[0] == 0
    monkeypatch.setenv("LMFORGE_DB", "")
    listed = json.loads(run(capsys, "--db", shared, "keys", "list", "--json")[1])
    assert [k["name"] for k in listed] == ["there"]
    assert (tmp_path / "shared.db").is_file()
    monkeypatch.setenv("LMFORGE_DB", "")
    one_line_error(capsys, "--db", "mysql://u@h/db", "keys", "list", needle="only sqlite")
    monkeypatch.setenv("LMFORGE_DB", "")
    code, _, err = run(
        capsys, "--db", "postgresql://u:s3cret@127.0.0.1:1/db?connect_timeout=2", "keys", "list"
    )
    assert code == 1 and err.count("\n") == 1 and "s3cret" not in err and "***" in err
