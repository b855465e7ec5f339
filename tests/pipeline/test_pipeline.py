"""`lmforge pipeline run`: a tiny real chain (data → train → eval → quantize → price) end to
end, skipped when nothing changed, re-run from the stage that changed, resumed after a killed
training stage, and every bad pipeline file refused in one line."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest import (
    assert_one_line_error,
    free_port,
    lmforge,
    lmforge_here,
    lmforge_popen,
    syllable_text,
)
from lmforge.pipeline.run import STATE_FILE, PipelineState, pipeline_dir, plan
from lmforge.pipeline.spec import load_pipeline
from lmforge.registry import evals, repo
from lmforge.registry.db import read_existing
from lmforge.resolve import alias_target

PROBE = "<img src=x onerror=alert(1)>.txt"  # a source file name that is also HTML
TINY_TRAIN = {"model": "tiny", "batch_size": 4, "block_size": 32, "eval_batches": 1, "quiet": True}


def write_pipeline(folder: Path, *, steps: int = 3, corpus: str = "corpus.txt") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / corpus).exists():
        (folder / corpus).write_text(syllable_text(200, 0))
    (folder / "held-out.txt").write_text(syllable_text(30, 1))
    spec = {
        "name": "tiny",
        "stages": {
            "data": {"sources": [corpus], "name": "words", "tokenizer": "char", "split": "tail",
                     "workers": 1, "quiet": True},
            "train": {"data": "words", "name": "words", "max_steps": steps, **TINY_TRAIN},
            "eval": {"model": "words", "task": "perplexity", "data": "held-out.txt",
                     "block_size": 32, "quiet": True},
            "register": {"model": "words", "alias": "prod", "require": ["perplexity<1000"]},
            "quantize": {"model": "words", "method": "int8", "head": "float", "name": "words-q8"},
            "price": {"model": "words-q8", "input": 0.1, "output": 0.4},
        },
        "report": {"measure_seconds": 0.5},
    }  # fmt: skip
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def flat(text: str) -> str:
    """TEXT with rich's line wrapping undone."""
    return " ".join(text.split())


def versions(home: Path, name: str) -> list[int]:
    with read_existing(home=home) as conn:
        return [] if conn is None else [r.version for r in repo.list_versions(conn, name=name)]


