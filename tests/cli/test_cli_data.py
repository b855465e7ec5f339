"""`lmforge data prepare | list | show` as a user runs them: subprocesses, exit codes, files."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_one_line_error, lmforge, lmforge_here

_RNG = random.Random(0)
_WORD_LIST = """the fox dog river stone night bright quick lazy jumps over under near far old new"""
_WORDS = _WORD_LIST.split()
TEXT = "".join(
    " ".join(_RNG.choice(_WORDS) for _ in range(_RNG.randint(6, 14))).capitalize() + ".\n\n"
    for _ in range(400)
)


def nothing_written(home: Path) -> bool:
    datasets = home / "datasets"
    return not datasets.exists() or not any(datasets.iterdir())


def test_prepare_list_show_and_rerun(tmp_path: Path) -> None:
    home = tmp_path / "home"
    src = tmp_path / "input.txt"
    src.write_text(TEXT, encoding="utf-8")
    args = ("data", "prepare", str(src), "--name", "fox", "--tokenizer", "char", "--split", "tail")
    proc = lmforge(*args, home=home)
    assert proc.returncode == 0, proc.stderr
    assert "data set fox: 1 documents kept of 1" in " ".join(proc.stdout.split())
    n = len(TEXT)
    manifest = json.loads((home / "datasets" / "fox" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["tokens"] == int(n * 0.9)
    assert manifest["splits"]["val"]["tokens"] == n - int(n * 0.9)
    assert (home / "datasets" / "fox" / "token_lengths.png").read_bytes()[:4] == b"\x89PNG"

    again = lmforge(*args, home=home)
    assert again.returncode == 0 and "up to date" in again.stdout

    listed = lmforge("data", "list", "--json", home=home)
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [(r["name"], r["tokens"], r["tokenizer"]) for r in rows] == [("fox", n, "char")]

    shown = lmforge("data", "show", "fox", home=home)
    assert shown.returncode == 0, shown.stderr
    for needle in ("funnel", "near_dedup", "splits", "token_lengths.png", "PII (scrub"):
        assert needle in shown.stdout
    as_json = json.loads(lmforge("data", "show", "fox", "--json", home=home).stdout)
    assert as_json["content_key"] == manifest["content_key"]


def test_help_has_examples() -> None:
    for command in (("data", "prepare"), ("data", "list"), ("data", "show")):
        proc = lmforge(*command, "--help", home=Path("/nonexistent"))
        assert proc.returncode == 0 and "Examples" in proc.stdout, command


def test_bad_inputs_are_one_line_and_write_nothing(
    tmp_path: Path, lmforge_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = lmforge_home

    def lmforge(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
        return lmforge_here(capsys, *args)  # in-process: nine commands, one start-up

    good = tmp_path / "good.txt"
    good.write_text(TEXT, encoding="utf-8")
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text(
        '{"text": "a fine document with enough text"}\n{"text": oops}\n'
        '{"text": "another document, long enough to keep"}\n',
        "utf-8",
    )
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"caf\xe9 " * 50)
    table = tmp_path / "t.csv"
    table.write_text("id,body\n1,hello there general kenobi\n", encoding="utf-8")
    short = tmp_path / "short.jsonl"
    short.write_text('{"text": "tiny"}\n', encoding="utf-8")
    cases = [
        ((str(tmp_path / "missing.txt"),), ("missing.txt", "no such file")),
        ((str(bad_json),), ("bad.jsonl:2", "malformed JSON")),
        ((str(latin),), ("latin.txt", "not valid UTF-8 at byte 3")),
        ((str(table),), ("t.csv", "no column 'text'", "id, body")),
        ((str(short),), ("no documents left after filtering",)),
        ((str(good), "--vocab-size", "100"), ("--vocab-size 100 is too small",)),
        ((str(good), "--val-fraction", "2"), ("--val-fraction",)),
        ((str(good), "--tokenizer", "no-such-model"), ("--tokenizer 'no-such-model'",)),
    ]
    for extra, needles in cases:
        proc = lmforge("data", "prepare", *extra, "--name", "x", home=home)
        assert_one_line_error(proc, *needles)
        assert nothing_written(home), extra
    skipped = lmforge(
        "data", "prepare", str(bad_json), "--name", "x", "--on-error", "skip", "-q", home=home
    )
    assert skipped.returncode == 0, skipped.stderr
    assert "skipped 1 bad record (malformed_json 1)" in " ".join(skipped.stdout.split())
    proc = lmforge("data", "prepare", str(good), "--name", "Bad/Name", home=home)
    assert_one_line_error(proc, "invalid data set name")
    assert_one_line_error(
        lmforge("data", "show", "nope", home=home), "no data set 'nope'", "known: x"
    )


@pytest.mark.builtin
def test_the_built_in_models_tokenizer_can_be_used(builtin_home: Path, tmp_path: Path) -> None:
    from lmforge.resolve import builtin_dir
    from lmforge.tokenizer import Tokenizer

    src = tmp_path / "chats.jsonl"
    rng = random.Random(1)
    syllables = ["ka", "lo", "mi", "ten", "ros", "ula", "vin", "der", "sa"]
    words = [a + b for a in syllables for b in syllables]
    chats = [
        {"messages": [{"role": "user", "content": " ".join(rng.sample(words, 20)) + "?"}]}
        for _ in range(30)
    ]
    src.write_text("".join(json.dumps(c) + "\n" for c in chats), encoding="utf-8")
    proc = lmforge(
        "data",
        "prepare",
        str(src),
        "--name",
        "chats",
        "--tokenizer",
        "smollm2-135m-instruct",
        "--val-fraction",
        "0",
        "--dedup",
        "none",
        home=builtin_home,
    )
    assert proc.returncode == 0, proc.stderr
    dataset = builtin_home / "datasets" / "chats"
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert manifest["tokenizer"]["vocab_size"] == 49152 and manifest["tokenizer"]["kind"] == "given"
    assert manifest["removed"] == {}
    reference = Tokenizer.load(builtin_dir("smollm2-135m-instruct", home=builtin_home))
    want: list[int] = []
    for chat in chats:
        want += [*reference.encode_chat(chat["messages"], add_generation_prompt=False)]
        want.append(reference.eos_id)
    got = np.fromfile(dataset / "train_000.bin", dtype=np.uint16).tolist()
    assert got == want


SHAKESPEARE = Path(__file__).resolve().parents[2].parent / "shared/data/tinyshakespeare/input.txt"


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="../shared/data is not here")
def test_tinyshakespeare_char_matches_nanogpt(tmp_path: Path) -> None:
    home = tmp_path / "home"
    proc = lmforge(
        "data",
        "prepare",
        str(SHAKESPEARE),
        "--name",
        "shakespeare-char",
        "--tokenizer",
        "char",
        "--split",
        "tail",
        "--val-fraction",
        "0.1",
        home=home,
    )
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((home / "datasets/shakespeare-char/manifest.json").read_text())
    # nanoGPT data/shakespeare_char/prepare.py prints: vocab size 65, train has 1,003,854
    # tokens, val has 111,540 tokens.
    assert manifest["tokenizer"]["vocab_size"] == 65
    assert manifest["splits"]["train"]["tokens"] == 1_003_854
    assert manifest["splits"]["val"]["tokens"] == 111_540
