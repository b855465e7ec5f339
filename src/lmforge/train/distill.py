"""Knowledge distillation as a stage: a student pretrained on a data set against a teacher's
next-token distributions.

    config = DistillConfig(teacher="smollm2-135m-instruct", student="tiny", data="web",
                           name="web-tiny", temperature=2.0, alpha=0.5)
    plan = plan_distill(config, dataset_dir, teacher, "smollm2-135m-instruct")  # no writes
    run = prepare_run(config, dataset_dir, runs_dir)    # train/pretrain.py's run directories
    result = distill(config, run, plan, on_step=observer)
    export_model(result, target_dir)                    # pretrain's: HF layout + lmforge.json

Everything but the loss is pretraining's: the student is built as `lmforge train --model
STUDENT` builds it (a named config with `arch.*` overrides, the data set's vocabulary, weights
from the seed), trained on the same random windows through the one loop, checkpointed and
resumed the same way. The loss is `tasks.Distillation`'s: alpha · T² · KL(teacher ‖ student at
temperature T) + (1 − alpha) · next-token cross-entropy. The teacher is loaded by the caller,
frozen, and never checkpointed; the data set must be tokenized with its tokenizer (`lmforge data
prepare --tokenizer TEACHER`).

The student's `lmforge.json` records `"stage": "distill"`, the teacher as its `parent` (so
`lmforge lineage` and the contamination check walk into the teacher's own lineage) and under
`teacher` (name, path, weights sha256), the temperature and alpha under `distill`, the data set
as pretraining does, and the validation KL to the teacher beside the usual losses. The val loss
is the plain next-token cross-entropy, comparable with `lmforge train`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lmforge.config import to_dict
from lmforge.errors import LmforgeError
from lmforge.model.formats import WEIGHTS_FILE, LoadedModel, file_sha256
from lmforge.tokenizer import Tokenizer
from lmforge.train.distributed import Distributed
from lmforge.train.loop import LoopConfig, StepCallback, with_block_size
from lmforge.train.pretrain import (
    ArchOverrides,
    Plan,
    PretrainResult,
    Run,
    TrainConfig,
    check_same_tokenizer,
    finish_run,
    plan_training,
    read_run_file,
    run_lineage,
    train_in_run,
    write_run_file,
)
from lmforge.train.tasks import Distillation, TokenWindows, check_distill_settings


@dataclass
class DistillConfig:
    """Everything `lmforge distill` needs; flags, YAML keys and `--section.field=value` map here."""

    data: str = ""
    """Data set name or directory, tokenized with the teacher's tokenizer."""
    teacher: str = ""
    """The model to distill (registry name, built-in or directory): a causal language model."""
    student: str = ""
    """Named model config of the student (`tiny`, `small`, …), as `lmforge train --model`."""
    name: str = ""
    """Registry name of the student."""
    temperature: float = 2.0
    """Softmax temperature of both distributions in the KL term."""
    alpha: float = 0.5
    """Weight of the KL term; 1 − alpha weighs the next-token cross-entropy."""
    resume: str | None = None
    """`auto` (the newest unfinished run of this name) or a checkpoint / run directory."""
    strategy: Literal["single", "ddp", "fsdp"] = "single"
    arch: ArchOverrides = field(default_factory=ArchOverrides)
    loop: LoopConfig = field(default_factory=LoopConfig)

    def __post_init__(self) -> None:
        if not self.teacher:
            raise LmforgeError("--teacher is required (the model to distill)")
        if not self.student:
            raise LmforgeError("--student is required (a model config: tiny, small, …)")
        check_distill_settings(self.temperature, self.alpha)
        self.student_config()  # --data and --name

    def student_config(self) -> TrainConfig:
        """The `lmforge train` config that builds (and, with alpha 0, trains) the same student."""
        return TrainConfig(
            data=self.data,
            model=self.student,
            name=self.name,
            resume=self.resume,
            strategy=self.strategy,
            arch=self.arch,
            loop=self.loop,
        )


