"""`lmforge usage report` and `lmforge bill`: what the ledger says was used and what it costs.

Both read the registry only (no torch). Times are UTC; `--since` / `--until` take a date
(`2026-11-01`) or an ISO time; `--until` is exclusive.
"""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from lmforge.cli.console import stderr_console, stdout_console
from lmforge.errors import LmforgeError

out = stdout_console()
err = stderr_console()

usage_app = typer.Typer(
    help="Usage from the ledger, by key, model or day.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)

_GROUPS = ("key", "model", "day")
_FORMATS = ("table", "csv", "json")


def parse_time(option: str, text: str | None) -> str | None:
    """`2026-11-01` or an ISO time → the ledger's stored form (UTC), for comparisons."""
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise LmforgeError(f"{option}: {text!r} is not a date like 2026-11-01") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@usage_app.command(
    "report",
    epilog="[bold]Examples[/bold]\n\n"
    "  lmforge usage report\n\n"
    "  lmforge usage report --group-by day --since 2026-11-01 --until 2026-12-01\n\n"
    "  lmforge usage report --key app --group-by model --format csv > usage.csv",
)
def report_command(
    key: Annotated[str | None, typer.Option(help="Only this key's requests.")] = None,
    model: Annotated[str | None, typer.Option(help="Only this model's requests.")] = None,
    since: Annotated[str | None, typer.Option(help="From this date or time (UTC).")] = None,
    until: Annotated[str | None, typer.Option(help="Before this date or time (UTC).")] = None,
    group_by: Annotated[str | None, typer.Option("--group-by", help="key, model or day.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="table, csv or json.")] = "table",
) -> None:
    """Requests, tokens and cost from the usage ledger, optionally grouped."""
    from lmforge.ops.pricing import format_usd
    from lmforge.registry.db import read_existing
    from lmforge.registry.ledger import usage_totals

    if group_by is not None and group_by not in _GROUPS:
        raise LmforgeError(f"--group-by must be one of {', '.join(_GROUPS)}, got {group_by!r}")
    if fmt not in _FORMATS:
        raise LmforgeError(f"--format must be one of {', '.join(_FORMATS)}, got {fmt!r}")
    start, end = parse_time("--since", since), parse_time("--until", until)
    with read_existing() as conn:
        groups = (
            []
            if conn is None
            else usage_totals(
                conn,
                group_by=group_by,  # type: ignore[arg-type]  # checked above
                key=key,
                model=model,
                since=start,
                until=end,
            )
        )
    rows: list[dict[str, Any]] = [
        {
            group_by or "scope": g.group,
            "requests": g.requests,
            "ok": g.ok,
            "prompt_tokens": g.prompt_tokens,
            "completion_tokens": g.completion_tokens,
            "cost_usd": format_usd(g.cost_nusd).removeprefix("$"),
            "cost_nanousd": g.cost_nusd,
        }
        for g in groups
    ]
    if fmt == "json":
        print(json.dumps(rows, indent=2))
    elif fmt == "csv":
        buffer = io.StringIO()
        fields = [group_by or "scope", "requests", "ok", "prompt_tokens", "completion_tokens"]
        fields += ["cost_usd", "cost_nanousd"]
        writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        print(buffer.getvalue(), end="")
    elif not rows:
        err.print("no usage in the ledger for this selection")
    else:
        table = Table(group_by or "scope", "requests", "ok", "prompt", "completion", "cost (USD)")
        for r in rows:
            table.add_row(
                escape(str(r[group_by or "scope"])),
                str(r["requests"]),
                str(r["ok"]),
                str(r["prompt_tokens"]),
                str(r["completion_tokens"]),
                r["cost_usd"],
            )
        out.print(table)


BILL_EXAMPLES = """[bold]Examples[/bold]

  lmforge bill --period 2026-11                 # every key, into $LMFORGE_HOME/invoices/

  lmforge bill --period 2026-11 --key app --out ./invoices
"""


def bill_command(
    period: Annotated[str, typer.Option(help="The month to bill, e.g. 2026-11 (UTC).")],
    key: Annotated[str | None, typer.Option(help="Bill only this key.")] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", help="Directory for the invoice (default $LMFORGE_HOME/invoices)."),
    ] = None,
) -> None:
    """Write the invoice for a month as JSON, Markdown and HTML; totals equal the ledger."""
    from lmforge.home import lmforge_home
    from lmforge.ops.billing import build_invoice, period_bounds, write_invoice
    from lmforge.ops.pricing import cents
    from lmforge.registry.db import read_existing
    from lmforge.registry.keys import get_key

    period_bounds(period)  # a bad period fails before anything is read
    with read_existing() as conn:
        if conn is None:
            raise LmforgeError("no registry yet: nothing has been served to bill")
        if key is not None and get_key(conn, name=key) is None:
            raise LmforgeError(f"no key named {key!r} (see 'lmforge keys list')")
        invoice = build_invoice(conn, period=period, key=key)
    paths = write_invoice(invoice, out_dir or lmforge_home() / "invoices")
    table = Table("key", "model", "requests", "prompt", "completion", "amount (USD)")
    for line in invoice.lines:
        table.add_row(
            escape(line.key),
            escape(line.model),
            str(line.requests),
            str(line.prompt_tokens),
            str(line.completion_tokens),
            f"{cents(line.cost_nusd)}",
        )
    out.print(table)
    out.print(f"[bold]total ${invoice.total}[/bold] ({invoice.total_nusd} nano-USD)")
    for path in paths:
        err.print(f"wrote {escape(str(path))}")


def register(app: typer.Typer) -> None:
    app.add_typer(usage_app, name="usage")
    app.command("bill", epilog=BILL_EXAMPLES)(bill_command)