def test_runs_reports_skips_and_reruns_what_changed(
    tmp_path: Path, lmforge_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_pipeline(tmp_path / "project", corpus=PROBE)

    dry = lmforge_here(capsys, "pipeline", "run", str(path), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "never ran" in dry.stdout and versions(lmforge_home, "words") == []

    first = lmforge_here(capsys, "pipeline", "run", str(path))
    assert first.returncode == 0, first.stderr
    assert "ran data, train, eval, register, quantize, price" in flat(first.stdout)
    assert alias_target("prod", lmforge_home) == ("words", 1)
    assert versions(lmforge_home, "words") == [1] and versions(lmforge_home, "words-q8") == [1]

    out = pipeline_dir(lmforge_home, "tiny")
    state = json.loads((out / STATE_FILE).read_text())["stages"]
    assert {k: v["status"] for k, v in state.items()} == dict.fromkeys(
        ["data", "train", "eval", "register", "quantize", "price"], "done"
    )
    # The report shows what the stages recorded.
    with read_existing(home=lmforge_home) as conn:
        assert conn is not None
        ppl = evals.list_evals(conn, model_name="words", task="perplexity")[0].metrics["perplexity"]
    md = (out / "report.md").read_text()
    for needle in ("## Data funnel: words", "## Loss: train", "## Evaluation", f"{ppl:,.4g}",
                   "## Economics: words-q8@1", "$0.10 in / $0.40 out", "## Lineage"):  # fmt: skip
        assert needle in md, needle
    assert (out / "loss-train.png").read_bytes()[:4] == b"\x89PNG"
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page and "http://" not in page and "https://" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;.txt" in page and "<img src=x" not in page

    # Nothing changed: every stage is skipped and nothing new is registered.
    again = lmforge_here(capsys, "pipeline", "run", str(path))
    assert again.returncode == 0, again.stderr
    assert "ran nothing" in again.stdout
    assert versions(lmforge_home, "words") == [1] and versions(lmforge_home, "words-q8") == [1]

    # One option of train changed: data is skipped, train and everything after it run.
    write_pipeline(tmp_path / "project", steps=4, corpus=PROBE)
    steps = plan(load_pipeline(path), PipelineState.load(out / STATE_FILE), lmforge_home)
    assert [(s.stage.id, s.action) for s in steps] == [
        ("data", "skip"), ("train", "run"), ("eval", "run"), ("register", "run"),
        ("quantize", "run"), ("price", "run"),
    ]  # fmt: skip
    assert steps[1].reason == "options or inputs changed" and steps[2].reason == "after train"
    third = lmforge_here(capsys, "pipeline", "run", str(path))
    assert third.returncode == 0, third.stderr
    assert versions(lmforge_home, "words") == [1, 2] and versions(lmforge_home, "words-q8") == [
        1,
        2,
    ]

    # The source file's content changed (same name, same options): data runs again.
    (tmp_path / "project" / PROBE).write_text(syllable_text(200, 7))
    steps = plan(load_pipeline(path), PipelineState.load(out / STATE_FILE), lmforge_home)
    assert steps[0].action == "run" and steps[0].reason == "options or inputs changed"


def test_until_and_a_failed_stage_then_going_on(
    tmp_path: Path, lmforge_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_pipeline(tmp_path)
    proc = lmforge_here(capsys, "pipeline", "run", str(path), "--until", "train")
    assert proc.returncode == 0, proc.stderr
    assert versions(lmforge_home, "words") == [1] and versions(lmforge_home, "words-q8") == []

    (tmp_path / "held-out.txt").unlink()  # eval's file is gone: eval fails, names itself
    proc = lmforge_here(capsys, "pipeline", "run", str(path))
    assert proc.returncode == 1
    assert "stage 'eval' failed" in proc.stderr and "Traceback" not in proc.stderr
    state = PipelineState.load(pipeline_dir(lmforge_home, "tiny") / STATE_FILE)
    assert state.stages["eval"].status == "failed" and "quantize" not in state.stages

    (tmp_path / "held-out.txt").write_text(syllable_text(30, 1))
    proc = lmforge_here(capsys, "pipeline", "run", str(path))
    assert proc.returncode == 0, proc.stderr
    assert "skipped (unchanged) data, train" in flat(proc.stdout)
    assert versions(lmforge_home, "words") == [1] and versions(lmforge_home, "words-q8") == [1]


@pytest.mark.slow
def test_killed_training_stage_resumes_from_its_checkpoint(
    tmp_path: Path, lmforge_home: Path
) -> None:
    path = write_pipeline(tmp_path, steps=600)
    spec = yaml.safe_load(path.read_text())
    spec["stages"]["train"]["ckpt_every"] = 20
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    proc = lmforge_popen(
        *("pipeline", "run", str(path)),
        home=lmforge_home,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    runs = lmforge_home / "runs"
    deadline = time.monotonic() + 120
    try:
        while not list(runs.glob("words-*/ckpt-*.pt")):
            assert proc.poll() is None, "the pipeline ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint in 120 s"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    state = PipelineState.load(pipeline_dir(lmforge_home, "tiny") / STATE_FILE)
    assert state.stages["train"].status == "running" and versions(lmforge_home, "words") == []
    steps = plan(load_pipeline(path), state, lmforge_home)
    assert [(s.stage.id, s.action) for s in steps[:2]] == [("data", "skip"), ("train", "resume")]
    assert steps[1].argv[-2:] == ["--resume", "auto"]

    done = lmforge("pipeline", "run", str(path), "--until", "train", home=lmforge_home, timeout=300)
    assert done.returncode == 0, done.stderr
    (run_dir,) = list(runs.glob("words-*"))  # the same run went on: no second run directory
    assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"
    assert re.search(r"resumed at \d", done.stdout)  # from a checkpoint, not step 0
    assert versions(lmforge_home, "words") == [1]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("stages: {}", "'stages' must be a mapping"),
        ("stages: {fly: {}}", "stage 'fly' has no kind"),
        ("stages: {train: {data: x}}", "stage 'train' (train) needs 'name'"),
        ("stages: {eval: {task: perplexity}}", "stage 'eval' (eval) needs 'model'"),
        ("stages: {serve: {}, price: {model: m}}", "must come last"),
        ("stages: {train: {name: m, lr: {a: 1}}}", "option 'lr' must be a value"),
        ("name: Bad/Name\nstages: {price: {model: m}}", "name must be"),
        ("nmae: x\nstages: {price: {model: m}}", "unknown key(s) nmae"),
        ("stages: {train: {name: m}, t2: {uses: train, name: m}}", "both make the model 'm'"),
        ("stages: [1, 2]", "'stages' must be a mapping"),
        ("stages: {price: {model: m}}\nreport: {margin: -1}", "report.margin"),
    ],
)
def test_bad_pipeline_files_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], body: str, needle: str
) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(body + "\n")
    assert_one_line_error(lmforge_here(capsys, "pipeline", "run", str(path)), needle)


