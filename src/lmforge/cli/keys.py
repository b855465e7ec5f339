"""`lmforge keys create | list | show | update | revoke`: API keys for `lmforge serve`.

A key is printed once, by `create`, and never stored: the registry keeps its sha256 and prefix.
Every change is written with its audit entry (actor `cli:<user>`); the server sees it on the
next request.
"""

from __future__ import annotations

import getpass
import json
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from lmforge.cli.console import stderr_console, stdout_console
from lmforge.errors import LmforgeError

out = stdout_console()
err = stderr_console()

app = typer.Typer(
    help="Create, list, change and revoke API keys.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def actor() -> str:
    """Who the audit log says did it: the OS user running the command."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli:unknown"


def _engine() -> Any:
    from lmforge.registry.db import connect

    return connect()


def _print_view(view: dict[str, Any], as_json: bool) -> None:
    if as_json:
        out.print_json(json.dumps(view))
        return
    table = Table(show_header=False, box=None)
    for field, value in view.items():
        table.add_row(f"[bold]{field}[/bold]", escape("-" if value is None else str(value)))
    out.print(table)


Models = Annotated[
    str | None,
    typer.Option(help="Comma-separated models the key may use (default: every model)."),
]
Budget = Annotated[str | None, typer.Option(help="Budget in USD, e.g. 20 or 0.50.")]
Period = Annotated[str, typer.Option("--budget-period", help="month or total.")]
Expires = Annotated[str | None, typer.Option(help="Expiry date (UTC), e.g. 2026-12-31.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON.")]


@app.command(
    "create",
    epilog="[bold]Examples[/bold]\n\n"
    "  lmforge keys create --name alice\n\n"
    "  lmforge keys create --name app --models shakes --rpm 60 --tpm 20000 --budget 5 "
    "--budget-period month\n\n"
    "  lmforge keys create --name ops --admin --expires 2026-12-31",
)
def create_command(
    name: Annotated[str, typer.Option(help="A unique name: a-z 0-9 . _ - (1-64).")],
    models: Models = None,
    rpm: Annotated[int | None, typer.Option(help="Requests per minute at most.")] = None,
    tpm: Annotated[
        int | None, typer.Option(help="Tokens (prompt + max_tokens) per minute at most.")
    ] = None,
    budget: Budget = None,
    budget_period: Period = "total",
    expires: Expires = None,
    admin: Annotated[bool, typer.Option("--admin", help="May call the admin routes.")] = False,
    as_json: AsJson = False,
) -> None:
    """Create a key and print it once (it is stored only as a hash)."""
    from lmforge.ops import accounts

    engine = _engine()
    try:
        record, key = accounts.create_key(
            engine,
            actor=actor(),
            name=name,
            models=models,
            rpm=rpm,
            tpm=tpm,
            budget=budget,
            budget_period=budget_period,
            expires=expires,
            admin=admin,
        )
    finally:
        engine.dispose()
    if as_json:
        out.print_json(json.dumps({**accounts.key_view(record), "key": key}))
        return
    err.print(f"created key {escape(name)}; it is shown only now, store it safely:")
    print(key)


@app.command(
    "list", epilog="[bold]Examples[/bold]\n\n  lmforge keys list\n\n  lmforge keys list --json"
)
def list_command(as_json: AsJson = False) -> None:
    """List keys (prefixes only) with their limits and spend."""
    from lmforge.ops.accounts import key_view
    from lmforge.registry.db import read_existing
    from lmforge.registry.keys import list_keys

    with read_existing() as conn:
        views = [key_view(r) for r in (list_keys(conn) if conn is not None else [])]
    if as_json:
        out.print_json(json.dumps(views))
        return
    if not views:
        err.print("no keys yet: lmforge keys create --name NAME")
        return
    table = Table("name", "key", "status", "admin", "models", "rpm", "tpm", "budget", "spent")
    for v in views:
        table.add_row(
            escape(v["name"]),
            escape(v["key"]),
            v["status"],
            "yes" if v["admin"] else "",
            escape(",".join(v["models"])) if v["models"] else "all",
            "-" if v["rpm"] is None else str(v["rpm"]),
            "-" if v["tpm"] is None else str(v["tpm"]),
            "-" if v["budget"] is None else f"{v['budget']}/{v['budget_period']}",
            v["spent"],
        )
    out.print(table)


def _get(name: str) -> Any:
    from lmforge.registry.db import read_existing
    from lmforge.registry.keys import get_key

    with read_existing() as conn:
        record = None if conn is None else get_key(conn, name=name)
    if record is None:
        raise LmforgeError(f"no key named {name!r} (see 'lmforge keys list')")
    return record


@app.command("show", epilog="[bold]Examples[/bold]\n\n  lmforge keys show alice --json")
def show_command(
    name: Annotated[str, typer.Argument(help="The key's name.")], as_json: AsJson = False
) -> None:
    """Show one key: limits, spend in the period, requests and tokens this minute."""
    from lmforge.ops.accounts import key_view

    _print_view(key_view(_get(name)), as_json)


def _optional_int(option: str, value: str | None) -> Any:
    from lmforge.ops.accounts import UNSET

    if value is None:
        return UNSET
    if value.lower() == "none":
        return None
    try:
        return int(value)
    except ValueError:
        raise LmforgeError(f"{option}: {value!r} is not an integer (or 'none')") from None


@app.command(
    "update",
    epilog="[bold]Examples[/bold]\n\n"
    "  lmforge keys update app --rpm 120 --budget 10\n\n"
    "  lmforge keys update app --tpm none          # remove the limit\n\n"
    "  lmforge keys update app --models all",
)
def update_command(
    name: Annotated[str, typer.Argument(help="The key's name.")],
    models: Annotated[str | None, typer.Option(help="Comma-separated models, or 'all'.")] = None,
    rpm: Annotated[str | None, typer.Option(help="Requests per minute, or 'none'.")] = None,
    tpm: Annotated[str | None, typer.Option(help="Tokens per minute, or 'none'.")] = None,
    budget: Annotated[str | None, typer.Option(help="Budget in USD, or 'none'.")] = None,
    budget_period: Annotated[
        str | None, typer.Option("--budget-period", help="month or total.")
    ] = None,
    expires: Annotated[str | None, typer.Option(help="Expiry date, or 'none'.")] = None,
    admin: Annotated[
        bool | None, typer.Option("--admin/--no-admin", help="Grant or withdraw admin.")
    ] = None,
    as_json: AsJson = False,
) -> None:
    """Change a key's models, limits, budget, expiry or admin right."""
    from lmforge.ops import accounts

    changes: dict[str, Any] = {
        "rpm": _optional_int("--rpm", rpm),
        "tpm": _optional_int("--tpm", tpm),
    }
    if models is not None:
        changes["models"] = None if models.strip().lower() == "all" else models
    if budget is not None:
        changes["budget"] = None if budget.lower() == "none" else budget
    if budget_period is not None:
        changes["budget_period"] = budget_period
    if expires is not None:
        changes["expires"] = None if expires.lower() == "none" else expires
    if admin is not None:
        changes["admin"] = admin
    changes = {k: v for k, v in changes.items() if v is not accounts.UNSET}
    _get(name)
    engine = _engine()
    try:
        record = accounts.update_key(engine, actor=actor(), name=name, **changes)
    finally:
        engine.dispose()
    _print_view(accounts.key_view(record), as_json)


@app.command("revoke", epilog="[bold]Examples[/bold]\n\n  lmforge keys revoke alice")
def revoke_command(name: Annotated[str, typer.Argument(help="The key's name.")]) -> None:
    """Revoke a key: the server refuses it from the next request on (its usage stays)."""
    from lmforge.ops import accounts

    _get(name)
    engine = _engine()
    try:
        accounts.revoke_key(engine, actor=actor(), name=name)
    finally:
        engine.dispose()
    err.print(f"revoked key {escape(name)}")
