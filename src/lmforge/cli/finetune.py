"""`lmforge finetune` and `lmforge eval`: task models from a base model, and their scores.

`finetune` reads a task file (chats, labelled texts, SQuAD), trains through the one training loop
(`train/finetune.py`) with a progress bar and a loss curve, and registers the result under
`--name`: a full model, or with `--lora` the small adapter directory (under
`$LMFORGE_HOME/adapters/NAME/`) — plus the merged model with `--merge`.

`eval` scores a model (registry name, directory, built-in, or adapter directory) on a file,
checks the file for n-gram overlap with everything the model and its ancestors were trained on,
and records the result in the registry, in the model's `lmforge.json` and its card (README.md).
"""

from __future__ import annotations

import json
import math
import secrets
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from lmforge.cli.console import stderr_console, stdout_console
from lmforge.errors import LmforgeError
from lmforge.home import lmforge_home

out = stdout_console()
err = stderr_console()

FINETUNE_EXAMPLES = """[bold]Examples[/bold]

  lmforge finetune --base smollm2-135m-instruct --task classify --data sst2/train.tsv
  --val-data sst2/dev.tsv --name sst2 --lora --merge --max-steps 600

  lmforge finetune --base smollm2-135m-instruct --task sft --data chats.jsonl --name helper
  --epochs 2 --lora --lora-rank 16 --lora-targets q,v

  lmforge finetune --base my-model --task qa --data squad-train.json --name reader
  --block-size 384 --doc-stride 128

[bold]Data[/bold]: sft — JSONL of OpenAI `messages`, Alpaca or ShareGPT records; classify —
TSV/CSV (text, label; a header row is detected) or JSONL {text, label}; qa — SQuAD v1.1 JSON.
"""

EVAL_EXAMPLES = """[bold]Examples[/bold]

  lmforge eval sst2 --task classify --data sst2/dev.tsv --json sst2-dev.json

  lmforge eval shakespeare --task perplexity --data held-out.txt

  lmforge eval reader --task qa --data squad-dev.json

  lmforge eval smollm2-135m-instruct --task bleu --data pairs.jsonl --max-tokens 64

[bold]Data[/bold]: perplexity — .txt or JSONL {text}; classify — as for finetune; qa — SQuAD
JSON; bleu — JSONL {source, reference} (or prompt/target) or a two-column TSV.
"""


def register(app: typer.Typer) -> None:
    app.command(
        "finetune",
        epilog=FINETUNE_EXAMPLES,
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )(finetune_command)
    app.command("eval", epilog=EVAL_EXAMPLES)(eval_command)


