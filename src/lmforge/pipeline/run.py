"""Plan and run a pipeline: skip what is unchanged, resume what was interrupted.

A stage's fingerprint is the sha256 of its kind, its options (file paths replaced by the
content hash of the file or folder) and the identity of every artifact it reads: the output an
earlier stage of this pipeline recorded, or, for a model or data set made elsewhere, what the
registry holds now. A stage is skipped when its last run finished with the same fingerprint and
its output is still what that run made (the model version, the data set manifest); else it runs,
and every stage reading its output runs after it. A stage that was interrupted (killed, Ctrl-C)
is still marked running in the state file, so the next run goes on there — with `--resume auto`
for training stages, which continues from the last checkpoint.

The state is `$LMFORGE_HOME/pipelines/<name>/state.json`, rewritten atomically after every
change. Commands run through the EXECUTE callback (the CLI passes its own entry point), so this
module knows stages and files but not the command line's code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lmforge.atomic import write_text_atomic
from lmforge.errors import LmforgeError
from lmforge.pipeline.spec import Pipeline, Stage
from lmforge.registry import evals, repo
from lmforge.registry.db import read_existing

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
INTERRUPTED = 130  # the exit code of a command stopped by Ctrl-C (`cli.main`)


def pipeline_dir(home: Path, name: str) -> Path:
    return home / "pipelines" / name


@dataclass
class StageState:
    fingerprint: str
    status: str  # "running" | "done" | "failed"
    argv: list[str]
    output: str | None = None  # identity of what the stage made (see `output_identity`)
    started_at: float = 0.0
    seconds: float | None = None


@dataclass
class PipelineState:
    path: Path
    stages: dict[str, StageState] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> PipelineState:
        if not path.exists():
            return cls(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            stages = {k: StageState(**v) for k, v in raw["stages"].items()}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LmforgeError(f"{path}: unreadable pipeline state ({exc}); delete it") from None
        return cls(path, stages)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = {"stages": {k: asdict(v) for k, v in self.stages.items()}}
        write_text_atomic(self.path, json.dumps(body, indent=2) + "\n")


@dataclass(frozen=True)
class Step:
    """What the plan does with one stage, and why."""

    stage: Stage
    action: str  # "run" | "resume" | "skip" | "serve"
    reason: str
    fingerprint: str
    argv: list[str]


HashMemo = dict[tuple[Any, ...], str]
"""Content hashes already computed, keyed by the files' paths, sizes and mtimes."""


def plan(
    pipeline: Pipeline, state: PipelineState, home: Path, *, hashes: HashMemo | None = None
) -> list[Step]:
    """What running PIPELINE now would do, stage by stage (nothing is run). HASHES carries
    the input files' content hashes from one plan to the next (a run re-plans before every
    stage; an unchanged file is not read again)."""
    made: dict[tuple[str, str], str] = {}  # (artifact, name) → the stage that makes it
    reruns: set[str] = set()  # stages that will run
    recorded: dict[str, str | None] = {}  # stage id → its recorded output (skipped stages)
    steps = []
    for stage in pipeline.stages:
        upstream = [made[n] for n in stage.consumed() if n in made]
        inputs: dict[str, str | None] = {
            f"{artifact} {name}": (
                f"stage {made[(artifact, name)]}: {recorded.get(made[(artifact, name)])}"
                if (artifact, name) in made
                else external_identity(artifact, name, home)
            )
            for artifact, name in stage.consumed()
        }
        if stage.spec.reads_evals:  # the evals of the model it reads are inputs too
            for earlier in pipeline.stages[: pipeline.stages.index(stage)]:
                if earlier.kind == "eval" and set(earlier.consumed()) & set(stage.consumed()):
                    upstream.append(earlier.id)
                    inputs[f"stage {earlier.id}"] = recorded.get(earlier.id)
        waiting = [u for u in upstream if u in reruns]
        fp = fingerprint(stage, inputs, hashes)
        argv = stage.argv()
        prev = state.stages.get(stage.id)
        if stage.spec.serves:
            action, reason = "serve", "serves until stopped"
        elif waiting:
            action, reason = "run", f"after {', '.join(waiting)}"
        elif prev is None:
            action, reason = "run", "never ran"
        elif prev.fingerprint != fp:
            action, reason = "run", "options or inputs changed"
        elif prev.status == "running" and stage.spec.resumable:
            action, reason = "resume", "interrupted: goes on from its last checkpoint"
        elif prev.status != "done":
            action, reason = "run", f"last run {prev.status}"
        elif prev.output != output_identity(stage, home):
            action, reason = "run", "its output changed or is gone"
        else:
            action, reason = "skip", "unchanged"
        if action == "resume":
            argv = [*argv, "--resume", "auto"]
        if action in ("run", "resume"):
            reruns.add(stage.id)
        else:
            recorded[stage.id] = prev.output if prev is not None else None
        if stage.output is not None:
            made[stage.output] = stage.id
        steps.append(Step(stage, action, reason, fp, argv))
    return steps


