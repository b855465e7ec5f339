"""`lmforge train`: pretrain a model on a data set, watch it, register the result.

Flags, a YAML file (`--config run.yaml`) and `--section.field=value` overrides become one
`TrainConfig` (flags over overrides over the file over the defaults). The run lives in
`$LMFORGE_HOME/runs/<run id>/`; the trained model is written in the Hugging Face layout to
`$LMFORGE_HOME/models/<name>/…` and registered, so `lmforge generate --model NAME` works at once.
Under `torchrun` only rank 0 draws, writes and registers.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from lmforge.errors import LmforgeError
from lmforge.home import lmforge_home

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

EXAMPLES = """[bold]Examples[/bold]

  lmforge train --data shakespeare-char --model nanogpt-shakespeare-cpu --name shakespeare

  lmforge train --data web --model small --name web-small --max-steps 5000 --dtype bf16
  --lr 6e-4 --arch.n_layer=8

  lmforge train --config run.yaml --loop.batch_size=32 --resume auto

  lmforge train --data chats --init-from smollm2-135m-instruct --name smol-more --lr 1e-4

  torchrun --nproc-per-node 2 -m lmforge train --data web --model tiny --name t --strategy ddp

[bold]Model configs[/bold]: nanogpt-shakespeare-cpu, tiny, small, llama-small, gpt2-124m, lstm.
Any [bold]--section.field=value[/bold] sets a TrainConfig field: sections [bold]loop[/bold]
(max_steps, batch_size, block_size, lr, …) and [bold]arch[/bold] (n_layer, d_model, …).
"""


class _StepStats(ProgressColumn):
    """loss, lr and tokens/s of the latest step."""

    def render(self, task: Task) -> Text:
        f = task.fields
        if "loss" not in f:
            return Text("")
        text = f"loss {f['loss']:.4f}  lr {f['lr']:.2e}  {f['tok_s']:,.0f} tok/s"
        if f.get("val_loss") is not None:
            text += f"  val {f['val_loss']:.4f}"
        return Text(text, style="cyan")


class _Watcher:
    """on_step: progress bar (terminal) or a log line per evaluation (pipes), plus the observer."""

    def __init__(
        self, observer: Any, bar: Progress, task: Any, max_steps: int, *, lines: bool
    ) -> None:
        self.observer, self.bar, self.task, self.max_steps = observer, bar, task, max_steps
        self.lines = lines  # a line per evaluation instead of the bar (stderr is not a terminal)
        self.tokens_per_step = 0.0
        self.window: list[tuple[float, int]] = []  # (step seconds, tokens) of recent steps
        self.val_loss: float | None = None

    def __call__(self, record: dict[str, Any]) -> None:
        self.observer(record)
        step = record["step"]
        tokens = record["tokens"] // step
        self.window = [*self.window[-19:], (record["step_s"], tokens)]
        tok_s = sum(t for _, t in self.window) / max(1e-9, sum(s for s, _ in self.window))
        self.val_loss = record.get("val_loss", self.val_loss)
        self.bar.update(
            self.task,
            completed=step,
            loss=record["loss"],
            lr=record["lr"],
            tok_s=tok_s,
            val_loss=self.val_loss,
        )
        if self.lines and ("val_loss" in record or step == self.max_steps):
            val = f"  val loss {record['val_loss']:.4f}" if "val_loss" in record else ""
            err.print(
                f"step {step}/{self.max_steps}  loss {record['loss']:.4f}{val}  {tok_s:,.0f} tok/s"
            )


def register(app: typer.Typer) -> None:
    app.command(
        "train",
        epilog=EXAMPLES,
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )(train_command)


def train_command(
    ctx: typer.Context,
    data: Annotated[str | None, typer.Option(help="Data set name or directory.")] = None,
    model: Annotated[
        str | None, typer.Option(help="Model config: tiny, small, llama-small, gpt2-124m, lstm, …")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Registry name of the trained model.")] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="YAML file with TrainConfig fields.")
    ] = None,
    max_steps: Annotated[int | None, typer.Option(help="Optimizer steps.")] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Windows per micro-batch (global, all processes).")
    ] = None,
    block_size: Annotated[
        int | None, typer.Option(help="Window length in tokens (default: model context, ≤ 1024).")
    ] = None,
    grad_accum: Annotated[int | None, typer.Option(help="Micro-batches per step.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    min_lr: Annotated[
        float | None, typer.Option(help="Learning rate at the end of the cosine.")
    ] = None,
    warmup: Annotated[int | None, typer.Option(help="Linear warmup steps.")] = None,
    weight_decay: Annotated[
        float | None, typer.Option(help="AdamW weight decay (matrices).")
    ] = None,
    beta2: Annotated[float | None, typer.Option(help="AdamW beta2.")] = None,
    dropout: Annotated[float | None, typer.Option(help="Dropout probability.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for init, data order and dropout.")] = None,
    eval_every: Annotated[
        int | None, typer.Option(help="Evaluate every N steps (0: at the end).")
    ] = None,
    eval_batches: Annotated[
        int | None, typer.Option(help="Validation batches per evaluation.")
    ] = None,
    ckpt_every: Annotated[
        int | None, typer.Option(help="Checkpoint every N steps (0: at the end).")
    ] = None,
    resume: Annotated[
        str | None,
        typer.Option(help="auto (newest unfinished run of --name) or a checkpoint/run dir."),
    ] = None,
    dtype: Annotated[str | None, typer.Option(help="fp32 or bf16 (autocast).")] = None,
    compile_: Annotated[
        bool | None, typer.Option("--compile/--no-compile", help="torch.compile the model.")
    ] = None,
    time_limit: Annotated[
        float | None, typer.Option(help="Stop (with a checkpoint) after this many seconds.")
    ] = None,
    init_from: Annotated[
        str | None, typer.Option(help="Continue pretraining this model (name, built-in or dir).")
    ] = None,
    strategy: Annotated[
        str | None, typer.Option(help="single, or ddp / fsdp under torchrun.")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Pretrain a model on a prepared data set (resumable, observable, distributed)."""
    from lmforge.config import load_config
    from lmforge.train.pretrain import TrainConfig

    flags: dict[str, Any] = {
        "data": data,
        "model": model,
        "name": name,
        "init_from": init_from,
        "resume": resume,
        "strategy": strategy,
    }
    loop = {
        "max_steps": max_steps,
        "batch_size": batch_size,
        "block_size": block_size,
        "grad_accum": grad_accum,
        "lr": lr,
        "min_lr": min_lr,
        "warmup": warmup,
        "weight_decay": weight_decay,
        "beta2": beta2,
        "seed": seed,
        "eval_every": eval_every,
        "eval_batches": eval_batches,
        "ckpt_every": ckpt_every,
        "dtype": dtype,
        "compile": compile_,
        "time_limit": time_limit,
    }
    values: dict[str, Any] = {k: v for k, v in flags.items() if v is not None}
    values["loop"] = {k: v for k, v in loop.items() if v is not None}
    if dropout is not None:
        values["arch"] = {"dropout": dropout}
    extra = list(ctx.args)
    if extra and not extra[0].startswith("-"):
        raise LmforgeError(f"unexpected argument {extra[0]!r} (options start with --)")
    train_config = load_config(TrainConfig, file=config, overrides=extra, values=values)
    run_training(train_config, quiet=quiet)


