"""`lmforge lineage | economics`: where a request or a model came from, and what it costs.

Both read what the stages recorded (`ops.lineage`); `economics` also measures the serving
throughput with a short run of the inference engine unless `--tokens-per-second` is given.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table
from rich.tree import Tree

from lmforge.cli.console import stderr_console, stdout_console
from lmforge.home import lmforge_home

out = stdout_console()
err = stderr_console()

LINEAGE_EXAMPLES = """[bold]Examples[/bold]

  lmforge lineage req-5f0c9a3e8b7d4c2a9e1f0b3c4d5e6f70

  lmforge lineage words@2

  lmforge lineage smollm2-135m-instruct --json
"""

ECONOMICS_EXAMPLES = """[bold]Examples[/bold]

  lmforge economics words@2

  lmforge economics smollm2-135m-instruct --hourly-usd 0.40 --margin 0.6

  lmforge economics words --tokens-per-second 900 --chart words.png --json
"""


def register(app: typer.Typer) -> None:
    app.command("lineage", epilog=LINEAGE_EXAMPLES)(lineage_command)
    app.command("economics", epilog=ECONOMICS_EXAMPLES)(economics_command)


def lineage_command(
    ref: Annotated[
        str,
        typer.Argument(
            help="A request id (req-…) or a model: name, name@version, directory, built-in."
        ),
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Trace a served request or a model back to its training run, data set and source files."""
    from lmforge.ops.lineage import model_lineage, request_lineage

    with err.status(f"tracing {ref} …"):
        node = request_lineage(ref) if ref.startswith("req-") else model_lineage(ref)
    if as_json:
        print(json.dumps(node.to_dict(), indent=2))
        return
    out.print(lineage_tree(node))


def lineage_tree(node: Any) -> Tree:
    """A `LineageNode` as a rich tree (for `lmforge lineage` and the demo)."""
    tree = Tree(_node_text(node))
    _grow(tree, node)
    return tree


def _node_text(node: Any) -> str:
    text = f"[bold]{escape(node.kind)}[/bold] {escape(node.label)}"
    if node.missing is not None:
        text += f"  [red]missing: {escape(node.missing)}[/red]"
    for key, value in node.details.items():
        text += f"\n  [dim]{escape(key)}:[/dim] {escape(value)}"
    return text


def _grow(tree: Tree, node: Any) -> None:
    for child in node.children:
        _grow(tree.add(_node_text(child)), child)


def economics_command(
    model: Annotated[
        str,
        typer.Argument(
            help="Registry name or name@version, a model directory, or a built-in name."
        ),
    ],
    hourly_usd: Annotated[
        str, typer.Option("--hourly-usd", help="What the machine costs per hour, in USD.")
    ] = "0.10",
    margin: Annotated[
        float, typer.Option(help="Target gross margin in [0, 1) for the suggested price.")
    ] = 0.5,
    tokens_per_second: Annotated[
        float | None,
        typer.Option("--tokens-per-second", help="Serving throughput (default: measure it)."),
    ] = None,
    measure_seconds: Annotated[
        float, typer.Option("--measure-seconds", help="How long to measure the throughput.")
    ] = 10.0,
    chart: Annotated[
        Path | None,
        typer.Option(help="Where to write the chart (default $LMFORGE_HOME/reports/…png)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Training cost, serving cost per million tokens, the price for a margin, and the ledger."""
    from lmforge.ops.economics import economics, write_chart

    status = "measuring throughput" if tokens_per_second is None else "reading the ledger"
    with err.status(f"{model}: {status} …"):
        result = economics(
            model,
            hourly_usd=hourly_usd,
            margin=margin,
            tokens_per_second=tokens_per_second,
            measure_seconds=measure_seconds,
        )
    safe = re.sub(r"[^A-Za-z0-9._@-]+", "_", result.model).strip("_") or "model"
    target = chart or lmforge_home() / "reports" / f"economics-{safe}.png"
    write_chart(result, target)
    if as_json:
        print(json.dumps({**result.to_dict(), "chart": str(target)}, indent=2))
        return
    out.print(_table(result))
    out.print(f"chart: {escape(str(target))}")


def _table(r: Any) -> Table:
    from lmforge.ops.economics import economics_rows

    table = Table(title=f"{r.model} ({r.model_version})", title_justify="left", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for field_, value in economics_rows(r):
        table.add_row(field_, escape(value))
    return table
