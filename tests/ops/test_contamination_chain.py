"""Contamination check across a model chain: a data set made by the real `lmforge data prepare`,
a pretrained model directory recording it, a fine-tuned child recording its task file; eval
passages copied from each are found, and gone, changed or unknown training data is reported."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import pytest

from conftest import lmforge_here
from lmforge.builtin import DEFAULT_MODEL
from lmforge.errors import ModelNotFoundError
from lmforge.ops.contamination import check_contamination, task_texts, training_sources

FILLER = [
    *("the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as", "by"),
    *("at", "from", "his", "her", "they", "this", "which", "king", "queen", "lord", "lady"),
    *("sword", "crown", "river", "stone", "night", "morning", "bright", "dark", "gentle"),
    *("noble", "speak", "answer", "honour", "country", "battle", "letter", "garden", "winter"),
    *("summer", "friend", "enemy", "heart"),
]

# Passages no filler text can produce: 14 words each, so two 13-grams each.
IN_TXT = (
    "xylophones quietly serenade purple hippos beneath glowing lanterns while seven weary "
    "sailors dance slowly"
)
IN_JSONL = (
    "copper kettles whistle softly as marmalade clouds drift over sleepy harbour towns every autumn"
)
NOT_TEXT_FIELD = (
    "nobody trains on metadata fields like this unusual sentence about zinc giraffes eating waffles"
)
IN_TASK = (
    "please translate the following riddle about invisible bicycles into formal victorian "
    "english today please"
)
CLEAN = (
    "a completely fresh sentence that mentions quantum badgers knitting scarves for midnight "
    "comets tonight"
)


def filler(rng: random.Random, sentences: int) -> str:
    return " ".join(
        " ".join(rng.choice(FILLER) for _ in range(rng.randint(8, 14))).capitalize() + "."
        for _ in range(sentences)
    )


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_model(directory: Path, lineage: dict[str, Any]) -> Path:
    """A model directory as far as lineage goes: only its lmforge.json (no weights needed)."""
    directory.mkdir(parents=True)
    (directory / "lmforge.json").write_text(json.dumps(lineage, indent=2))
    return directory


@pytest.fixture
def chain(
    tmp_path: Path, lmforge_home: Path, capsys: pytest.CaptureFixture[str]
) -> dict[str, Path]:
    """raw/a.txt + raw/b.jsonl → data set `corpus` (real `data prepare`) → model `base`
    recording it → model `child` fine-tuned from `base` on raw/sft.jsonl."""
    rng = random.Random(0)
    raw = tmp_path / "raw"
    raw.mkdir()
    a = raw / "a.txt"
    a.write_text(f"{filler(rng, 20)}\n\n{IN_TXT.capitalize()}.\n\n{filler(rng, 20)}\n")
    b = raw / "b.jsonl"
    records = [{"text": filler(rng, 6), "meta": "x"} for _ in range(8)]
    records[3] = {"text": f"{filler(rng, 2)} {IN_JSONL}. {filler(rng, 2)}", "meta": NOT_TEXT_FIELD}
    b.write_text("".join(json.dumps(r) + "\n" for r in records))
    proc = lmforge_here(
        capsys, "data", "prepare", str(a), str(b), "--name", "corpus",
        "--tokenizer", "char", "--split", "tail", "--workers", "1", "-q",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    dataset = lmforge_home / "datasets" / "corpus"
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert [s["path"] for s in manifest["sources"]] == [str(a), str(b)]
    base = write_model(
        tmp_path / "models" / "base",
        {
            "name": "base",
            "stage": "pretrain",
            "dataset": {
                "name": "corpus",
                "path": str(dataset),
                "content_key": manifest["content_key"],
            },
            "parent": None,
        },
    )
    task = raw / "sft.jsonl"
    chats = [
        [("user", IN_TASK), ("assistant", "No.")],
        [("user", "Hi"), ("assistant", "Hello!")],
    ]
    task.write_text(
        "".join(
            json.dumps({"messages": [{"role": r, "content": c} for r, c in chat]}) + "\n"
            for chat in chats
        )
    )
    child = write_model(
        tmp_path / "models" / "child",
        {
            "name": "child",
            "stage": "finetune",
            "parent": str(base),
            "task_data": {"path": str(task), "sha256": sha256(task), "format": "sft"},
        },
    )
    return {"a": a, "b": b, "task": task, "dataset": dataset, "base": base, "child": child}


EVAL = [
    f"Q: {IN_TXT.upper()}?",  # 0: from a.txt, case and punctuation differ
    CLEAN,  # 1
    f"Recall: {IN_JSONL}",  # 2: from b.jsonl's text field
    NOT_TEXT_FIELD,  # 3: only in b.jsonl's "meta": prepare never read it
    IN_TASK,  # 4: the child's task file
    "too short to matter",  # 5
]


def test_chain_overlap_from_the_parents_sources_and_the_childs_task_file(
    chain: dict[str, Path],
) -> None:
    report = check_contamination(str(chain["child"]), EVAL)
    assert report["complete"] is True
    assert report["flagged_examples"] == [0, 2, 4]
    assert (report["examples_flagged"], report["eval_examples"]) == (3, 6)
    assert report["example_rate"] == pytest.approx(3 / 6)
    assert report["too_short"] == 1 and report["n"] == 13
    # distinct 13-grams: 0 has 3 ("q" + 14 words), 2 has 3 ("recall" + 14), the others 2 each
    assert report["eval_ngrams"] == 3 + 2 + 3 + 2 + 2
    assert report["overlapping_ngrams"] == 2 + 2 + 2  # the passages' own 13-grams
    assert report["ngram_rate"] == pytest.approx(6 / 12)
    sources = report["sources"]
    assert [(s["model"], s["path"], s["status"]) for s in sources] == [
        (str(chain["child"]), str(chain["task"]), "checked"),
        (str(chain["base"]), str(chain["a"]), "checked"),
        (str(chain["base"]), str(chain["b"]), "checked"),
    ]
    assert [s["from"] for s in sources] == ["task data (sft)", "data set corpus", "data set corpus"]
    assert [s["overlapping"] for s in sources] == [2, 2, 2]
    assert all(s["ngrams"] > 0 and "reason" not in s for s in sources)
    assert json.loads(json.dumps(report)) == report

    # The parent alone: only its data set counts.
    parent = check_contamination(str(chain["base"]), EVAL)
    assert parent["flagged_examples"] == [0, 2] and parent["complete"] is True
    assert check_contamination(str(chain["base"]), EVAL, n=20)["examples_flagged"] == 0


def test_gone_or_changed_files_are_missing_and_the_result_incomplete(
    chain: dict[str, Path],
) -> None:
    chain["a"].unlink()
    chain["task"].write_text(chain["task"].read_text() + '{"text": "one more"}\n')
    report = check_contamination(str(chain["child"]), EVAL)
    assert report["complete"] is False
    assert report["flagged_examples"] == [2]  # only b.jsonl is left to check
    by_path = {s["path"]: s for s in report["sources"]}
    assert by_path[str(chain["a"])]["status"] == "missing"
    assert by_path[str(chain["a"])]["reason"] == "no longer there"
    assert by_path[str(chain["task"])]["status"] == "missing"
    assert by_path[str(chain["task"])]["reason"].startswith("changed since (sha256 now")
    assert by_path[str(chain["b"])]["status"] == "checked"


def test_reprepared_data_set_and_lost_parent_are_missing(
    chain: dict[str, Path], tmp_path: Path
) -> None:
    lineage = json.loads((chain["base"] / "lmforge.json").read_text())
    lineage["dataset"]["content_key"] = "0" * 64
    (chain["base"] / "lmforge.json").write_text(json.dumps(lineage))
    (source,) = training_sources(str(chain["base"]))
    assert (source.status, source.path) == ("missing", str(chain["dataset"]))
    assert source.reason is not None and "re-prepared since" in source.reason

    orphan = write_model(tmp_path / "orphan", {"parent": str(tmp_path / "gone"), "task_data": {}})
    report = check_contamination(str(orphan), EVAL)
    assert report["complete"] is False and report["examples_flagged"] == 0
    assert [(s["model"], s["status"]) for s in report["sources"]] == [
        (str(orphan), "unknown"),  # records no training data
        (str(tmp_path / "gone"), "missing"),
    ]
    assert "unknown model" in report["sources"][1]["reason"]


def test_builtin_and_models_without_lineage_are_unknown(
    chain: dict[str, Path], tmp_path: Path
) -> None:
    report = check_contamination(DEFAULT_MODEL, EVAL)
    assert report["complete"] is False
    ((source),) = report["sources"]
    assert (source["model"], source["status"]) == (DEFAULT_MODEL, "unknown")
    assert report["examples_flagged"] == 0 and report["eval_ngrams"] == 12

    lineage = json.loads((chain["child"] / "lmforge.json").read_text())
    tuned = write_model(tmp_path / "tuned", {**lineage, "parent": DEFAULT_MODEL})
    report = check_contamination(str(tuned), EVAL)
    assert [(s["model"], s["status"]) for s in report["sources"]] == [
        (str(tuned), "checked"),
        (DEFAULT_MODEL, "unknown"),
    ]
    assert report["flagged_examples"] == [4] and report["complete"] is False

    hf = tmp_path / "hf"
    hf.mkdir()
    (source,) = training_sources(str(hf))
    assert (source.status, source.reason) == ("unknown", "no lmforge.json: made outside lmforge")
    with pytest.raises(ModelNotFoundError):
        check_contamination("no-such-model", EVAL)


def test_task_texts_reads_every_string(tmp_path: Path) -> None:
    squad = tmp_path / "train.json"
    qa = {"id": "q1", "question": "Q?", "answers": [{"text": "A", "answer_start": 0}]}
    data = [{"title": "T", "paragraphs": [{"context": "ctx", "qas": [qa]}]}]
    squad.write_text(json.dumps({"version": "1.1", "data": data}))
    assert list(task_texts(squad)) == ["1.1", "T", "ctx", "q1", "Q?", "A"]
    tsv = tmp_path / "train.tsv"
    tsv.write_text("text\tlabel\ngood film\t1\n")
    assert list(task_texts(tsv)) == ["text\tlabel\n", "good film\t1\n"]
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text('{"text": "a", "label": 1, "tags": ["b", {"c": "d"}]}\n\n{"x": "e"}\n')
    assert list(task_texts(jsonl)) == ["a", "b", "d", "e"]


def test_a_quantized_copy_is_checked_through_its_parent(
    chain: dict[str, Path], tmp_path: Path
) -> None:
    """Regression: a quantized model records no training data of its own; that made every eval
    of it "incomplete" although its parent's data was checked."""
    copy = write_model(
        tmp_path / "base-int8",
        {"stage": "quantize", "parent": str(chain["base"]), "parent_path": str(chain["base"])},
    )
    report = check_contamination(str(copy), EVAL)
    assert report["complete"] is True and report["flagged_examples"] == [0, 2]
    assert {s["model"] for s in report["sources"]} == {str(chain["base"])}
