"""A pipeline file: its name, its stages in order, and what each stage runs.

    name: shakespeare
    stages:
      data:     {sources: [input.txt], name: shakes, tokenizer: char, split: tail}
      train:    {data: shakes, model: nanogpt-shakespeare-cpu, name: shakes, max_steps: 200}
      eval:     {model: shakes, task: perplexity, data: held-out.txt}
      quantize: {model: shakes, method: int8, name: shakes-int8}
      price:    {model: shakes-int8, input: 0.10, output: 0.40}
      serve:    {port: 8000}
    report: {hourly_usd: 0.40, margin: 0.6}

Each stage is one `lmforge` command and its options are that command's options, spelled with
`_` or `-` (`max_steps: 200` is `--max-steps 200`; `true` is the bare flag, a list repeats the
option). A stage's key is its id and names its kind (`data`, `train`, `finetune`, `distill`,
`eval`, `quantize`, `register`, `price`, `serve`); a second stage of one kind takes another id
and says `uses: eval`. Relative file paths are read from the pipeline file's folder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from lmforge.config import read_yaml
from lmforge.errors import LmforgeError
from lmforge.registry.repo import NAME_PATTERN

_ID = re.compile(r"[a-z][a-z0-9_-]{0,39}")


@dataclass(frozen=True)
class Kind:
    """What a kind of stage runs and which of its options name artifacts."""

    command: tuple[str, ...]
    positional: tuple[str, ...] = ()  # options given as arguments, in this order
    optional: tuple[str, ...] = ()  # positional options that may be left out
    paths: tuple[str, ...] = ()  # options holding file paths (read from the pipeline's folder)
    produces: str | None = None  # the option naming the artifact the stage makes
    artifact: str | None = None  # "dataset" | "model": what `produces` names
    consumes: tuple[tuple[str, str], ...] = ()  # (option, "dataset" | "model") it reads
    resumable: bool = False  # an interrupted run goes on with `--resume auto`
    reads_evals: bool = False  # also runs after an eval stage of the model it reads
    serves: bool = False  # runs until stopped: always last, never skipped


KINDS: dict[str, Kind] = {
    "data": Kind(
        ("data", "prepare"),
        positional=("sources",),
        paths=("sources",),
        produces="name",
        artifact="dataset",
    ),
    "train": Kind(
        ("train",),
        paths=("config",),
        produces="name",
        artifact="model",
        consumes=(("data", "dataset"), ("init_from", "model")),
        resumable=True,
    ),
    "finetune": Kind(
        ("finetune",),
        paths=("data", "val_data"),
        produces="name",
        artifact="model",
        consumes=(("base", "model"),),
        resumable=True,
    ),
    "distill": Kind(
        ("distill",),
        paths=("config",),
        produces="name",
        artifact="model",
        consumes=(("teacher", "model"), ("data", "dataset")),
        resumable=True,
    ),
    "eval": Kind(("eval",), positional=("model",), paths=("data",), consumes=(("model", "model"),)),
    "quantize": Kind(
        ("quantize",),
        positional=("model",),
        produces="name",
        artifact="model",
        consumes=(("model", "model"),),
    ),
    "register": Kind(
        ("models", "promote"),
        positional=("model",),
        consumes=(("model", "model"),),
        reads_evals=True,
    ),
    "price": Kind(("models", "price"), positional=("model",), consumes=(("model", "model"),)),
    "serve": Kind(
        ("serve",),
        positional=("model",),
        optional=("model",),
        consumes=(("model", "model"),),
        serves=True,
    ),
}


@dataclass(frozen=True)
class Stage:
    id: str
    kind: str
    options: dict[str, Any]  # as written, keys with `_`; paths already made absolute

    @property
    def spec(self) -> Kind:
        return KINDS[self.kind]

    @property
    def output(self) -> tuple[str, str] | None:
        """(artifact, name) of what this stage makes, if it makes something."""
        key, artifact = self.spec.produces, self.spec.artifact
        return None if key is None or artifact is None else (artifact, str(self.options[key]))

    def consumed(self) -> list[tuple[str, str]]:
        """(artifact, name) of every model and data set this stage reads."""
        out = []
        for key, artifact in self.spec.consumes:
            value = self.options.get(key)
            if isinstance(value, str):
                out.append((artifact, value))
        return out

    def argv(self) -> list[str]:
        """The `lmforge` command line this stage runs."""
        argv = list(self.spec.command)
        for key in self.spec.positional:
            value = self.options.get(key)
            if isinstance(value, list):
                argv += [str(v) for v in value]
            elif value is not None:
                argv.append(str(value))
        for key, value in self.options.items():
            if key in self.spec.positional or value is None:
                continue
            name = key.replace("_", "-")
            flag = f"--{name}"
            if value is True:
                argv.append(flag)
            elif value is False:
                argv.append(f"--no-{name}")
            elif isinstance(value, list):
                for item in value:
                    argv += [flag, str(item)]
            else:
                argv += [flag, str(value)]
        return argv


@dataclass(frozen=True)
class ReportSettings:
    """How the report prices things (`lmforge economics`' options)."""

    hourly_usd: float = 0.40
    margin: float = 0.6
    measure_seconds: float = 3.0  # serving throughput measured for the economics table


@dataclass(frozen=True)
class Pipeline:
    name: str
    path: Path
    stages: list[Stage]
    report: ReportSettings = field(default_factory=ReportSettings)

    def stage(self, stage_id: str) -> Stage:
        for s in self.stages:
            if s.id == stage_id:
                return s
        raise LmforgeError(
            f"no stage {stage_id!r} in {self.path.name}; its stages: "
            + ", ".join(s.id for s in self.stages)
        )


def load_pipeline(path: str | Path) -> Pipeline:
    """Read and check the pipeline file PATH; every problem is one line naming the stage."""
    p = Path(path).expanduser()
    raw = read_yaml(p)
    unknown = sorted(set(raw) - {"name", "stages", "report"})
    if unknown:
        raise LmforgeError(f"{p}: unknown key(s) {', '.join(unknown)} (want name, stages, report)")
    name = raw.get("name", p.stem.lower())
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise LmforgeError(f"{p}: name must be 1-64 of a-z 0-9 . _ - , got {name!r}")
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, dict) or not stages_raw:
        raise LmforgeError(f"{p}: 'stages' must be a mapping of stage id to its options")
    base = p.resolve().parent
    stages = [_stage(p, base, sid, opts) for sid, opts in stages_raw.items()]
    for s in stages[:-1]:
        if s.spec.serves:
            raise LmforgeError(f"{p}: stage {s.id!r} serves until stopped, so it must come last")
    outputs: dict[tuple[str, str], str] = {}
    for s in stages:
        if s.output is not None:
            if s.output in outputs:
                raise LmforgeError(
                    f"{p}: stages {outputs[s.output]!r} and {s.id!r} both make the "
                    f"{s.output[0]} {s.output[1]!r}"
                )
            outputs[s.output] = s.id
    return Pipeline(name, p.resolve(), stages, _report(p, raw.get("report")))


