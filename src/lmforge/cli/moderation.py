"""`lmforge moderation rules | policy`: the server's moderation rules and who they apply to.

Every change to the rules writes a new ruleset version (the running server picks it up on its
next request) and every change is recorded in the audit log as `cli:<os user>`.
"""

from __future__ import annotations

import getpass
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from lmforge.cli.console import stdout_console
from lmforge.errors import LmforgeError

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from lmforge.registry.moderation import Ruleset

out = stdout_console()


def _typer(help: str) -> typer.Typer:
    return typer.Typer(
        help=help,
        no_args_is_help=True,
        rich_markup_mode="rich",
        context_settings={"help_option_names": ["-h", "--help"]},
    )


app = _typer("Moderation rules and policies of the OpenAI-compatible server.")
rules_app = _typer("List, add, remove and try out moderation rules.")
policy_app = _typer("Say what moderation does per API key, model or by default.")
app.add_typer(rules_app, name="rules")
app.add_typer(policy_app, name="policy")


def _actor() -> str:
    return f"cli:{getpass.getuser()}"


@contextmanager
def _registry() -> Iterator[Engine]:
    from lmforge.registry.db import connect

    engine = connect()
    try:
        yield engine
    finally:
        engine.dispose()


def _print_ruleset(ruleset: Ruleset, *, as_json: bool) -> None:
    if as_json:
        for rule in ruleset.rules:
            print(json.dumps(asdict(rule)))
        return
    table = Table(title=f"moderation rules, version {ruleset.version}", title_justify="left")
    for col in ("id", "category", "kind"):
        table.add_column(col, no_wrap=True)
    table.add_column("pattern", overflow="fold")
    table.add_column("added", no_wrap=True)
    for rule in ruleset.rules:
        table.add_row(
            str(rule.id), rule.category, rule.kind, escape(rule.pattern), rule.created_at[:19]
        )
    out.print(table)


# -- rules -------------------------------------------------------------------------------------


@rules_app.command(
    "list",
    epilog="[bold]Examples[/bold]\n\n  lmforge moderation rules list\n\n"
    "  lmforge moderation rules list --json\n\n  lmforge moderation rules list --version 3",
)
def rules_list(
    version: Annotated[
        int | None, typer.Option("--version", help="An older ruleset version (default: newest).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON line per rule.")] = False,
) -> None:
    """List the rules of the newest ruleset (or of ruleset VERSION)."""
    from lmforge.registry.moderation import current_ruleset, get_ruleset

    with _registry() as engine, engine.connect() as conn:
        ruleset = current_ruleset(conn) if version is None else get_ruleset(conn, version=version)
    if ruleset is None:
        raise LmforgeError(f"no moderation ruleset version {version}")
    _print_ruleset(ruleset, as_json=as_json)


@rules_app.command(
    "add",
    epilog="[bold]Examples[/bold]\n\n"
    "  lmforge moderation rules add --category hate --word 'slur'\n\n"
    "  lmforge moderation rules add --category illicit --regex 'buy\\s+(cheap\\s+)?meds'\n\n"
    "  lmforge moderation rules add --category spam --word '免费领取'",
)
def rules_add(
    category: Annotated[
        str,
        typer.Option("--category", help="hate, violence/graphic, … or your own (a-z 0-9 _ / -)."),
    ],
    word: Annotated[
        str | None,
        typer.Option("--word", help="A word or phrase, matched whole and case-insensitively."),
    ] = None,
    regex: Annotated[
        str | None,
        typer.Option("--regex", help="A Python regular expression, matched case-insensitively."),
    ] = None,
) -> None:
    """Add a rule; this writes the next ruleset version."""
    from lmforge.registry.moderation import add_rule

    if (word is None) == (regex is None):
        raise LmforgeError("give exactly one of --word or --regex")
    kind, pattern = ("word", word) if word is not None else ("regex", regex)
    assert pattern is not None
    with _registry() as engine, engine.begin() as conn:
        ruleset = add_rule(conn, category=category, kind=kind, pattern=pattern, actor=_actor())
    rule = ruleset.rules[-1]
    out.print(
        f"added rule {rule.id}: {rule.category} {rule.kind} '{escape(rule.pattern)}' "
        f"→ ruleset version {ruleset.version}"
    )