def run_pipeline(
    pipeline: Pipeline,
    *,
    home: Path,
    execute: Callable[[list[str]], int],
    until: str | None = None,
    before_serve: Callable[[PipelineState], None] | None = None,
) -> tuple[list[Step], PipelineState]:
    """Run PIPELINE's stages (up to and including UNTIL) that the plan does not skip.

    EXECUTE runs one `lmforge` command line and returns its exit code. BEFORE_SERVE is called
    once every other stage is done, before a serve stage starts (the report is written there).
    Raises LmforgeError naming the stage that failed; the stages before it stay done."""
    state = PipelineState.load(pipeline_dir(home, pipeline.name) / STATE_FILE)
    stop = pipeline.stage(until).id if until else None
    done: list[Step] = []
    for step in _planned(pipeline, state, home):
        if step.action == "serve" and before_serve is not None:
            before_serve(state)
        if step.action == "skip":
            log.info("stage %s: skipped (%s)", step.stage.id, step.reason)
        else:
            _execute(step, state, home, execute)
        done.append(step)
        if step.stage.id == stop:
            break
    if before_serve is not None and not any(s.action == "serve" for s in done):
        before_serve(state)
    return done, state


def _planned(pipeline: Pipeline, state: PipelineState, home: Path) -> Iterator[Step]:
    """The plan's steps, re-made before each: a stage that ran changes what its readers see."""
    hashes: HashMemo = {}
    for index in range(len(pipeline.stages)):
        yield plan(pipeline, state, home, hashes=hashes)[index]


def _execute(
    step: Step, state: PipelineState, home: Path, execute: Callable[[list[str]], int]
) -> None:
    stage = step.stage
    entry = StageState(step.fingerprint, "running", step.argv, started_at=time.time())
    state.stages[stage.id] = entry
    state.save()
    started = time.perf_counter()
    code = execute(step.argv)
    entry.seconds = round(time.perf_counter() - started, 3)
    if code == INTERRUPTED:  # Ctrl-C: left "running", so the next run resumes it
        raise KeyboardInterrupt
    if code != 0:
        entry.status = "failed"
        state.save()
        raise LmforgeError(
            f"stage {stage.id!r} failed (exit {code}): fix it and run the pipeline again "
            "(finished stages are skipped)"
        )
    entry.status = "done"
    entry.output = output_identity(stage, home)
    state.save()


# ---------------------------------------------------------------------------------------------
# Identities and fingerprints


def fingerprint(stage: Stage, inputs: dict[str, str | None], hashes: HashMemo | None = None) -> str:
    memo: HashMemo = {} if hashes is None else hashes
    options = {
        key: (
            [_content_hash(v, memo) for v in value]
            if isinstance(value, list)
            else _content_hash(value, memo)
        )
        if key in stage.spec.paths
        else value
        for key, value in stage.options.items()
    }
    body = json.dumps({"kind": stage.kind, "options": options, "inputs": inputs}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


def output_identity(stage: Stage, home: Path) -> str | None:
    """What STAGE's last run made, as it is now: None for stages that make nothing to check."""
    if stage.output is not None:
        return external_identity(*stage.output, home)
    if stage.kind == "eval":
        found = newest_eval(stage, home)
        return None if found is None else f"eval {found.id}"
    return None


def newest_eval(stage: Stage, home: Path) -> evals.EvalRecord | None:
    """The newest recorded result of eval stage STAGE's model and task."""
    with read_existing(home=home) as conn:
        if conn is None:
            return None
        found = evals.list_evals(conn, model_name=str(stage.options["model"]).split("@")[0],
                                 task=stage.options.get("task"), limit=1)  # fmt: skip
    return found[0] if found else None


def external_identity(artifact: str, name: str, home: Path) -> str | None:
    """The data set or model (ARTIFACT) NAME as $LMFORGE_HOME and the registry hold it now;
    None when there is none (or it is a built-in model, whose weights never change)."""
    if artifact == "dataset":
        manifest = home / "datasets" / name / "manifest.json"
        if not manifest.is_file():
            return None
        return "dataset sha256:" + hashlib.sha256(manifest.read_bytes()).hexdigest()
    ref, _, version = name.partition("@")
    with read_existing(home=home) as conn:
        if conn is None:
            return None
        record = repo.get_model(conn, name=ref, version=int(version) if version.isdigit() else None)
    return None if record is None else f"model {record.ref} sha256:{record.sha256}"


def _content_hash(value: Any, memo: HashMemo) -> str:
    """sha256 of the file (or of every file under the folder) VALUE names; VALUE itself if it
    names nothing (the command will say what is wrong). Files whose path, size and mtime are
    in MEMO are not read again."""
    p = Path(str(value))
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file())
    else:
        return str(value)
    key = (str(p), *((str(f), st.st_size, st.st_mtime_ns) for f in files for st in [f.stat()]))
    if key in memo:
        return memo[key]
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(p) if f != p else f.name).encode())
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    memo[key] = "sha256:" + h.hexdigest()
    return memo[key]