def _stage(path: Path, base: Path, stage_id: Any, options: Any) -> Stage:
    if not isinstance(stage_id, str) or not _ID.fullmatch(stage_id):
        raise LmforgeError(f"{path}: stage id {stage_id!r} must be a-z 0-9 _ - starting with a-z")
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise LmforgeError(f"{path}: stage {stage_id!r} must be a mapping of its options")
    opts = {str(k).replace("-", "_"): v for k, v in options.items()}
    kind = opts.pop("uses", stage_id)
    if kind not in KINDS:
        raise LmforgeError(
            f"{path}: stage {stage_id!r} has no kind: its id or 'uses:' must be one of "
            + ", ".join(KINDS)
        )
    spec = KINDS[kind]
    for key, value in opts.items():
        if isinstance(value, dict) or (
            isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value)
        ):
            raise LmforgeError(
                f"{path}: stage {stage_id!r} option {key!r} must be a value or a list of values"
            )
    required = [k for k in spec.positional if k not in spec.optional]
    for key in required + ([spec.produces] if spec.produces else []):
        if opts.get(key) in (None, "", []):
            raise LmforgeError(f"{path}: stage {stage_id!r} ({kind}) needs '{key}'")
    for key in spec.paths:
        if key in opts and opts[key] is not None:
            value = opts[key]
            opts[key] = (
                [_absolute(base, v) for v in value]
                if isinstance(value, list)
                else _absolute(base, value)
            )
    return Stage(stage_id, kind, opts)


def _absolute(base: Path, value: Any) -> str:
    p = Path(str(value)).expanduser()
    return str(p if p.is_absolute() else base / p)


def _report(path: Path, raw: Any) -> ReportSettings:
    if raw is None:
        return ReportSettings()
    if not isinstance(raw, dict):
        raise LmforgeError(f"{path}: 'report' must be a mapping")
    unknown = sorted(set(raw) - {f.name for f in fields(ReportSettings)})
    if unknown:
        raise LmforgeError(f"{path}: unknown report key(s) {', '.join(unknown)}")
    values = {}
    for key, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise LmforgeError(f"{path}: report.{key} must be a number ≥ 0, got {value!r}")
        values[key] = float(value)
    return ReportSettings(**values)