@rules_app.command(
    "remove",
    epilog="[bold]Examples[/bold]\n\n  lmforge moderation rules remove 12",
)
def rules_remove(
    rule_id: Annotated[
        int, typer.Argument(metavar="ID", help="The rule's id, as `rules list` shows it.")
    ],
) -> None:
    """Remove a rule of the newest ruleset; this writes the next ruleset version."""
    from lmforge.registry.moderation import remove_rule

    with _registry() as engine, engine.begin() as conn:
        ruleset = remove_rule(conn, rule_id=rule_id, actor=_actor())
    out.print(f"removed rule {rule_id} → ruleset version {ruleset.version}")


@rules_app.command(
    "test",
    epilog="[bold]Examples[/bold]\n\n"
    "  lmforge moderation rules test 'mail me at bob@example.com'\n\n"
    "  lmforge moderation rules test 'some text' --json",
)
def rules_test(
    text: Annotated[str, typer.Argument(help="The text to check.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Check TEXT against the newest rules and the PII rules; print the verdict per category."""
    from lmforge.registry.moderation import current_ruleset
    from lmforge.serve.moderation import Moderator

    with _registry() as engine, engine.connect() as conn:
        moderator = Moderator.from_ruleset(current_ruleset(conn))
    result = moderator.check(text)
    if as_json:
        info: dict[str, Any] = {
            "model": moderator.ruleset_id,
            "flagged": result.flagged,
            "categories": result.categories,
            "matched": [list(pair) for pair in result.matched],
        }
        print(json.dumps(info, ensure_ascii=False))
        return
    why: dict[str, list[str]] = {}
    for category, description in result.matched:
        why.setdefault(category, []).append(description)
    verdict = "[bold red]flagged[/bold red]" if result.flagged else "[green]not flagged[/green]"
    table = Table(title=f"{verdict} by {moderator.ruleset_id}", title_justify="left")
    table.add_column("category", no_wrap=True)
    table.add_column("flagged", no_wrap=True)
    table.add_column("matched", overflow="fold")
    for category, hit in result.categories.items():
        table.add_row(
            category,
            "[bold red]yes[/bold red]" if hit else "no",
            escape("; ".join(why.get(category, []))),
        )
    out.print(table)


# -- policies ----------------------------------------------------------------------------------


@policy_app.command(
    "list",
    epilog="[bold]Examples[/bold]\n\n  lmforge moderation policy list\n\n"
    "  lmforge moderation policy list --json",
)
def policy_list(
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON line per policy.")
    ] = False,
) -> None:
    """List the policies: per API key, per model and the default (a key's beats a model's)."""
    from lmforge.registry.moderation import list_policies

    with _registry() as engine, engine.connect() as conn:
        policies = list_policies(conn)
    if as_json:
        for policy in policies:
            print(json.dumps(asdict(policy)))
        return
    table = Table(title="moderation policies", title_justify="left")
    for col in ("scope", "input", "output", "updated"):
        table.add_column(col, no_wrap=col != "scope", overflow="fold")
    for policy in policies:
        table.add_row(
            escape(policy.scope), policy.input, policy.output, (policy.updated_at or "")[:19]
        )
    if not policies:
        table.caption = "no policies: moderation is off for every request"
    out.print(table)


@policy_app.command(
    "set",
    epilog="[bold]Examples[/bold]\n\n"
    "  lmforge moderation policy set --default --input flag --output off\n\n"
    "  lmforge moderation policy set --key team-a --input block --output block\n\n"
    "  lmforge moderation policy set --model smollm2-135m-instruct --input block --output flag",
)
def policy_set(
    input: Annotated[str, typer.Option("--input", help="On requests: off, flag or block.")],
    output: Annotated[str, typer.Option("--output", help="On answers: off, flag or block.")],
    key: Annotated[str | None, typer.Option("--key", help="For this API key (name).")] = None,
    model: Annotated[str | None, typer.Option("--model", help="For this model.")] = None,
    default: Annotated[bool, typer.Option("--default", help="For everything else.")] = False,
) -> None:
    """Set the policy of one scope: what moderation does to requests (input) and answers
    (output). flag checks and reports, block checks and refuses."""
    from lmforge.registry.moderation import set_policy

    scopes = [f"key:{key}"] if key is not None else []
    scopes += [f"model:{model}"] if model is not None else []
    scopes += ["default"] if default else []
    if len(scopes) != 1:
        raise LmforgeError("give exactly one of --key NAME, --model NAME or --default")
    with _registry() as engine, engine.begin() as conn:
        policy = set_policy(conn, scope=scopes[0], input=input, output=output, actor=_actor())
    out.print(f"{escape(policy.scope)}: input {policy.input}, output {policy.output}")