@dataclass
class DistillPlan:
    """What a distillation run trains, checked before anything is written."""

    student: Plan  # the student and the data set's splits, as pretraining plans them
    data: Distillation
    teacher: dict[str, Any]  # name, path, weights sha256, … as lmforge.json records it


def plan_distill(
    config: DistillConfig,
    dataset_dir: Path,
    teacher: LoadedModel,
    teacher_ref: str,
    *,
    dist: Distributed | None = None,
) -> DistillPlan:
    """The student, the splits and the teacher for CONFIG; every mismatch is an error here.

    TEACHER_REF is how the lineage names the teacher (a registry ref, built-in name or path).
    """
    check_same_tokenizer(Tokenizer.load(dataset_dir), teacher.tokenizer, teacher_ref, "--teacher")
    student = plan_training(config.student_config(), dataset_dir, dist=dist)
    windows = TokenWindows(student.train_split, student.val_split)
    data = Distillation(windows, teacher.model, config.temperature, config.alpha)
    loop = with_block_size(config.loop, student.model)
    data.check(student.model, loop.batch_size, loop.block_size)
    shape = teacher.model.config
    record = {
        "name": teacher_ref,
        "path": str(Path(teacher.path).resolve()),
        "weights_sha256": _weights_sha256(teacher),
        "arch": shape.arch,
        "n_params": sum(p.numel() for p in teacher.model.parameters()),
        "vocab_size": shape.vocab_size,
    }
    return DistillPlan(student, data, record)


def distill(
    config: DistillConfig,
    run: Run,
    plan: DistillPlan,
    *,
    on_step: StepCallback | None = None,
    dist: Distributed | None = None,
) -> PretrainResult:
    """Train PLAN's student against its teacher in RUN's directory (resuming as run.resume says).

    A resumed run must have the teacher it started with (the same weights; the spec may differ,
    e.g. `t` then `t@1`), else the losses after the cut would silently come from another teacher.
    """
    dist = dist or Distributed()
    _check_same_teacher(run, plan.teacher)
    if dist.is_main:
        write_run_file(run.dir, teacher=plan.teacher)
    model, result = train_in_run(
        plan.student, plan.data, config.loop, run, on_step=on_step, dist=dist
    )
    lineage = run_lineage(config.student_config(), run, result, model, init_ref=None, dist=dist)
    lineage.update(
        stage="distill",
        parent=plan.teacher["name"],
        parent_path=plan.teacher["path"],
        teacher=plan.teacher,
        distill={"temperature": config.temperature, "alpha": config.alpha},
        config=to_dict(config),
    )
    if dist.is_main and result.val_loss is not None:
        loop = with_block_size(config.loop, model)
        lineage["eval"]["val_kl_to_teacher"] = plan.data.teacher_kl(
            model, loop.batch_size, loop.block_size, loop.eval_batches
        )
    finish_run(run, result, lineage, dist)
    return PretrainResult(model, plan.student.tokenizer, result, lineage)


def _check_same_teacher(run: Run, teacher: dict[str, Any]) -> None:
    if run.resume is False:
        return
    recorded = read_run_file(run.dir).get("teacher")
    if not isinstance(recorded, dict):
        return
    before, now = recorded.get("weights_sha256"), teacher.get("weights_sha256")
    if before != now:
        raise LmforgeError(
            f"run {run.id} was distilled from {recorded.get('name')} (weights sha256 "
            f"{str(before)[:12]}…), not from {teacher['name']} ({str(now)[:12]}…); resume with "
            "the same teacher or start a new run without --resume"
        )


def _weights_sha256(teacher: LoadedModel) -> str | None:
    """As lmforge.json recorded it; else the hash of the weights file (a Hugging Face download,
    a GGUF file); None for sharded weights."""
    recorded = teacher.lineage.get("weights_sha256")
    if isinstance(recorded, str):
        return recorded
    path = Path(teacher.path)
    weights = path if path.is_file() else path / WEIGHTS_FILE
    return file_sha256(weights) if weights.is_file() else None
