"""`lmforge models list | show | import | merge | price | promote | rollback | aliases`: the
models lmforge knows, and the aliases (prod, staging) that point at exact versions.

`list` imports neither torch nor the built-in models' packages: it reads the registry and asks
`importlib` where the built-in files are (it never assembles a chunked one).
"""

from __future__ import annotations

import json
import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Column, Table

from lmforge.builtin import BUILTINS
from lmforge.cli.console import stderr_console, stdout_console
from lmforge.errors import LmforgeError
from lmforge.home import lmforge_home

out = stdout_console()
err = stderr_console()

app = typer.Typer(
    help="List, inspect and import models.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _registry_records() -> list[Any]:
    from lmforge.registry import repo
    from lmforge.registry.db import read_existing

    with read_existing() as conn:
        return repo.list_models(conn) if conn is not None else []


def _human_params(n: int | None) -> str:
    if not n:
        return "-"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


@app.command(
    "list",
    epilog="[bold]Examples[/bold]\n\n  lmforge models list\n\n  lmforge models list --json",
)
def list_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
) -> None:
    """List the built-in models and every model in the registry (latest versions)."""
    rows: list[dict[str, Any]] = []
    for spec in BUILTINS.values():
        path = spec.assembled_gguf(lmforge_home())
        missing = spec.unavailable()
        if missing is not None:
            where = f"({missing})"
        elif path is None:
            where = f"(assembled on first use from its {len(spec.chunks)} chunk packages)"
        else:
            where = str(path)
        rows.append(
            {
                "name": spec.name,
                "version": None,
                "kind": "built-in",
                "arch": spec.arch,
                "params": spec.n_params,
                "path": where,
                "created": None,
            }
        )
    for rec in _registry_records():
        rows.append(
            {
                "name": rec.name,
                "version": rec.version,
                "kind": "registry",
                "arch": rec.arch,
                "params": rec.n_params,
                "path": str(rec.path),
                "created": rec.created_at,
            }
        )
    if as_json:
        for row in rows:
            print(json.dumps(row))
        return
    table = Table(title="models", title_justify="left")
    for col in ("name", "version", "kind", "arch", "params"):
        table.add_column(col, no_wrap=True)
    table.add_column("path", overflow="fold")
    for row in rows:
        table.add_row(
            row["name"],
            str(row["version"] or "-"),
            row["kind"],
            row["arch"] or "-",
            _human_params(row["params"]),
            escape(row["path"]),
        )
    out.print(table)


