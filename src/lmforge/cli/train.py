"""`lmforge train`: pretrain a model on a data set, watch it, register the result.

Flags, a YAML file (`--config run.yaml`) and `--section.field=value` overrides become one
`TrainConfig` (flags over overrides over the file over the defaults). The run lives in
`$LMFORGE_HOME/runs/<run id>/`; the trained model is written in the Hugging Face layout to
`$LMFORGE_HOME/models/<name>/…` and registered, so `lmforge generate --model NAME` works at once.
Under `torchrun` only rank 0 draws, writes and registers.

`lmforge distill` (`cli/distill.py`) is the same run with another loss: it shares the options
(`train_options`, `with_train_options`, `load_stage_config`) and the watching, registering and
summary (`run_training`, `watch_run`, `finish_run`).
"""

from __future__ import annotations

import functools
import inspect
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
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

from lmforge.cli.console import stderr_console, stdout_console
from lmforge.errors import LmforgeError
from lmforge.home import lmforge_home

out = stdout_console()
err = stderr_console()
T = TypeVar("T")
R = TypeVar("R")

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
    )(with_train_options(train_command))


def train_options(
    config: Annotated[
        Path | None, typer.Option("--config", help="YAML file with the config's fields.")
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
    strategy: Annotated[
        str | None, typer.Option(help="single, or ddp / fsdp under torchrun.")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """The options of `lmforge train` that `lmforge distill` shares, declared once; see
    `with_train_options` and `load_stage_config`."""


# train_options' parameters that set LoopConfig fields, and the field each sets.
_LOOP_FIELDS = {
    "max_steps": "max_steps",
    "batch_size": "batch_size",
    "block_size": "block_size",
    "grad_accum": "grad_accum",
    "lr": "lr",
    "min_lr": "min_lr",
    "warmup": "warmup",
    "weight_decay": "weight_decay",
    "beta2": "beta2",
    "seed": "seed",
    "eval_every": "eval_every",
    "eval_batches": "eval_batches",
    "ckpt_every": "ckpt_every",
    "dtype": "dtype",
    "compile_": "compile",
    "time_limit": "time_limit",
}


def with_train_options(command: Callable[..., None]) -> Callable[..., None]:
    """COMMAND with `train_options`' options after its own, for typer: they reach COMMAND as
    its `options` argument, a dict from parameter name to value (None: not given)."""
    own = inspect.signature(command, eval_str=True)
    shared = inspect.signature(train_options, eval_str=True).parameters
    params = [p for p in own.parameters.values() if p.name != "options"] + list(shared.values())

    @functools.wraps(command)
    def with_options(**kwargs: Any) -> None:
        options = {name: kwargs.pop(name) for name in shared}
        command(**kwargs, options=options)

    # typer reads the parameters from the signature and their types from __annotations__.
    with_options.__signature__ = own.replace(parameters=params)  # type: ignore[attr-defined]
    with_options.__annotations__ = {p.name: p.annotation for p in params}
    return with_options


def load_stage_config(
    cls: type[T], ctx: typer.Context, flags: dict[str, Any], options: dict[str, Any]
) -> T:
    """CLS (`TrainConfig`, `DistillConfig`) from `--config FILE`, the `--section.field=value`
    overrides left in CTX and the flags: the command's own FLAGS and `train_options`' OPTIONS
    (None: not given). Flags over overrides over the file over the defaults."""
    from lmforge.config import load_config

    top = {**flags, "resume": options["resume"], "strategy": options["strategy"]}
    values: dict[str, Any] = {k: v for k, v in top.items() if v is not None}
    values["loop"] = {f: options[p] for p, f in _LOOP_FIELDS.items() if options[p] is not None}
    if options["dropout"] is not None:
        values["arch"] = {"dropout": options["dropout"]}
    extra = list(ctx.args)
    if extra and not extra[0].startswith("-"):
        raise LmforgeError(f"unexpected argument {extra[0]!r} (options start with --)")
    return load_config(cls, file=options["config"], overrides=extra, values=values)


def train_command(
    ctx: typer.Context,
    data: Annotated[str | None, typer.Option(help="Data set name or directory.")] = None,
    model: Annotated[
        str | None, typer.Option(help="Model config: tiny, small, llama-small, gpt2-124m, lstm, …")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Registry name of the trained model.")] = None,
    init_from: Annotated[
        str | None, typer.Option(help="Continue pretraining this model (name, built-in or dir).")
    ] = None,
    *,
    options: dict[str, Any],
) -> None:
    """Pretrain a model on a prepared data set (resumable, observable, distributed)."""
    from lmforge.train.pretrain import TrainConfig

    flags = {"data": data, "model": model, "name": name, "init_from": init_from}
    config = load_stage_config(TrainConfig, ctx, flags, options)
    run_training(config, quiet=options["quiet"])


Stage = Callable[..., None]  # (config, dist, *, quiet): a training command's body


def run_training(config: Any, *, quiet: bool = False, stage: Stage | None = None) -> None:
    """STAGE (default: pretraining) in this process's place of a torchrun job, if any."""
    from lmforge.train.distributed import Distributed

    dist = Distributed.start(config.strategy)
    try:
        (stage or _run)(config, dist, quiet=quiet)
        # Leave together: a rank that tears its process group down while another still
        # exports the model can die in gloo's threads (SIGABRT, "terminate called without an
        # active exception"; seen about once in 8 two-process runs).
        dist.barrier()
    finally:
        dist.stop()


def _run(config: Any, dist: Any, *, quiet: bool) -> None:
    from lmforge.cli.data import dataset_path
    from lmforge.registry.repo import validate_name
    from lmforge.train.pretrain import plan_training, prepare_run, pretrain

    home = lmforge_home()
    validate_name(config.name)
    dataset_dir = dataset_path(config.data)
    init, init_ref = _load_init(config.init_from, home)
    plan = plan_training(config, dataset_dir, init=init, init_ref=init_ref, dist=dist)
    run = prepare_run(config, dataset_dir, home / "runs", dist)
    result = watch_run(
        run,
        config,
        dist,
        lambda on_step: pretrain(config, run, plan, on_step=on_step, dist=dist),
        quiet=quiet,
    )
    if dist.is_main:
        finish_run(result, config, run, home, parent=init_ref)


def watch_run(
    run: Any,
    config: Any,
    dist: Any,
    train: Callable[[Any], R],
    *,
    quiet: bool,
    label: str = "training",
    total: int | None = None,
    headline: str | None = None,
) -> R:
    """TRAIN(on_step) with a progress bar (or a line per evaluation when stderr is not a
    terminal), TensorBoard events and loss.png in RUN's directory; only rank 0 watches (DIST
    None: a single process). TOTAL steps default to config.loop.max_steps; HEADLINE, the line
    printed first, to "starting|resuming run ID → DIR"."""
    from lmforge.train.observe import RunObserver

    main = dist is None or dist.is_main
    total = total if total is not None else config.loop.max_steps
    observer = RunObserver(run.dir, title=f"{config.name} · {run.id}")
    columns = (
        TextColumn(f"[bold]{label}[/bold]"),
        BarColumn(),
        MofNCompleteColumn(),
        _StepStats(),
        TimeRemainingColumn(),
    )
    show = main and not quiet
    if show:
        what = "resuming" if run.resume else "starting"
        err.print(headline or f"{what} run [bold]{escape(run.id)}[/bold] → {escape(str(run.dir))}")
    with Progress(*columns, console=err, disable=not (show and err.is_terminal)) as bar:
        task = bar.add_task(label, total=total)
        watcher = _Watcher(observer, bar, task, total, lines=show and not err.is_terminal)
        try:
            return train(watcher if main else None)
        finally:
            observer.close()


def finish_run(result: Any, config: Any, run: Any, home: Path, *, parent: str | None) -> None:
    """Register the trained model (its PARENT: the model continued or distilled) and print the
    summary; a run stopped by --time-limit is not registered."""
    if result.result.stopped_early:
        err.print(
            f"stopped by --time-limit at step {result.result.step}; continue with "
            f"--resume auto (same settings)"
        )
        _summary(result, run, None)
        return
    record = _register(result, config, parent, run, home)
    _summary(result, run, record)


def _load_init(spec: str | None, home: Path) -> tuple[Any, str | None]:
    if spec is None:
        return None, None
    from lmforge.model.formats import load_model
    from lmforge.resolve import resolve

    ref = resolve(spec, home=home)
    with err.status(f"loading {ref.name} …"):
        loaded = load_model(ref.path)
    return loaded, ref.name


def _register(result: Any, config: Any, parent: str | None, run: Any, home: Path) -> Any:
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
        parent=parent,
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
    teacher = result.lineage.get("teacher")
    if teacher:
        table.add_row("teacher", escape(str(teacher["name"])))
        kl = result.lineage["eval"].get("val_kl_to_teacher")
        if kl is not None:
            table.add_row("val KL to teacher", f"{kl:.4f} nats per token")
    table.add_row("loss curve", escape(str(run.dir / "loss.png")))
    if record is not None:
        table.add_row("model", f"[bold]{escape(record.ref)}[/bold] → {escape(str(record.path))}")
    out.print(table)
    if record is not None:
        out.print(f"try it: lmforge generate {record.name} 'Once upon a time'")
    sys.stdout.flush()
