"""`lmforge distill` as a user runs it (in-process): a teacher trained by lmforge on a character
data set, a smaller student, the registry, lineage, resume, and one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_cli_train import char_text, model_dir, prepare_char

from conftest import assert_one_line_error, lmforge_here, tiny_config

TINY = ("--batch-size", "4", "--block-size", "32", "--eval-batches", "2", "-q")
STUDENT = ("--student", "tiny", "--arch.n_layer=1", "--arch.d_model=32")


@pytest.fixture(scope="module")
def words(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ~20 KB character-level data set (train + val)."""
    return prepare_char(tmp_path_factory.mktemp("data"), char_text(3_000, 0), "words")


def train(capsys, data: Path, name: str, *args: str):  # type: ignore[no-untyped-def]
    proc = lmforge_here(
        capsys, "train", "--data", str(data), "--model", "tiny", "--name", name, *TINY, *args
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def distill(capsys, data: Path, *args: str):  # type: ignore[no-untyped-def]
    return lmforge_here(capsys, "distill", "--data", str(data), *TINY, *args)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_distill_registers_the_student_with_the_teacher_as_parent(
    capsys, words: Path, lmforge_home: Path
) -> None:
    from lmforge.model.formats import load_model
    from lmforge.registry import repo
    from lmforge.registry.db import connect

    train(capsys, words, "teacher", "--max-steps", "20", "--lr", "3e-3")
    proc = distill(
        capsys, words, "--teacher", "teacher", *STUDENT, "--name", "pupil", "--max-steps", "12",
        "--eval-every", "6", "--temperature", "1.5", "--alpha", "0.7",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "pupil@1" in proc.stdout and "teacher@1" in proc.stdout
    assert "val KL to teacher" in proc.stdout

    lineage = json.loads((model_dir(lmforge_home, "pupil") / "lmforge.json").read_text())
    teacher_dir = model_dir(lmforge_home, "teacher")
    teacher_sha = json.loads((teacher_dir / "lmforge.json").read_text())["weights_sha256"]
    assert lineage["stage"] == "distill"
    assert lineage["parent"] == "teacher@1"
    assert lineage["teacher"]["name"] == "teacher@1"
    assert lineage["teacher"]["path"] == str(teacher_dir.resolve())
    assert lineage["teacher"]["weights_sha256"] == teacher_sha
    assert lineage["distill"] == {"temperature": 1.5, "alpha": 0.7}
    assert lineage["dataset"]["name"] == "words"
    assert lineage["model_config"]["n_layer"] == 1 and lineage["model_config"]["d_model"] == 32
    assert lineage["steps"] == 12 and lineage["tokens_seen"] == 12 * 4 * 32
    val_kl = lineage["eval"]["val_kl_to_teacher"]
    assert math.isfinite(val_kl) and val_kl >= 0
    run = Path(lineage["run_dir"])
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((run / "run.json").read_text())["status"] == "completed"
    assert json.loads((run / "run.json").read_text())["teacher"]["weights_sha256"] == teacher_sha
    # The checkpoint holds the student only.
    (ckpt,) = run.glob("ckpt-*.pt")
    student = load_model(model_dir(lmforge_home, "pupil")).model
    assert set(torch.load(ckpt, weights_only=True)["model"]) == set(student.state_dict())

    engine = connect(home=lmforge_home)
    with engine.begin() as conn:
        assert repo.get_model(conn, name="pupil").parent == "teacher@1"  # type: ignore[union-attr]
    engine.dispose()
    tree = lmforge_here(capsys, "lineage", "pupil", "--json")
    assert tree.returncode == 0, tree.stderr
    node = json.loads(tree.stdout)
    run_node = next(c for c in node["children"] if c["kind"] == "run")
    assert run_node["details"]["stage"] == "distill"
    parent = next(c for c in node["children"] if c["kind"] == "model")
    assert parent["label"] == "teacher@1" and parent["details"]["role"] == "parent"
    assert any(c["kind"] == "run" for c in parent["children"])  # the teacher's own run

    gen = lmforge_here(capsys, "generate", "pupil", "Ka", "-n", "5", "--seed", "0")
    assert gen.returncode == 0, gen.stderr


def test_alpha_zero_repeats_plain_train_bit_for_bit(
    capsys, words: Path, lmforge_home: Path
) -> None:
    """`distill --alpha 0` is `train` with the same student and seed: the same loss at every
    step. The trained model serves as the teacher (any teacher will do at alpha 0)."""
    same = ("--max-steps", "8", "--eval-every", "4", "--dropout", "0.1", "--seed", "3")
    train(capsys, words, "plain", "--arch.n_layer=1", "--arch.d_model=32", *same)
    proc = distill(
        capsys, words, "--teacher", "plain", *STUDENT, "--name", "zero", "--alpha", "0", *same
    )
    assert proc.returncode == 0, proc.stderr
    plain_run, zero_run = (
        Path(json.loads((model_dir(lmforge_home, n) / "lmforge.json").read_text())["run_dir"])
        for n in ("plain", "zero")
    )
    plain, zero = metrics(plain_run), metrics(zero_run)
    assert [r["loss"] for r in plain] == [r["loss"] for r in zero]
    assert [r.get("val_loss") for r in plain] == [r.get("val_loss") for r in zero]


def test_resume_needs_the_same_teacher_weights(capsys, words: Path, lmforge_home: Path) -> None:
    train(capsys, words, "teacher", "--max-steps", "2")
    args = ("--teacher", "teacher", *STUDENT, "--name", "pupil", "--max-steps", "30")
    first = distill(capsys, words, *args, "--time-limit", "0.05", "--ckpt-every", "5")
    assert first.returncode == 0, first.stderr
    assert "stopped by --time-limit" in first.stderr
    (run,) = (lmforge_home / "runs").glob("pupil-*")
    stopped_at = len(metrics(run))
    assert 0 < stopped_at < 30

    train(capsys, words, "teacher", "--max-steps", "3")  # teacher@2: other weights
    changed = distill(capsys, words, *args, "--resume", "auto")
    assert_one_line_error(changed, "distilled from teacher@1", "not from teacher@2", "same teacher")

    args = ("--teacher", "teacher@1", *args[2:])  # another spec of the same weights is fine
    done = distill(capsys, words, *args, "--resume", "auto")
    assert done.returncode == 0, done.stderr
    assert f"resumed at {stopped_at}" in done.stdout
    lineage = json.loads((model_dir(lmforge_home, "pupil") / "lmforge.json").read_text())
    assert lineage["steps"] == 30 and lineage["parent"] == "teacher@1"
    assert lineage["run_id"] == run.name


@pytest.fixture
def bpe_teacher(tiny_tokenizer, tmp_path: Path) -> Path:  # type: ignore[no-untyped-def]
    """A language model with a 384-token BPE vocabulary (the data set's is characters)."""
    from lmforge.model.formats import save_model
    from lmforge.model.transformer import Transformer

    return save_model(Transformer(tiny_config("llama")), tiny_tokenizer, tmp_path / "bpe")


@pytest.fixture
def classifier(tiny_tokenizer, tmp_path: Path) -> Path:  # type: ignore[no-untyped-def]
    from lmforge.model.formats import save_model
    from lmforge.model.heads import HeadConfig, head_model
    from lmforge.model.transformer import Transformer

    model = head_model(Transformer(tiny_config("llama")), HeadConfig("classify", ("a", "b")))
    return save_model(model, tiny_tokenizer, tmp_path / "classifier")


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (("--teacher", "nosuch", *STUDENT), ("unknown model 'nosuch'",)),
        (("--teacher", "{bpe}", *STUDENT), ("data set's vocabulary (", "not the one of --teacher")),
        (("--teacher", "{classifier}", *STUDENT), ("classify model", "causal language model")),
        (("--teacher", "x", *STUDENT, "--temperature", "0"), ("--temperature must be positive",)),
        (("--teacher", "x", *STUDENT, "--temperature", "-2"), ("--temperature",)),
        (("--teacher", "x", *STUDENT, "--alpha", "1.5"), ("--alpha must be in [0, 1]",)),
        (("--teacher", "x", *STUDENT, "--alpha", "-0.1"), ("--alpha",)),
        ((*STUDENT,), ("--teacher is required",)),
        (("--teacher", "x"), ("--student is required",)),
        (("--teacher", "x", *STUDENT, "--loop.lrr=1"), ("loop.lrr",)),
    ],
)
def test_bad_input_is_one_line(
    args: tuple[str, ...],
    needles: tuple[str, ...],
    capsys,
    words: Path,
    bpe_teacher: Path,
    classifier: Path,
    lmforge_home: Path,
) -> None:
    args = tuple(a.format(bpe=bpe_teacher, classifier=classifier) for a in args)
    proc = lmforge_here(capsys, "distill", "--data", str(words), "--name", "x", *args, "-q")
    assert_one_line_error(proc, *needles)
    if args[:2] == ("--teacher", str(bpe_teacher)):  # both sizes named
        from lmforge.tokenizer import Tokenizer

        sizes = (Tokenizer.load(words).vocab_size, Tokenizer.load(bpe_teacher).vocab_size)
        assert f"({sizes[0]} tokens)" in proc.stderr and f"({sizes[1]} tokens)" in proc.stderr
    assert not (lmforge_home / "runs").exists() or not any((lmforge_home / "runs").iterdir())
