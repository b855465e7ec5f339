"""`lmforge distill`: train a small student on a data set against a teacher model's outputs.

The run is `lmforge train`'s (`cli/train.py`: the same options, YAML file and `--section.field=
value` overrides, progress bar, loss.png, checkpoints and `--resume`, registration) with the loss
of `train/distill.py`: alpha · T² · KL(teacher ‖ student at temperature T) + (1 − alpha) ·
next-token cross-entropy. The data set must be tokenized with the teacher's tokenizer
(`lmforge data prepare … --tokenizer TEACHER`); the student is a named model config built with
that vocabulary. The registered student names the teacher as its parent, so `lmforge lineage
STUDENT` shows the teacher's own lineage below it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from lmforge.cli.train import err, load_stage_config, run_training, with_train_options
from lmforge.errors import LmforgeError
from lmforge.home import lmforge_home

EXAMPLES = """[bold]Examples[/bold]

  lmforge data prepare web.jsonl --name web-smol --tokenizer smollm2-135m-instruct

  lmforge distill --teacher smollm2-135m-instruct --student small --data web-smol
  --name web-student --max-steps 2000 --temperature 2 --alpha 0.5

  lmforge train --data words --model small --name words-teacher

  lmforge distill --teacher words-teacher --student tiny --data words --name words-tiny
  --alpha 0.9 --arch.n_layer=1

  lmforge distill --config distill.yaml --loop.batch_size=32 --resume auto

[bold]Loss[/bold]: alpha · T² · KL(softmax(teacher/T) ‖ softmax(student/T)) + (1 − alpha) ·
cross-entropy with the next tokens; alpha 0 is plain `lmforge train`. The val loss is the plain
cross-entropy (comparable with `lmforge train`'s); the summary adds the KL to the teacher.
[bold]Student configs[/bold]: nanogpt-shakespeare-cpu, tiny, small, llama-small, gpt2-124m, lstm;
[bold]--arch.field=value[/bold] and [bold]--loop.field=value[/bold] as for `lmforge train`.
"""


def register(app: typer.Typer) -> None:
    app.command(
        "distill",
        epilog=EXAMPLES,
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )(with_train_options(distill_command))


def distill_command(
    ctx: typer.Context,
    teacher: Annotated[
        str | None, typer.Option(help="Model to distill: registry name, built-in or directory.")
    ] = None,
    student: Annotated[
        str | None, typer.Option(help="Student model config: tiny, small, llama-small, lstm, …")
    ] = None,
    data: Annotated[
        str | None, typer.Option(help="Data set (tokenized with the teacher's tokenizer).")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Registry name of the student.")] = None,
    temperature: Annotated[
        float | None, typer.Option(help="Softmax temperature T of the KL term (default 2).")
    ] = None,
    alpha: Annotated[
        float | None, typer.Option(help="Weight of the KL term in [0, 1] (default 0.5).")
    ] = None,
    *,
    options: dict[str, Any],
) -> None:
    """Distill a teacher model into a smaller student on a prepared data set."""
    from lmforge.train.distill import DistillConfig

    flags = {
        "teacher": teacher,
        "student": student,
        "data": data,
        "name": name,
        "temperature": temperature,
        "alpha": alpha,
    }
    config = load_stage_config(DistillConfig, ctx, flags, options)
    run_training(config, quiet=options["quiet"], stage=_run)


def _run(config: Any, dist: Any, *, quiet: bool) -> None:
    from lmforge.cli.data import dataset_path
    from lmforge.cli.train import finish_run, watch_run
    from lmforge.registry.repo import validate_name
    from lmforge.train.distill import distill, plan_distill
    from lmforge.train.pretrain import prepare_run

    home = lmforge_home()
    validate_name(config.name)
    dataset_dir = dataset_path(config.data)
    teacher, teacher_ref = _load_teacher(config.teacher, home)
    plan = plan_distill(config, dataset_dir, teacher, teacher_ref, dist=dist)
    run = prepare_run(config, dataset_dir, home / "runs", dist)
    result = watch_run(
        run,
        config,
        dist,
        lambda on_step: distill(config, run, plan, on_step=on_step, dist=dist),
        quiet=quiet,
        label="distilling",
    )
    if dist.is_main:
        finish_run(result, config, run, home, parent=teacher_ref)


def _load_teacher(spec: str, home: Path) -> tuple[Any, str]:
    """The teacher, loaded, and how the lineage names it (registry ref, built-in or path)."""
    from lmforge.cli.finetune import _base_spec
    from lmforge.model.formats import head_of, is_adapter, load_model
    from lmforge.resolve import resolve

    ref = resolve(spec, home=home)
    path = Path(ref.path)
    if path.is_dir() and is_adapter(path):
        raise LmforgeError(
            f"--teacher {spec} is a LoRA adapter directory: register the merged model "
            "(`lmforge finetune … --merge` or `lmforge models merge`) and distill that"
        )
    head = head_of(path)
    if head is not None:
        raise LmforgeError(
            f"--teacher {spec} is a {head.task} model; the teacher must be a causal language model"
        )
    with err.status(f"loading {ref.name} …"):
        loaded = load_model(path)
    return loaded, _base_spec(ref)