def run_training(config: Any, *, quiet: bool = False) -> None:
    from lmforge.train.distributed import Distributed

    dist = Distributed.start(config.strategy)
    try:
        _run(config, dist, quiet=quiet)
        # Leave together: a rank that tears its process group down while another still
        # exports the model can die in gloo's threads (SIGABRT, "terminate called without an
        # active exception"; seen about once in 8 two-process runs).
        dist.barrier()
    finally:
        dist.stop()


def _run(config: Any, dist: Any, *, quiet: bool) -> None:
    from lmforge.cli.data import dataset_path
    from lmforge.registry.repo import validate_name
    from lmforge.train.observe import RunObserver
    from lmforge.train.pretrain import plan_training, prepare_run, pretrain

    home = lmforge_home()
    validate_name(config.name)
    dataset_dir = dataset_path(config.data)
    init, init_ref = _load_init(config.init_from, home)
    plan = plan_training(config, dataset_dir, init=init, init_ref=init_ref, dist=dist)
    run = prepare_run(config, dataset_dir, home / "runs", dist)
    observer = RunObserver(run.dir, title=f"{config.name} · {run.id}")
    columns = (
        TextColumn("[bold]training[/bold]"),
        BarColumn(),
        MofNCompleteColumn(),
        _StepStats(),
        TimeRemainingColumn(),
    )
    show = dist.is_main and not quiet
    if show:
        what = "resuming" if run.resume else "starting"
        err.print(f"{what} run [bold]{escape(run.id)}[/bold] → {escape(str(run.dir))}")
    with Progress(*columns, console=err, disable=not (show and err.is_terminal)) as bar:
        task = bar.add_task("train", total=config.loop.max_steps)
        watcher = _Watcher(
            observer, bar, task, config.loop.max_steps, lines=show and not err.is_terminal
        )
        try:
            result = pretrain(
                config, run, plan, on_step=watcher if dist.is_main else None, dist=dist
            )
        finally:
            observer.close()
    if not dist.is_main:
        return
    if result.result.stopped_early:
        err.print(
            f"stopped by --time-limit at step {result.result.step}; continue with "
            f"--resume auto (same settings)"
        )
        _summary(result, run, None)
        return
    record = _register(result, config, init_ref, run, home)
    _summary(result, run, record)


