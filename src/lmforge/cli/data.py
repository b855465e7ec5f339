"""`lmforge data prepare | list | show`: raw files → a data set, and what happened to them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from lmforge.cli.console import stderr_console, stdout_console
from lmforge.errors import LmforgeError
from lmforge.home import lmforge_home

out = stdout_console()
err = stderr_console()

app = typer.Typer(
    help="Prepare data sets: clean, deduplicate, scrub PII, tokenize, shard.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)

PREPARE_EXAMPLES = """[bold]Examples[/bold]

  lmforge data prepare ../shared/data/tinyshakespeare/input.txt --name shakespeare-char
  --tokenizer char --split tail --val-fraction 0.1

  lmforge data prepare corpus/ 'more/*.jsonl.zst' --name web --vocab-size 16000
  --dedup minhash --minhash-threshold 0.8 --pii scrub

  lmforge data prepare chats.jsonl --name chats --tokenizer smollm2-135m-instruct

  lmforge data prepare reviews.csv --text-field review --on-error skip --name reviews

  lmforge data prepare 'shards/*.jsonl.zst' --name web --executor ray --ray-address auto
"""


class _Rates(ProgressColumn):
    """Documents so far, documents/s and MB/s of text (not of compressed input)."""

    def render(self, task: Task) -> Text:
        elapsed = task.elapsed or 0
        docs, text = task.fields.get("docs", 0), task.fields.get("text", 0)
        if not docs or elapsed <= 0:
            return Text("")
        return Text(
            f"{docs:,} docs  {docs / elapsed:,.0f} docs/s  {text / elapsed / 1e6:.1f} MB/s",
            style="cyan",
        )


class _RichProgress:
    """`lmforge.data.funnel.Progress` drawn as rich progress bars on stderr."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task: Any = None

    def stage(self, name: str, total: int | None) -> None:
        if self.task is not None:  # the previous stage is complete
            done = self.progress.tasks[-1].completed or 1
            self.progress.update(self.task, total=done, completed=done)
            self.progress.stop_task(self.task)  # its rates and time stop here
        self.task = self.progress.add_task(name, total=total, docs=0, text=0)

    def advance(self, documents: int, done: int, text_bytes: int) -> None:
        fields = self.progress.tasks[-1].fields
        self.progress.update(
            self.task,
            advance=done,
            docs=fields["docs"] + documents,
            text=fields["text"] + text_bytes,
        )


def _tokenizer_source(spec: str) -> str:
    """bpe/char/byte as they are; a model name or path → a directory with tokenizer.json."""
    if spec in ("bpe", "char", "byte"):
        return spec
    path = Path(spec).expanduser()
    if path.is_file() and path.name == "tokenizer.json":
        return str(path.parent)
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise LmforgeError(f"--tokenizer {spec}: folder has no tokenizer.json")
        return str(path)
    from lmforge.resolve import resolve

    try:
        ref = resolve(spec)
    except LmforgeError as exc:
        raise LmforgeError(
            f"--tokenizer {spec!r} is not bpe, char, byte, a model or a path ({exc})"
        ) from None
    if ref.kind == "gguf" or not (ref.path / "tokenizer.json").is_file():
        raise LmforgeError(f"--tokenizer {spec}: {ref.path} has no tokenizer.json")
    return str(ref.path)


def datasets_dir() -> Path:
    return lmforge_home() / "datasets"