def path_size(path: Path) -> int:
    """Bytes of a model file, or of the files in a model directory."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


@app.command(
    "show",
    epilog="[bold]Examples[/bold]\n\n  lmforge models show smollm2-135m-instruct\n\n"
    "  lmforge models show my-model@2 --json",
)
def show_command(
    name: Annotated[str, typer.Argument(help="Registry name\\[@version], built-in, dir or .gguf.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Show a model's location, architecture, size and lineage."""
    from lmforge.resolve import resolve

    with err.status(f"resolving {name} …"):
        ref = resolve(name)
    info: dict[str, Any] = {"name": ref.name, "kind": ref.kind, "path": str(ref.path)}
    if ref.version is not None:
        info["version"] = ref.version
    info["size_bytes"] = path_size(ref.path)
    if ref.path.is_dir():
        for fname, key in (("config.json", "config"), ("lmforge.json", "lineage")):
            f = ref.path / fname
            if f.is_file():
                try:
                    info[key] = json.loads(f.read_text(encoding="utf-8"))
                except (OSError, ValueError) as exc:
                    raise LmforgeError(f"cannot read {f}: {exc}") from None
    if as_json:
        print(json.dumps(info, indent=2, default=str))
        return
    table = Table(show_header=False, title=ref.name, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    table.add_row("kind", ref.kind)
    table.add_row("path", escape(str(ref.path)))
    table.add_row("size", f"{info['size_bytes'] / 1e6:.1f} MB")
    cfg = info.get("config", {}).get("lmforge_config") or {}
    for key in ("arch", "n_layer", "d_model", "n_head", "n_kv_head", "vocab_size", "max_seq_len"):
        if key in cfg:
            table.add_row(key, str(cfg[key]))
    lineage = info.get("lineage", {})
    if "weights_sha256" in lineage:
        table.add_row("weights sha256", lineage["weights_sha256"])
    if "source" in lineage:
        table.add_row("source", escape(json.dumps(lineage["source"])))
    if lineage.get("parent"):
        table.add_row("parent", escape(str(lineage["parent"])))
    if "run_id" in lineage:
        data = lineage.get("dataset") or {}
        table.add_row("trained on", escape(f"{data.get('name')} ({data.get('path')})"))
        table.add_row("run", escape(f"{lineage['run_id']} ({lineage.get('run_dir')})"))
        steps, tokens = lineage.get("steps", 0), lineage.get("tokens_seen", 0)
        wall, cpu = lineage.get("wall_seconds", 0), lineage.get("cpu_seconds", 0)
        table.add_row(
            "training",
            f"{steps:,} steps, {tokens:,} tokens, {wall:,.0f} s wall, {cpu:,.0f} s CPU",
        )
        val = (lineage.get("eval") or {}).get("val_loss")
        if val is not None:
            table.add_row("val loss", f"{val:.4f}")
    out.print(table)


@app.command(
    "price",
    epilog="[bold]Examples[/bold]\n\n"
    "  lmforge models price shakes --input 0.15 --output 0.60   # USD per million tokens\n\n"
    "  lmforge models price shakes                             # show the price in force\n\n"
    "  lmforge models price --list",
)
def price_command(
    name: Annotated[
        str | None,
        typer.Argument(help="The served model name (registry model, alias or built-in)."),
    ] = None,
    input_usd: Annotated[
        str | None, typer.Option("--input", help="USD per million prompt tokens.")
    ] = None,
    output_usd: Annotated[
        str | None, typer.Option("--output", help="USD per million generated tokens.")
    ] = None,
    list_all: Annotated[bool, typer.Option("--list", help="Every priced model.")] = False,
) -> None:
    """Set or show a model's price per million input and output tokens (for billing)."""
    from lmforge.cli.keys import actor
    from lmforge.ops.accounts import price_model
    from lmforge.ops.pricing import format_price
    from lmforge.registry.db import connect, read_existing
    from lmforge.registry.ledger import get_price, list_prices

    if list_all or name is None:
        with read_existing() as conn:
            records = [] if conn is None else list_prices(conn)
        table = Table(Column("model", no_wrap=True), "input $/M", "output $/M", "since (UTC)")
        for r in records:
            table.add_row(
                escape(r.model),
                format_price(r.input_musd),
                format_price(r.output_musd),
                r.created_at,
            )
        out.print(table)
        return
    if (input_usd is None) != (output_usd is None):
        raise LmforgeError("give both --input and --output (USD per million tokens)")
    if input_usd is None or output_usd is None:
        with read_existing() as conn:
            record = None if conn is None else get_price(conn, model=name)
        if record is None:
            out.print(f"{escape(name)}: no price (requests to it are free)")
        else:
            out.print(
                f"{escape(name)}: {format_price(record.input_musd)} per million input tokens, "
                f"{format_price(record.output_musd)} per million output tokens "
                f"(since {record.created_at})"
            )
        return
    if name not in BUILTINS:
        from lmforge.resolve import registry_names

        if name not in registry_names(lmforge_home()):  # models and aliases
            raise LmforgeError(
                f"no model or alias named {name!r} in the registry (prices are per served "
                "model name)"
            )
    engine = connect()
    try:
        record = price_model(engine, actor=actor(), model=name, input=input_usd, output=output_usd)
    finally:
        engine.dispose()
    out.print(
        f"{escape(name)}: {format_price(record.input_musd)} per million input tokens, "
        f"{format_price(record.output_musd)} per million output tokens from now on"
    )


@app.command(
    "import",
    epilog="[bold]Examples[/bold]\n\n  lmforge models import ./SmolLM2-360M --name smollm2-360m\n\n"
    "  lmforge models import model.Q8_0.gguf --name my-model",
)
def import_command(
    path: Annotated[Path, typer.Argument(help="A Hugging Face model directory or a .gguf file.")],
    name: Annotated[str, typer.Option("--name", help="Registry name (a-z, 0-9, . _ -).")],
) -> None:
    """Import a model into the registry as an HF-layout directory under $LMFORGE_HOME/models."""
    from lmforge.model.formats import file_sha256, load_model, save_model
    from lmforge.registry import repo

    home = lmforge_home()
    repo.validate_name(name)
    with err.status(f"reading {path} …"):
        loaded = load_model(path)
    source = {"kind": "gguf" if path.is_file() else "hf", "path": str(path.resolve())}
    if path.is_file():
        source["sha256"] = file_sha256(path)
    rec = store_model(
        home,
        name,
        lambda tmp: save_model(
            loaded.model, loaded.tokenizer, tmp, lineage={"name": name, "source": source}
        ),
        arch=loaded.config.arch,
        n_params=loaded.config.num_params(),
        source=str(path.resolve()),
    )
    out.print(f"imported [bold]{rec.name}@{rec.version}[/bold] → {escape(str(rec.path))}")


@app.command(
    "merge",
    epilog="[bold]Examples[/bold]\n\n"
    "  lmforge models merge ~/.lmforge/adapters/sst2/20261123-101500-ab12cd --name sst2\n\n"
    "  lmforge models merge ./my-adapter --name helper-merged",
)
def merge_command(
    adapter: Annotated[
        Path, typer.Argument(help="A LoRA adapter directory (lmforge finetune --lora).")
    ],
    name: Annotated[str, typer.Option("--name", help="Registry name of the merged model.")],
) -> None:
    """Merge a LoRA adapter into its base model and register the result (an ordinary model)."""
    from lmforge.eval.card import write_card
    from lmforge.model.formats import is_adapter, load_adapter, save_model
    from lmforge.model.heads import HeadModel
    from lmforge.model.lora import merge_lora
    from lmforge.registry import repo

    home = lmforge_home()
    repo.validate_name(name)
    if not adapter.is_dir() or not is_adapter(adapter):
        raise LmforgeError(f"{adapter} is not a LoRA adapter directory (no adapter_config.json)")
    with err.status(f"merging {adapter} …"):
        model, tokenizer, lineage, _ = load_adapter(adapter)
        merge_lora(model.body if isinstance(model, HeadModel) else model)  # type: ignore[arg-type]
    record = dict(lineage)
    record.pop("weights_sha256", None)
    record.pop("kind", None)
    record.update(name=name, merged_from=str(adapter.resolve()))
    shape = getattr(model, "config")  # noqa: B009

    def write(tmp: Path) -> None:
        save_model(model, tokenizer, tmp, lineage=record)  # type: ignore[arg-type]
        write_card(tmp)

    rec = store_model(
        home,
        name,
        write,
        arch=shape.arch,
        n_params=sum(p.numel() for p in model.parameters()),
        source=f"adapter:{adapter.resolve()}",
        parent=lineage.get("parent"),
    )
    out.print(f"merged [bold]{rec.name}@{rec.version}[/bold] → {escape(str(rec.path))}")


def store_model(
    home: Path,
    name: str,
    write: Callable[[Path], Any],
    *,
    arch: str,
    n_params: int,
    source: str,
    parent: str | None = None,
) -> Any:
    """Write a model directory with WRITE (atomically, under models/NAME/) and register it as
    the next version of NAME; the weights' sha256 comes from the lmforge.json WRITE made."""
    from lmforge.atomic import atomic_directory
    from lmforge.model.formats import read_lineage
    from lmforge.registry import repo
    from lmforge.registry.db import connect

    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target = home / "models" / name / f"{stamp}-{secrets.token_hex(3)}"
    with err.status(f"writing {target} …"), atomic_directory(target) as tmp:
        write(tmp)
    engine = connect(home=home)
    try:
        with engine.begin() as conn:
            return repo.register_model(
                conn,
                name=name,
                path=str(target),
                sha256=read_lineage(target)["weights_sha256"],  # hashed by save_model
                parent=parent,
                arch=arch,
                n_params=n_params,
                source=source,
            )
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)  # not registered: nothing points at it
        raise
    finally:
        engine.dispose()