def test_unknown_until_stage_and_missing_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], lmforge_home: Path
) -> None:
    path = write_pipeline(tmp_path)
    proc = lmforge_here(capsys, "pipeline", "run", str(path), "--until", "serve")
    assert_one_line_error(proc, "no stage 'serve'", "data, train, eval, register, quantize, price")
    assert versions(lmforge_home, "words") == []
    assert_one_line_error(
        lmforge_here(capsys, "pipeline", "run", str(tmp_path / "nope.yaml")), "no such config file"
    )


@pytest.mark.slow
def test_serve_stage_comes_last_after_the_report(tmp_path: Path, lmforge_home: Path) -> None:
    import httpx

    path = write_pipeline(tmp_path)
    port = free_port()
    spec = yaml.safe_load(path.read_text())
    spec["stages"]["serve"] = {"model": "prod", "port": port, "threads": 1}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    proc = lmforge_popen(
        *("pipeline", "run", str(path)),
        home=lmforge_home,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2)
                if ready.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the serve stage never became ready"
            time.sleep(0.2)
        assert ready.json()["models"] == ["prod"]  # the alias the register stage made
        assert (pipeline_dir(lmforge_home, "tiny") / "report.html").is_file()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "ran data, train, eval, register, quantize, price, serve" in flat(out)


def test_ctrl_c_in_a_training_stage_leaves_it_to_resume(tmp_path: Path, lmforge_home: Path) -> None:
    """A command stopped by Ctrl-C exits 130: the stage stays 'running' (resumed next time),
    not 'failed' (which would start the training over)."""
    from lmforge.cli.main import main
    from lmforge.pipeline.run import run_pipeline

    pipeline = load_pipeline(write_pipeline(tmp_path))

    def execute(argv: list[str]) -> int:
        return 130 if argv[0] == "train" else main(argv)

    with pytest.raises(KeyboardInterrupt):
        run_pipeline(pipeline, home=lmforge_home, execute=execute)
    state = PipelineState.load(pipeline_dir(lmforge_home, "tiny") / STATE_FILE)
    assert state.stages["data"].status == "done" and state.stages["train"].status == "running"
    steps = plan(pipeline, state, lmforge_home)
    assert (steps[1].action, steps[1].argv[-2:]) == ("resume", ["--resume", "auto"])


def test_a_run_hashes_each_unchanged_input_once(tmp_path: Path, lmforge_home: Path) -> None:
    """Re-planning before every stage reuses the input files' hashes while they are unchanged,
    and sees a file that changed in between."""
    pipeline = load_pipeline(write_pipeline(tmp_path))
    state = PipelineState.load(pipeline_dir(lmforge_home, "tiny") / STATE_FILE)
    hashes: dict[tuple[object, ...], str] = {}
    first = plan(pipeline, state, lmforge_home, hashes=hashes)
    assert len(hashes) == 2  # corpus.txt (data) and held-out.txt (eval)
    assert plan(pipeline, state, lmforge_home, hashes=hashes) == first and len(hashes) == 2
    (tmp_path / "corpus.txt").write_text(syllable_text(201, 0))
    changed = plan(pipeline, state, lmforge_home, hashes=hashes)
    assert changed[0].fingerprint != first[0].fingerprint and len(hashes) == 3