def finetune_command(
    ctx: typer.Context,
    base: Annotated[
        str | None, typer.Option(help="Model to fine-tune (name, built-in, dir).")
    ] = None,
    task: Annotated[str | None, typer.Option(help="sft, classify or qa.")] = None,
    data: Annotated[str | None, typer.Option(help="Training file.")] = None,
    name: Annotated[str | None, typer.Option(help="Registry name of the result.")] = None,
    val_data: Annotated[str | None, typer.Option(help="Validation file (same kind).")] = None,
    epochs: Annotated[float | None, typer.Option(help="Passes over the data (default 1).")] = None,
    max_steps: Annotated[
        int | None, typer.Option(help="Optimizer steps (instead of --epochs).")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Examples (rows) per step.")] = None,
    block_size: Annotated[int | None, typer.Option(help="Longest row in tokens.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    warmup: Annotated[int | None, typer.Option(help="Linear warmup steps.")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="AdamW weight decay.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for data order and init.")] = None,
    eval_every: Annotated[int | None, typer.Option(help="Validate every N steps.")] = None,
    ckpt_every: Annotated[int | None, typer.Option(help="Checkpoint every N steps.")] = None,
    dtype: Annotated[str | None, typer.Option(help="fp32 or bf16 (autocast).")] = None,
    time_limit: Annotated[float | None, typer.Option(help="Stop after this many seconds.")] = None,
    labels: Annotated[str | None, typer.Option(help="classify: labels in order, a,b,c.")] = None,
    pooling: Annotated[str | None, typer.Option(help="classify: last or mean.")] = None,
    doc_stride: Annotated[int | None, typer.Option(help="qa: overlap of context windows.")] = None,
    lora: Annotated[bool, typer.Option("--lora", help="Train LoRA adapters only.")] = False,
    lora_rank: Annotated[int | None, typer.Option(help="LoRA rank (default 8).")] = None,
    lora_alpha: Annotated[float | None, typer.Option(help="LoRA alpha (default 16).")] = None,
    lora_targets: Annotated[
        str | None, typer.Option(help="Layers to adapt: q,k,v,o,gate,up,down,lm_head.")
    ] = None,
    lora_dropout: Annotated[
        float | None, typer.Option(help="Dropout on the adapters' input.")
    ] = None,
    merge: Annotated[bool, typer.Option("--merge", help="Also register the merged model.")] = False,
    resume: Annotated[str | None, typer.Option(help="auto or a checkpoint/run dir.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Fine-tune a model for chat (SFT), classification or extractive QA; full or LoRA."""
    from lmforge.config import load_config
    from lmforge.train.finetune import FinetuneConfig

    peak = lr if lr is not None else (5e-4 if lora else 5e-5)
    loop: dict[str, Any] = {
        "max_steps": max_steps if max_steps is not None else 1,  # 1: fixed from --epochs later
        "batch_size": batch_size if batch_size is not None else 16,
        "block_size": block_size if block_size is not None else 512,
        "lr": peak,
        "min_lr": peak / 10,
        "warmup": warmup if warmup is not None else 30,
        "weight_decay": weight_decay if weight_decay is not None else 0.0,
        "seed": seed,
        "eval_every": eval_every if eval_every is not None else 100,
        "ckpt_every": ckpt_every if ckpt_every is not None else 100,
        "dtype": dtype,
        "time_limit": time_limit,
    }
    values: dict[str, Any] = {
        k: v
        for k, v in {
            "base": base,
            "task": task,
            "data": data,
            "name": name,
            "val_data": val_data,
            "epochs": epochs,
            "labels": labels,
            "pooling": pooling,
            "doc_stride": doc_stride,
            "resume": resume,
        }.items()
        if v is not None
    }
    values["loop"] = {k: v for k, v in loop.items() if v is not None}
    lora_values = {
        "enabled": lora,
        "merge": merge,
        "rank": lora_rank,
        "alpha": lora_alpha,
        "targets": lora_targets,
        "dropout": lora_dropout,
    }
    values["lora"] = {k: v for k, v in lora_values.items() if v is not None}
    extra = list(ctx.args)
    if extra and not extra[0].startswith("-"):
        raise LmforgeError(f"unexpected argument {extra[0]!r} (options start with --)")
    config = load_config(FinetuneConfig, overrides=extra, values=values)
    _run_finetune(config, steps_given=max_steps is not None, quiet=quiet)


def _run_finetune(config: Any, *, steps_given: bool, quiet: bool) -> None:
    from lmforge.cli.train import watch_run
    from lmforge.model.formats import load_model
    from lmforge.registry.repo import validate_name
    from lmforge.resolve import resolve
    from lmforge.train.finetune import finetune, plan_finetune
    from lmforge.train.pretrain import prepare_run

    home = lmforge_home()
    validate_name(config.name)
    if not Path(config.data).is_file():
        raise LmforgeError(f"--data {config.data}: no such file")
    ref = resolve(config.base, home=home)
    with err.status(f"loading {ref.name} …"):
        base = load_model(ref.path)
    with err.status("reading and tokenizing the data …"):
        plan = plan_finetune(config, base, _base_spec(ref), steps_given=steps_given)
    run = prepare_run(config, Path(config.data).resolve(), home / "runs")
    what = "resuming" if run.resume else "starting"
    headline = (
        f"{what} {config.task} fine-tune [bold]{escape(run.id)}[/bold]: {plan.examples:,} "
        f"examples, {plan.loop.max_steps:,} steps → {escape(str(run.dir))}"
    )
    result = watch_run(
        run,
        config,
        None,
        lambda on_step: finetune(config, run, plan, on_step=on_step),
        quiet=quiet,
        label="fine-tuning",
        total=plan.loop.max_steps,
        headline=headline,
    )
    if result.result.stopped_early:
        err.print(f"stopped by --time-limit at step {result.result.step}; --resume auto goes on")
        return
    _store(result, config, plan, home, run)


def _base_spec(ref: Any) -> str:
    """How the lineage names the base: a registry ref or built-in name, else the directory."""
    return str(ref.name) if ref.kind in ("registry", "builtin") else str(Path(ref.path).resolve())


def _store(result: Any, config: Any, plan: Any, home: Path, run: Any) -> None:
    from lmforge.atomic import atomic_directory
    from lmforge.cli.models import store_model
    from lmforge.eval.card import write_card
    from lmforge.train.finetune import export_adapter, export_finetuned

    table = Table(title=f"{config.task} fine-tune", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    r = result.result
    table.add_row("run", escape(run.id))
    table.add_row("steps", f"{r.step:,}")
    table.add_row("tokens seen", f"{r.tokens:,}")
    table.add_row("wall time", f"{r.total_seconds:,.1f} s")
    table.add_row("train loss", f"{r.train_loss:.4f}")
    if r.val_loss is not None:
        table.add_row("val loss", f"{r.val_loss:.4f}")
    table.add_row("loss curve", escape(str(run.dir / "loss.png")))
    shape = plan.model.config
    if result.lora is not None:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        target = home / "adapters" / config.name / f"{stamp}-{secrets.token_hex(3)}"
        with atomic_directory(target) as tmp:
            export_adapter(result, tmp)
            write_card(tmp)
        size = (target / "adapter_model.safetensors").stat().st_size
        table.add_row("adapter", f"{escape(str(target))} ({size / 1e6:.1f} MB)")
    if result.lora is None or config.lora.merge:

        def write(tmp: Path) -> None:
            export_finetuned(result, tmp)
            write_card(tmp)

        record = store_model(
            home,
            config.name,
            write,
            arch=shape.arch,
            n_params=sum(p.numel() for p in plan.model.parameters()),
            source=f"run:{run.id}",
            parent=plan.base_ref,
        )
        table.add_row("model", f"[bold]{escape(record.ref)}[/bold] → {escape(str(record.path))}")
        target = Path(record.path)
    out.print(table)
    task = {"sft": "perplexity", "classify": "classify", "qa": "qa"}[config.task]
    out.print(f"evaluate it: lmforge eval {escape(str(target))} --task {task} --data FILE")


# ---------------------------------------------------------------------------------------------
# eval


def eval_command(
    model: Annotated[str, typer.Argument(help="Model: registry name, directory, adapter dir.")],
    task: Annotated[str, typer.Option(help="perplexity, classify, qa or bleu.")],
    data: Annotated[Path, typer.Option(help="The evaluation file.")],
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the result here.")] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N examples.")] = None,
    block_size: Annotated[int, typer.Option(help="perplexity: window length.")] = 512,
    max_tokens: Annotated[int, typer.Option(help="bleu: tokens generated per source.")] = 128,
    ngram: Annotated[int, typer.Option(help="Contamination check: n-gram length.")] = 13,
    no_record: Annotated[
        bool, typer.Option("--no-record", help="Do not store the result (registry, card).")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Score a model on a file: perplexity, classification, extractive QA or BLEU/chrF."""
    from lmforge.data import examples as ex

    tasks = ("perplexity", "classify", "qa", "bleu")
    if task not in tasks:
        raise LmforgeError(f"--task must be one of {', '.join(tasks)}, not {task!r}")
    if limit is not None and limit < 1:
        raise LmforgeError(f"--limit must be at least 1, not {limit}")
    if ngram < 4:
        raise LmforgeError(f"--ngram must be at least 4, not {ngram}")
    readers: dict[str, Callable[[Path], Sequence[Any]]] = {
        "perplexity": ex.read_texts,
        "classify": ex.read_labeled,
        "qa": ex.read_squad,
        "bleu": ex.read_pairs,
    }
    items: list[Any] = list(readers[task](data))[:limit]
    loaded, tokenizer, path, spec = _load_for(model, task)
    started = time.perf_counter()
    metrics = _score(task, loaded, tokenizer, items, block_size, max_tokens, quiet=quiet)
    seconds = time.perf_counter() - started
    contamination = _contamination(spec, task, items, ngram)
    result = {
        "task": task,
        "model": spec,
        "model_path": str(path),
        "data": {
            "path": str(data.resolve()),
            "sha256": ex.file_sha256(data),
            "examples": len(items),
        },
        "metrics": metrics,
        "contamination": contamination,
        "seconds": round(seconds, 3),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if task == "classify":
        result["confusion_png"] = str(_confusion_png(result, path))
    if not no_record:
        _record(result, path)
    if json_out is not None:
        from lmforge.atomic import write_text_atomic

        write_text_atomic(json_out, json.dumps(result, indent=2))
    _print_eval(result)


def _load_for(spec: str, task: str) -> tuple[Any, Any, Path, str]:
    from lmforge.model.formats import (
        head_of,
        is_adapter,
        load_adapter,
        load_head_model,
        load_model,
    )
    from lmforge.model.heads import HeadModel
    from lmforge.model.lora import merge_lora
    from lmforge.resolve import resolve

    ref = resolve(spec)
    path = Path(ref.path)
    wants_head = task in ("classify", "qa")
    with err.status(f"loading {ref.name} …"):
        if path.is_dir() and is_adapter(path):
            model, tokenizer, _, _ = load_adapter(path)
            merge_lora(model.body if isinstance(model, HeadModel) else model)  # type: ignore[arg-type]
            model.eval()
        elif wants_head:
            if head_of(path) is None:
                raise LmforgeError(
                    f"{spec} is a language model; --task {task} needs a model fine-tuned with "
                    f"`lmforge finetune --task {task}`"
                )
            model, tokenizer, _ = load_head_model(path)
        else:
            loaded = load_model(path)
            model, tokenizer = loaded.model, loaded.tokenizer
    head = getattr(model, "head", None)
    if wants_head and (head is None or head.task != task):
        raise LmforgeError(f"{spec} is not a {task} model")
    if not wants_head and head is not None:
        raise LmforgeError(f"{spec} is a {head.task} model; --task {task} needs a language model")
    return model, tokenizer, path, ref.name if ref.kind != "path" else str(path.resolve())


def _score(
    task: str,
    model: Any,
    tokenizer: Any,
    items: list[Any],
    block_size: int,
    max_tokens: int,
    *,
    quiet: bool,
) -> dict[str, Any]:
    from lmforge.eval import tasks as t

    columns = (
        TextColumn(f"[bold]eval {task}[/bold]"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err, disable=quiet or not err.is_terminal) as bar:
        job = bar.add_task(task, total=len(items))

        def progress(n: int) -> None:
            bar.advance(job, n)

        if task == "perplexity":
            return t.eval_perplexity(
                model, tokenizer, items, block_size=block_size, progress=progress
            )
        if task == "classify":
            return t.eval_classify(model, tokenizer, items, progress=progress)
        if task == "qa":
            return t.eval_qa(model, tokenizer, items, progress=progress)
        stop = [i for i in (tokenizer.eos_id,) if i is not None]
        return t.eval_bleu(
            model, tokenizer, items, max_tokens=max_tokens, stop_ids=stop, progress=progress
        )


def _contamination(spec: str, task: str, items: list[Any], n: int) -> dict[str, Any]:
    from lmforge.eval.tasks import eval_texts
    from lmforge.ops.contamination import check_contamination

    with err.status("checking the eval set against the training data …"):
        return check_contamination(spec, eval_texts(task, items), n=n)


def _confusion_png(result: dict[str, Any], model_path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmforge.atomic import write_with

    metrics = result["metrics"]
    labels, matrix = metrics["labels"], metrics["confusion"]
    size = max(3.0, 0.6 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    top = max((max(row) for row in matrix), default=0)
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            color = "white" if value > top / 2 else "black"
            ax.text(j, i, str(value), ha="center", va="center", color=color)
    ax.set_title(f"accuracy {metrics['accuracy']:.4f}")
    fig.tight_layout()
    folder = lmforge_home() / "evals"
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{model_path.name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    target = folder / f"{stem}-{secrets.token_hex(2)}-confusion.png"
    write_with(target, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return target


def _record(result: dict[str, Any], model_path: Path) -> None:
    from lmforge.eval.card import add_eval_result
    from lmforge.registry import evals
    from lmforge.registry.db import connect

    contamination = result["contamination"]
    engine = connect()
    try:
        with engine.begin() as conn:
            evals.record_eval(
                conn,
                model=result["model"],
                model_name=Path(result["model"]).name.split("@")[0],
                model_path=result["model_path"],
                weights_sha256=_weights_sha256(model_path),
                task=result["task"],
                data_path=result["data"]["path"],
                data_sha256=result["data"]["sha256"],
                examples=result["data"]["examples"],
                metrics=result["metrics"],
                contamination_rate=contamination.get("example_rate"),
                contamination=contamination,
                seconds=result["seconds"],
                created_at=result["created_at"],
            )
    finally:
        engine.dispose()
    if model_path.is_dir() and not model_path.is_relative_to(lmforge_home() / "builtin"):
        add_eval_result(model_path, result)


def _weights_sha256(model_path: Path) -> str | None:
    from lmforge.model.formats import read_lineage

    sha = read_lineage(model_path).get("weights_sha256") if model_path.is_dir() else None
    return sha if isinstance(sha, str) else None


def _print_eval(result: dict[str, Any]) -> None:
    from lmforge.eval.tasks import headline

    task, metrics, c = result["task"], result["metrics"], result["contamination"]
    out.print(
        f"[bold]{escape(result['model'])}[/bold] · {task} · {result['data']['examples']:,} examples"
    )
    out.print(headline(task, metrics))
    if task == "classify":
        table = Table("label", "precision", "recall", "f1", "support", title="per label")
        for label, row in metrics["per_label"].items():
            table.add_row(
                escape(label),
                f"{row['precision']:.4f}",
                f"{row['recall']:.4f}",
                f"{row['f1']:.4f}",
                str(int(row["support"])),
            )
        out.print(table)
        out.print(f"confusion matrix: {escape(result['confusion_png'])}")
    rate = c.get("example_rate")
    checked = sum(1 for s in c.get("sources", []) if s.get("status") == "checked")
    note = "" if c.get("complete") else " (incomplete: some training data is unknown or missing)"
    if rate is not None and not math.isnan(rate):
        out.print(
            f"contamination: {100 * rate:.2f}% of examples share a {c['n']}-gram with the training "
            f"data ({checked} source(s) checked){note}"
        )