@app.command(
    "promote",
    epilog="[bold]Examples[/bold]\n\n"
    "  lmforge models promote shakes --alias prod --require 'perplexity<12'\n\n"
    "  lmforge models promote sst2@3 --alias prod --require 'accuracy>=0.85' "
    "--require 'macro_f1>=0.8'\n\n"
    "  lmforge serve prod        # serves whatever prod points at, and follows it",
)
def promote_command(
    model: Annotated[str, typer.Argument(help="Registry model: name (newest) or name@VERSION.")],
    alias: Annotated[str, typer.Option(help="The alias to point at it (e.g. prod).")],
    require: Annotated[
        list[str] | None,
        typer.Option(help="METRIC OP NUMBER its recorded evals must pass (repeatable)."),
    ] = None,
) -> None:
    """Point an alias at a model version, only if its recorded eval results pass."""
    from lmforge.cli.keys import actor
    from lmforge.ops.promotion import promote_model
    from lmforge.registry.db import connect

    engine = connect()
    try:
        result, checks = promote_model(
            engine, actor=actor(), spec=model, alias=alias, requires=list(require or [])
        )
    finally:
        engine.dispose()
    for check in checks:
        out.print(f"[green]✓[/green] {escape(check['require'])}: {escape(check['why'])}")
    out.print(f"{escape(result.name)} → [bold]{escape(result.target)}[/bold]")


