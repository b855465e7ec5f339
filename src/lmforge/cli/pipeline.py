"""`lmforge pipeline run FILE`: the whole chain from one YAML file.

The plan, the skipping and resuming, and the report are `lmforge.pipeline`'s; this module
runs each stage's command line through the CLI's own entry point, in this process, so a stage
behaves exactly as the command does when typed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from lmforge.cli.console import stdout_console
from lmforge.home import lmforge_home

out = stdout_console()

app = typer.Typer(
    help="Run the whole chain (data → train → finetune → eval → quantize → register → price → "
    "serve) from one YAML file.",
    no_args_is_help=True,
    rich_markup_mode="rich",
)

RUN_EXAMPLES = """[bold]Examples[/bold]

  lmforge pipeline run pipeline.yaml

  lmforge pipeline run pipeline.yaml --dry-run

  lmforge pipeline run pipeline.yaml --until eval

[bold]The file[/bold]

  name: shakespeare
  stages:
    data:  {sources: \\[input.txt], name: shakes, tokenizer: char, split: tail}
    train: {data: shakes, model: nanogpt-shakespeare-cpu, name: shakes, max_steps: 200}
    eval:  {model: shakes, task: perplexity, data: held-out.txt}
    price: {model: shakes, input: 0.10, output: 0.40}
    serve: {port: 8000}

Each stage's options are its command's options ([bold]max_steps: 200[/bold] is
[bold]--max-steps 200[/bold]). A stage whose options and inputs (content hashes) are unchanged
is skipped; an interrupted one goes on where it stopped. The report (Markdown and HTML) is
written to $LMFORGE_HOME/pipelines/NAME/ before a serve stage starts.
"""


@app.command("run", epilog=RUN_EXAMPLES)
def run_command(
    file: Annotated[Path, typer.Argument(help="The pipeline's YAML file.")],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan (what runs, what is skipped, why).")
    ] = False,
    until: Annotated[
        str | None, typer.Option(help="Stop after this stage (its id in the file).")
    ] = None,
) -> None:
    """Run a pipeline file's stages in order, skipping those that are unchanged."""
    from lmforge.pipeline.report import write_report
    from lmforge.pipeline.run import (
        STATE_FILE,
        PipelineState,
        pipeline_dir,
        plan,
        run_pipeline,
    )
    from lmforge.pipeline.spec import load_pipeline

    pipeline = load_pipeline(file)
    home = lmforge_home()
    if until is not None:
        pipeline.stage(until)  # an unknown stage is an error before anything runs
    if dry_run:
        state = PipelineState.load(pipeline_dir(home, pipeline.name) / STATE_FILE)
        table = Table("stage", "kind", "action", "why", "command", title=f"plan: {pipeline.name}")
        for step in plan(pipeline, state, home):
            table.add_row(
                step.stage.id,
                step.stage.kind,
                step.action,
                step.reason,
                escape("lmforge " + " ".join(step.argv)),
            )
            if step.stage.id == until:
                break
        out.print(table)
        return

    def execute(argv: list[str]) -> int:
        from lmforge.cli.main import main  # main imports this module

        out.rule(f"[bold]$ lmforge {escape(' '.join(argv))}[/bold]")
        return main(argv)

    def report(state: PipelineState) -> None:
        md, page = write_report(pipeline, state, home)
        out.print(f"report: {escape(str(md))}\n        {escape(str(page))}")

    steps, _ = run_pipeline(pipeline, home=home, execute=execute, until=until, before_serve=report)
    ran = [s.stage.id for s in steps if s.action != "skip"]
    skipped = [s.stage.id for s in steps if s.action == "skip"]
    out.print(
        f"pipeline {pipeline.name}: ran {', '.join(ran) or 'nothing'}"
        + (f"; skipped (unchanged) {', '.join(skipped)}" if skipped else "")
    )
