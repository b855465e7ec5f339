"""The `lmforge` command table and the entry point that turns errors into one line.

Every command exits 0 on success; on bad input it prints `error: <what is wrong>` on stderr and
exits 1 (2 for usage errors such as an unknown option), never a traceback. Set
`LMFORGE_DEBUG=1` to see tracebacks, `LMFORGE_LOG=info` for library logs.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Annotated

import typer

try:  # typer >= 0.20 vendors its own copy of click
    from typer._click import exceptions as click_exc
except ImportError:  # pragma: no cover - older typer uses click itself
    import click.exceptions as click_exc  # type: ignore[no-redef]

from lmforge.cli import (
    billing,
    data,
    demo,
    distill,
    export,
    finetune,
    generate,
    keys,
    models,
    moderation,
    ops,
    pipeline,
    quantize,
    serve,
    train,
)
from lmforge.errors import LmforgeError

app = typer.Typer(
    name="lmforge",
    help="lmforge: the whole LLM chain in one self-hosted tool.",
    epilog=(
        "[bold]Examples[/bold]\n\n"
        "  lmforge data prepare input.txt --name shakespeare --tokenizer char --split tail\n\n"
        "  lmforge train --data shakespeare --model nanogpt-shakespeare-cpu --name shakes\n\n"
        "  lmforge finetune --base smollm2-135m-instruct --task classify --data train.tsv "
        "--name sst2 --lora --merge\n\n"
        "  lmforge eval sst2 --task classify --data dev.tsv\n\n"
        "  lmforge generate 'The capital of France is'\n\n"
        "  lmforge chat\n\n"
        "  lmforge serve --port 8000\n\n"
        "  LMFORGE_DB=postgresql://lmforge@db/lmforge lmforge serve --host 0.0.0.0\n\n"
        "  lmforge models list\n\n"
        "  lmforge pipeline run pipeline.yaml\n\n"
        "  lmforge demo"
    ),
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root(
    db: Annotated[
        str | None,
        typer.Option(
            "--db",
            envvar="LMFORGE_DB",
            show_envvar=True,
            help=(
                "The registry's database for this command: sqlite:///PATH or "
                "postgresql://USER:PASSWORD@HOST:PORT/DB (several servers sharing keys, limits, "
                "budgets and one ledger). Default: $LMFORGE_HOME/registry.db. Prefer the "
                "environment variable for URLs with a password (command lines are visible to "
                "other users)."
            ),
        ),
    ] = None,
) -> None:
    if db:
        os.environ["LMFORGE_DB"] = db  # read by registry.db.connect, in this process and children


generate.register(app)
train.register(app)
finetune.register(app)
export.register(app)
distill.register(app)
quantize.register(app)
serve.register(app)
app.add_typer(data.app, name="data")
app.add_typer(models.app, name="models")
app.add_typer(keys.app, name="keys")
app.add_typer(moderation.app, name="moderation")
app.add_typer(pipeline.app, name="pipeline")
ops.register(app)
billing.register(app)
demo.register(app)


def _setup_logging() -> None:
    level = os.environ.get("LMFORGE_LOG", "warning").upper()
    logging.basicConfig(
        level=getattr(logging, level, logging.WARNING),
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    _setup_logging()
    command = typer.main.get_command(app)
    debug = bool(os.environ.get("LMFORGE_DEBUG"))
    try:
        result = command.main(args=argv, prog_name="lmforge", standalone_mode=False)
    except typer.Exit as exc:
        return int(exc.exit_code)
    except typer.Abort:
        print("error: aborted", file=sys.stderr)
        return 130
    except click_exc.NoArgsIsHelpError as exc:
        if exc.ctx is not None:
            typer.echo(exc.ctx.get_help())
        return 0
    except click_exc.ClickException as exc:
        hint = ""
        if isinstance(exc, click_exc.UsageError) and exc.ctx is not None:
            hint = f" (see '{exc.ctx.command_path} --help')"
        print(f"error: {exc.format_message()}{hint}", file=sys.stderr)
        return exc.exit_code
    except LmforgeError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. `| head`); don't let Python complain at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except OSError as exc:  # disk full, permission denied, …: name the file, no traceback
        if debug:
            raise
        where = f": {exc.filename}" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    return result if isinstance(result, int) else 0


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