@app.command(
    "rollback",
    epilog="[bold]Examples[/bold]\n\n  lmforge models rollback prod",
)
def rollback_command(
    alias: Annotated[str, typer.Argument(help="The alias to point back.")],
) -> None:
    """Point an alias back where it pointed before its newest promotion."""
    from lmforge.cli.keys import actor
    from lmforge.ops.promotion import rollback_alias
    from lmforge.registry.db import connect

    engine = connect()
    try:
        result = rollback_alias(engine, actor=actor(), alias=alias)
    finally:
        engine.dispose()
    out.print(f"{escape(result.name)} → [bold]{escape(result.target)}[/bold] (rolled back)")


@app.command(
    "aliases",
    epilog="[bold]Examples[/bold]\n\n  lmforge models aliases\n\n  lmforge models aliases prod",
)
def aliases_command(
    alias: Annotated[str | None, typer.Argument(help="Show this alias's history.")] = None,
) -> None:
    """List the aliases and their targets, or one alias's promotions and rollbacks."""
    from lmforge.registry import aliases
    from lmforge.registry.db import read_existing

    with read_existing() as conn:
        if alias is None:
            table = Table("alias", "points at", "since (UTC)")
            for a in [] if conn is None else aliases.list_aliases(conn):
                table.add_row(escape(a.name), escape(a.target), a.updated_at)
            out.print(table)
            return
        current = None if conn is None else aliases.get_alias(conn, name=alias)
        if conn is None or current is None:
            raise LmforgeError(f"no alias named {alias!r} (see lmforge models aliases)")
        events = aliases.alias_history(conn, name=alias)
    table = Table("when (UTC)", "action", "from", "to", "checks", "by",
                  title=f"{alias} → {current.target}", title_justify="left")  # fmt: skip
    for e in events:
        action = e.action + (" (rolled back)" if e.undone else "")
        checks = ", ".join(c["require"] for c in e.checks) or "-"
        table.add_row(e.created_at, action, escape(e.from_target or "-"), escape(e.to_target),
                      escape(checks), escape(e.actor))  # fmt: skip
    out.print(table)