@app.command("prepare", epilog=PREPARE_EXAMPLES)
def prepare_command(
    sources: Annotated[
        list[str],
        typer.Argument(
            help="Files, folders or globs: txt md jsonl json csv tsv parquet (+.gz/.zst)."
        ),
    ],
    name: Annotated[str, typer.Option("--name", help="Data set name (a-z 0-9 . _ -).")],
    tokenizer: Annotated[
        str, typer.Option(help="bpe (train), char (nanoGPT order), byte, or a model name / path.")
    ] = "bpe",
    vocab_size: Annotated[
        int, typer.Option(help="BPE vocabulary size incl. special tokens.")
    ] = 8192,
    tokenizer_sample_mb: Annotated[
        int, typer.Option(help="Train the BPE on at most this many MB of text (a sample).")
    ] = 100,
    dedup: Annotated[
        str, typer.Option(help="none, exact, or minhash (exact + near duplicates).")
    ] = "minhash",
    minhash_threshold: Annotated[
        float, typer.Option(help="Jaccard similarity from which documents are near duplicates.")
    ] = 0.8,
    pii: Annotated[
        str, typer.Option(help="scrub (typed placeholders), drop the document, or keep.")
    ] = "scrub",
    val_fraction: Annotated[float, typer.Option(help="Share held out for validation.")] = 0.1,
    test_fraction: Annotated[float, typer.Option(help="Share held out for testing.")] = 0.0,
    split: Annotated[
        str,
        typer.Option(help="random (documents, by --seed) or tail (last characters, like nanoGPT)."),
    ] = "random",
    seed: Annotated[int, typer.Option(help="Seed of the random split.")] = 1337,
    text_field: Annotated[
        str, typer.Option(help="JSON field / CSV column / parquet column with the text.")
    ] = "text",
    min_chars: Annotated[int, typer.Option(help="Drop documents shorter than this.")] = 20,
    on_error: Annotated[
        str, typer.Option(help="fail on a bad record, or skip (and count) it.")
    ] = "fail",
    workers: Annotated[int, typer.Option(help="Worker processes (0: one per core).")] = 0,
    executor: Annotated[
        str,
        typer.Option(
            help="local (worker processes here) or ray (Ray Data tasks on a Ray cluster; "
            "same manifest and shards; pip install 'lmforge\\[ray]')."
        ),
    ] = "local",
    ray_address: Annotated[
        str | None,
        typer.Option(
            help="The Ray cluster for --executor ray, e.g. auto or 10.0.0.5:6379 "
            "(default: $RAY_ADDRESS, else a local Ray for this run)."
        ),
    ] = None,
    shard_tokens: Annotated[int, typer.Option(help="Tokens per shard file at most.")] = 100_000_000,
    save_removed: Annotated[
        bool, typer.Option("--save-removed", help="Keep removed documents in removed.jsonl.gz.")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a data set of this name with other inputs.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Clean, deduplicate, scrub and tokenize SOURCES into token shards + manifest.json.

    Re-running with the same inputs and options does nothing; an interrupted run leaves nothing
    half-written. The data set goes to $LMFORGE_HOME/datasets/NAME.
    """
    from lmforge.data.prepare import PrepareConfig, describe, prepare
    from lmforge.registry import repo
    from lmforge.registry.db import connect

    repo.validate_name(name, kind="data set")
    config = PrepareConfig(
        sources=tuple(sources),
        tokenizer=_tokenizer_source(tokenizer),
        vocab_size=vocab_size,
        tokenizer_sample_mb=tokenizer_sample_mb,
        dedup=dedup,  # type: ignore[arg-type]
        minhash_threshold=minhash_threshold,
        pii=pii,  # type: ignore[arg-type]
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        split=split,  # type: ignore[arg-type]
        seed=seed,
        text_field=text_field,
        min_chars=min_chars,
        on_error=on_error,  # type: ignore[arg-type]
        workers=workers,
        executor=executor,  # type: ignore[arg-type]
        ray_address=ray_address,
        shard_tokens=shard_tokens,
        save_removed=save_removed,
    )
    target = datasets_dir() / name
    columns = (
        TextColumn("[bold]{task.description:<20}"),
        BarColumn(),
        _Rates(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err, disable=quiet or not err.is_terminal) as bar:
        result = prepare(
            config, target, name=name, overwrite=overwrite, progress=_RichProgress(bar)
        )
    manifest = result.manifest
    head = describe(manifest)
    engine = connect()
    try:
        with engine.begin() as conn:
            row = repo.get_dataset(conn, name=name)
            if not (result.unchanged and row and row.content_key == manifest["content_key"]):
                repo.put_dataset(
                    conn,
                    name=name,
                    path=result.path,
                    content_key=manifest["content_key"],
                    manifest_sha256=result.manifest_sha256,
                    tokenizer=tokenizer,
                    **head,
                )
    finally:
        engine.dispose()
    if result.unchanged:
        out.print(
            f"data set [bold]{escape(name)}[/bold] is up to date (same inputs and options): "
            f"{escape(str(result.path))}"
        )
        return
    splits = ", ".join(
        f"{s} {v['tokens']:,} tokens" for s, v in manifest["splits"].items() if v["tokens"]
    )
    timing = manifest["timing"]
    out.print(
        f"data set [bold]{escape(name)}[/bold]: {head['documents']:,} documents kept of "
        f"{manifest['funnel'][0]['documents']:,}, {splits}; vocabulary {head['vocab_size']:,} "
        f"({timing['seconds']:.1f} s, {timing['mb_per_s']:.1f} MB/s)"
    )
    if errors := manifest["read_errors"]:
        total = sum(errors.values())
        kinds = ", ".join(f"{k} {v:,}" for k, v in errors.items())
        out.print(f"  skipped {total:,} bad record{'s' * (total != 1)} ({kinds}), e.g.")
        for message in manifest["first_errors"][:3]:
            out.print(f"    {escape(message)}")
    out.print(f"  {escape(str(result.path))}   (details: lmforge data show {escape(name)})")


@app.command(
    "list",
    epilog="[bold]Examples[/bold]\n\n  lmforge data list\n\n  lmforge data list --json",
)
def list_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
) -> None:
    """List the prepared data sets."""
    from lmforge.registry import repo
    from lmforge.registry.db import read_existing

    with read_existing() as conn:
        records = repo.list_datasets(conn) if conn is not None else []
    if as_json:
        for rec in records:
            print(
                json.dumps(
                    {
                        "name": rec.name,
                        "documents": rec.documents,
                        "tokens": rec.tokens,
                        "vocab_size": rec.vocab_size,
                        "tokenizer": rec.tokenizer,
                        "path": str(rec.path),
                        "updated": rec.updated_at,
                    }
                )
            )
        return
    if not records:
        out.print("no data sets yet: lmforge data prepare FILES --name NAME")
        return
    table = Table(title="data sets", title_justify="left")
    for col in ("name", "documents", "tokens", "vocab", "tokenizer", "updated"):
        table.add_column(
            col,
            no_wrap=True,
            justify="right" if col in ("documents", "tokens", "vocab") else "left",
        )
    for rec in records:
        table.add_row(
            escape(rec.name),
            f"{rec.documents:,}",
            f"{rec.tokens:,}",
            f"{rec.vocab_size:,}",
            escape(rec.tokenizer),
            rec.updated_at[:19].replace("T", " "),
        )
    out.print(table)


def dataset_path(spec: str) -> Path:
    """A data set name (registry) or directory → its directory."""
    path = Path(spec).expanduser()
    if (path / "manifest.json").is_file():
        return path
    from lmforge.registry import repo
    from lmforge.registry.db import read_existing

    with read_existing() as conn:
        record = repo.get_dataset(conn, name=spec) if conn is not None else None
        names = [r.name for r in repo.list_datasets(conn)] if conn is not None else []
    if record is None:
        known = f" (known: {', '.join(names)})" if names else " (no data sets yet)"
        raise LmforgeError(f"no data set {spec!r}{known}")
    return record.path


@app.command(
    "show",
    epilog="[bold]Examples[/bold]\n\n  lmforge data show shakespeare-char\n\n"
    "  lmforge data show web --json | jq .removed",
)
def show_command(
    name: Annotated[str, typer.Argument(help="Data set name or directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest.")] = False,
) -> None:
    """Show what happened to a data set: the funnel from raw to kept, removal reasons, PII,
    duplicates, splits and the token-length histogram (a PNG)."""
    from lmforge.data.report import funnel_rows, top_removals
    from lmforge.data.shards import read_manifest

    path = dataset_path(name)
    manifest = read_manifest(path)
    if as_json:
        print(json.dumps(manifest, indent=2, ensure_ascii=False))
        return
    tok = manifest["tokenizer"]
    out.print(f"[bold]{escape(manifest['name'])}[/bold]  {escape(str(path))}")
    out.print(
        f"  created {manifest['created_at']}  content key {manifest['content_key'][:16]}  "
        f"tokenizer {tok['kind']} (vocabulary {tok['vocab_size']:,}, {manifest['dtype']})"
    )
    sources = Table(title="sources", title_justify="left")
    for col in ("file", "bytes", "read", "kept", "sha256"):
        sources.add_column(col, overflow="fold" if col == "file" else "ellipsis")
    for s in manifest["sources"]:
        sources.add_row(
            escape(s["path"]),
            f"{s['bytes']:,}",
            f"{s['documents_read']:,}",
            f"{s['documents_kept']:,}",
            s["sha256"][:12],
        )
    out.print(sources)
    funnel = Table(title="funnel: raw → kept", title_justify="left")
    for col in ("step", "documents", "chars", "kept"):
        funnel.add_column(col, justify="left" if col == "step" else "right")
    for step, docs, chars, share in funnel_rows(manifest):
        funnel.add_row(step, f"{docs:,}", "-" if chars is None else f"{chars:,}", f"{share:.1%}")
    out.print(funnel)
    removals = top_removals(manifest)
    if removals:
        table = Table(title="top removal reasons", title_justify="left")
        for col in ("reason", "documents", "chars"):
            table.add_column(col, justify="left" if col == "reason" else "right")
        for reason, docs, chars in removals:
            table.add_row(reason, f"{docs:,}", f"{chars:,}")
        out.print(table)
    if manifest.get("lines_removed"):
        lines = ", ".join(f"{k} {v:,}" for k, v in manifest["lines_removed"].items())
        out.print(f"lines removed: {lines}")
    pii = manifest["pii"]
    found = ", ".join(f"{k} {v:,}" for k, v in sorted(pii["found"].items())) or "none"
    out.print(f"PII ({pii['mode']}, rules v{pii['rules_version']}): {found}")
    dd = manifest["dedup"]
    out.print(
        f"duplicates ({dd['mode']}"
        + (f", Jaccard ≥ {dd['threshold']}" if dd["threshold"] else "")
        + f"): {dd['exact_duplicates']:,} exact, {dd['near_duplicates']:,} near"
    )
    if manifest.get("read_errors"):
        errors = ", ".join(f"{k} {v:,}" for k, v in manifest["read_errors"].items())
        out.print(f"records skipped: {errors}")
        for message in manifest.get("first_errors", [])[:3]:
            out.print(f"  {escape(message)}")
    splits = Table(title="splits", title_justify="left")
    for col in ("split", "documents", "chars", "tokens", "files"):
        splits.add_column(col, justify="left" if col == "split" else "right")
    for split, counts in manifest["splits"].items():
        files = sum(1 for s in manifest["shards"] if s["split"] == split)
        splits.add_row(
            split,
            f"{counts['documents']:,}",
            f"{counts['chars']:,}",
            f"{counts['tokens']:,}",
            str(files),
        )
    out.print(splits)
    lengths = manifest["token_lengths"]
    if lengths.get("documents"):
        out.print(
            f"tokens per document: mean {lengths['mean']:,.1f}, median {lengths['p50']:,}, "
            f"p90 {lengths['p90']:,}, p99 {lengths['p99']:,}, max {lengths['max']:,}"
        )
        png = path / "token_lengths.png"
        if png.is_file():
            out.print(f"histogram: {escape(str(png))}")
    timing = manifest["timing"]
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in timing.get("stages", {}).items())
    out.print(
        f"prepared in {timing['seconds']:.1f} s ({timing['mb_per_s']:.1f} MB/s of text, "
        f"{timing['workers']} workers; {stages})"
    )