def _load_init(spec: str | None, home: Path) -> tuple[Any, str | None]:
    if spec is None:
        return None, None
    from lmforge.model.checkpoint import load_model
    from lmforge.resolve import resolve

    ref = resolve(spec, home=home)
    with err.status(f"loading {ref.name} …"):
        loaded = load_model(ref.path)
    return loaded, ref.name


def _register(result: Any, config: Any, init_ref: str | None, run: Any, home: Path) -> Any:
    from lmforge.cli.models import store_model
    from lmforge.train.pretrain import export_model

    shape = result.model.config
    return store_model(
        home,
        config.name,
        lambda tmp: export_model(result, tmp),
        arch=shape.arch,
        n_params=shape.num_params(),
        source=f"run:{run.id}",
        parent=init_ref,
    )


def _summary(result: Any, run: Any, record: Any) -> None:
    r = result.result
    table = Table(title="training run", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("run", escape(run.id))
    table.add_row(
        "steps", f"{r.step:,}" + (f" (resumed at {r.resumed_from:,})" if r.resumed_from else "")
    )
    table.add_row("tokens seen", f"{r.tokens:,}")
    table.add_row("wall time", f"{r.total_seconds:,.1f} s (this process: {r.seconds:,.1f} s)")
    table.add_row("CPU time", f"{r.cpu_seconds:,.1f} s")
    done = r.step - (r.resumed_from or 0)
    if r.seconds > 0 and done:
        table.add_row("tokens/s", f"{r.tokens / max(r.step, 1) * done / r.seconds:,.0f}")
    table.add_row("train loss", f"{r.train_loss:.4f}")
    if r.val_loss is not None:
        table.add_row(
            "val loss", f"{r.val_loss:.4f} (perplexity {math.exp(min(r.val_loss, 50)):.2f})"
        )
        table.add_row("best val loss", f"{r.best_val_loss:.4f}")
    table.add_row("loss curve", escape(str(run.dir / "loss.png")))
    if record is not None:
        table.add_row("model", f"[bold]{escape(record.ref)}[/bold] → {escape(str(record.path))}")
    out.print(table)
    if record is not None:
        out.print(f"try it: lmforge generate {record.name} 'Once upon a time'")
    sys.stdout.flush()
