"""`lmforge moderation rules | policy`, in process: real registry under the test's $LMFORGE_HOME,
exit codes, stdout, and one-line errors on bad input."""

from __future__ import annotations

import getpass
import json

import pytest

from lmforge.cli.main import main
from lmforge.registry import db
from lmforge.registry.audit import list_audit


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["moderation", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_add_list_remove_and_older_versions(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "rules", "add", "--category", "hate", "--word", "idiot")
    assert code == 0 and "ruleset version 1" in out
    code, out, _ = run(capsys, "rules", "add", "--category", "spam", "--regex", r"buy\s+now")
    assert code == 0 and "ruleset version 2" in out
    code, out, _ = run(capsys, "rules", "list", "--json")
    rules = json_lines(out)
    assert [(r["category"], r["kind"], r["pattern"], r["version"]) for r in rules] == [
        ("hate", "word", "idiot", 2),
        ("spam", "regex", r"buy\s+now", 2),
    ]
    code, out, _ = run(capsys, "rules", "remove", str(rules[0]["id"]))
    assert code == 0 and "ruleset version 3" in out
    _, out, _ = run(capsys, "rules", "list", "--json")
    assert [r["pattern"] for r in json_lines(out)] == [r"buy\s+now"]
    _, out, _ = run(capsys, "rules", "list", "--version", "1", "--json")
    assert [r["pattern"] for r in json_lines(out)] == ["idiot"]
    code, out, _ = run(capsys, "rules", "list")
    assert code == 0 and "version 3" in out and "spam" in out and "idiot" not in out


def test_rules_test_prints_the_verdict_per_category(capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "rules", "add", "--category", "harassment", "--word", "nincompoop")
    code, out, _ = run(capsys, "rules", "test", "You NINCOMPOOP, mail bob@example.com", "--json")
    assert code == 0
    verdict = json.loads(out)
    assert verdict["model"].startswith("lmforge-rules-1+pii-")
    assert verdict["flagged"] is True
    hits = {category for category, hit in verdict["categories"].items() if hit}
    assert hits == {"harassment", "pii", "pii/email"}
    assert ["harassment", "rule 1: word 'nincompoop'"] in verdict["matched"]
    code, out, _ = run(capsys, "rules", "test", "a perfectly nice sentence")
    assert code == 0 and "not flagged" in out and "harassment" in out and "yes" not in out
    code, out, _ = run(capsys, "rules", "test", "nincompoop")
    assert code == 0 and "flagged by lmforge-rules-1+pii-" in out and "yes" in out


def test_policy_set_and_list(capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run(capsys, "policy", "list")
    assert "moderation is off" in out
    code, _, _ = run(capsys, "policy", "set", "--default", "--input", "flag", "--output", "off")
    assert code == 0
    code, _, _ = run(
        capsys, "policy", "set", "--key", "team-a", "--input", "block", "--output", "block"
    )
    assert code == 0
    code, out, _ = run(
        capsys, "policy", "set", "--model", "tiny", "--input", "off", "--output", "flag"
    )
    assert code == 0 and "model:tiny: input off, output flag" in out
    _, out, _ = run(capsys, "policy", "list", "--json")
    assert [(p["scope"], p["input"], p["output"]) for p in json_lines(out)] == [
        ("default", "flag", "off"),
        ("key:team-a", "block", "block"),
        ("model:tiny", "off", "flag"),
    ]


def test_changes_are_audited_as_the_os_user(capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "rules", "add", "--category", "hate", "--word", "idiot")
    run(capsys, "policy", "set", "--default", "--input", "flag", "--output", "flag")
    engine = db.connect()
    try:
        with engine.connect() as conn:
            entries = list_audit(conn)
    finally:
        engine.dispose()
    actor = f"cli:{getpass.getuser()}"
    assert [(e.actor, e.action) for e in entries] == [
        (actor, "moderation.rule_add"),
        (actor, "policy.set"),
    ]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["rules", "add", "--category", "spam", "--regex", "(unclosed"], "invalid regex"),
        (["rules", "add", "--category", "Spam!", "--word", "x"], "invalid category"),
        (["rules", "add", "--category", "spam"], "exactly one of --word or --regex"),
        (["rules", "add", "--category", "spam", "--word", "a", "--regex", "b"], "exactly one"),
        (["rules", "remove", "42"], "no rule with id 42"),
        (["rules", "remove", "forty-two"], "integer"),
        (["rules", "list", "--version", "5"], "no moderation ruleset version 5"),
        (["policy", "set", "--default", "--input", "deny", "--output", "off"], "got 'deny'"),
        (["policy", "set", "--input", "flag", "--output", "off"], "exactly one of --key"),
        (["policy", "set", "--default", "--key", "k", "--input", "off", "--output", "off"], "one"),
        (["policy", "set", "--default", "--output", "off"], "--input"),
    ],
)
def test_bad_input_is_one_line_error(
    capsys: pytest.CaptureFixture[str], args: list[str], needle: str
) -> None:
    code, _, err = run(capsys, *args)
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "command",
    [
        ["rules", "list"],
        ["rules", "add"],
        ["rules", "remove"],
        ["rules", "test"],
        ["policy", "list"],
        ["policy", "set"],
    ],
)
def test_every_command_has_help_with_examples(
    capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    code, out, _ = run(capsys, *command, "--help")
    assert code == 0
    assert "Examples" in out and f"lmforge moderation {' '.join(command)}" in out
