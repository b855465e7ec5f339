"""`eval.card`: the README.md of a model directory and the "evals" list of its lmforge.json."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmforge.errors import CorruptArtifactError, LmforgeError
from lmforge.eval.card import add_eval_result, escape_markdown, write_card

SHA_W, SHA_T, SHA_D = "a" * 64, "b" * 64, "c" * 64

PRETRAINED: dict[str, Any] = {
    "format_version": 1,
    "weights_sha256": SHA_W,
    "name": "tiny",
    "run_id": "20261123-100000-abcd",
    "run_dir": "/runs/20261123-100000-abcd",
    "stage": "pretrain",
    "dataset": {"name": "shakes", "path": "/home/me/datasets/shakes", "content_key": "d" * 64},
    "parent": None,
    "model_config": {"arch": "llama", "vocab_size": 384, "d_model": 32, "n_layer": 2},
    "steps": 200,
    "tokens_seen": 409600,
    "wall_seconds": 3725.5,
    "cpu_seconds": 7000.25,
    "gpu_seconds": 0.0,
    "world_size": 2,
    "strategy": "ddp",
    "eval": {"train_loss": 2.5, "val_loss": 2.75, "val_perplexity": 15.6},
}
LLAMA_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 384,
    "hidden_size": 32,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}
FINETUNED: dict[str, Any] = {
    "format_version": 1,
    "weights_sha256": SHA_W,
    "name": "sst2",
    "run_id": "20261124-090000-ef01",
    "stage": "finetune",
    "task": "classify",
    "parent": "tiny@1",
    "parent_path": "/models/tiny/1",
    "task_data": {
        "path": "/data/sst2/train.tsv",
        "sha256": SHA_T,
        "format": "classify",
        "examples": 6920,
    },
    "lora": {"rank": 8, "alpha": 16.0, "targets": ["q", "v"], "dropout": 0.05},
    "head": {"task": "classify", "labels": ["negative", "positive"], "pooling": "last"},
    "steps": 50,
    "tokens_seen": 12345,
    "wall_seconds": 42.0,
    "cpu_seconds": 80.0,
    "world_size": 1,
    "eval": {"train_loss": 0.3, "val_loss": None},
}
CLASSIFIER_CONFIG: dict[str, Any] = {
    **LLAMA_CONFIG,
    "architectures": ["LlamaForSequenceClassification"],
    "num_labels": 2,
    "id2label": {"1": "positive", "0": "negative"},
    "lmforge_head": FINETUNED["head"],
}


def result(**overrides: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "task": "classify",
        "model": "sst2@1",
        "data": {"path": "/data/sst2/dev.tsv", "sha256": SHA_D, "examples": 872},
        "metrics": {"accuracy": 0.91, "precision": 0.9, "recall": 0.92, "f1": 0.905},
        "contamination": {
            "n": 13,
            "example_rate": 0.025,
            "examples_flagged": 22,
            "complete": True,
            "sources": [{"status": "checked"}, {"status": "checked"}],
        },
        "seconds": 12.3,
        "created_at": "2026-11-23T10:00:00Z",
    }
    out.update(overrides)
    return out


def model_dir(tmp_path: Path, lineage: dict[str, Any] | None, **files: dict[str, Any]) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    if lineage is not None:
        (d / "lmforge.json").write_text(json.dumps(lineage), encoding="utf-8")
    for name, content in files.items():
        (d / f"{name}.json").write_text(json.dumps(content), encoding="utf-8")
    return d


def front_matter(card: str) -> dict[str, Any]:
    assert card.startswith("---\n")
    block = card.split("---\n", 2)[1]
    loaded = yaml.safe_load(block)
    assert isinstance(loaded, dict)
    return loaded


def cells(row: str) -> list[str]:
    """A Markdown table row split on its unescaped pipes (GFM: `\\|` is a literal pipe)."""
    out, cell, i = [], "", 0
    while i < len(row):
        if row[i] == "\\" and i + 1 < len(row):
            cell += row[i : i + 2]
            i += 2
            continue
        if row[i] == "|":
            out.append(cell.strip())
            cell = ""
        else:
            cell += row[i]
        i += 1
    out.append(cell.strip())
    assert out[0] == "" and out[-1] == "", row  # rows start and end with a pipe
    return out[1:-1]


def table(card: str, heading: str) -> list[list[str]]:
    section = card.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return [cells(r) for r in rows[2:]]  # without the header and the |---| line


def test_card_of_a_pretrained_model(tmp_path: Path) -> None:
    d = model_dir(tmp_path, PRETRAINED, config=LLAMA_CONFIG)
    path = write_card(d)
    assert path == d / "README.md"
    card = path.read_text(encoding="utf-8")
    assert front_matter(card) == {
        "library_name": "lmforge",
        "pipeline_tag": "text-generation",
        "tags": ["lmforge"],
    }
    assert "\n# tiny\n" in card
    assert "pretrained from scratch" in card
    model = dict(table(card, "Model"))
    assert model["Architecture"] == "LlamaForCausalLM (llama)"
    assert model["Layers"] == "2" and model["Hidden size"] == "32"
    assert model["Attention heads"] == "4 (2 key/value)"
    assert model["Vocabulary"] == "384" and model["Context length"] == "64"
    assert model["Task"] == "text generation" and model["Weights sha256"] == SHA_W
    made = dict(table(card, "How it was made"))
    assert made["Stage"] == "pretrain"
    assert made["Parent"] == "none (trained from scratch)"
    assert made["Run"] == "20261123-100000-abcd"
    assert made["Steps"] == "200" and made["Tokens seen"] == "409,600"
    assert made["Wall time"] == "3,725.5 s (1 h 2 min) on 2 processes"
    assert made["CPU time"].startswith("7,000.2")
    assert made["Training data"] == (
        f"data set shakes at /home/me/datasets/shakes (content key {'d' * 64})"
    )
    assert made["Final loss"] == "train 2.5000, validation 2.7500"
    assert "LoRA" not in made
    assert "No evaluation recorded yet." in card
    assert "lmforge generate tiny 'Once upon a time'" in card


def test_card_of_a_fine_tuned_classifier(tmp_path: Path) -> None:
    d = model_dir(tmp_path, FINETUNED, config=CLASSIFIER_CONFIG)
    card = write_card(d).read_text(encoding="utf-8")
    meta = front_matter(card)
    assert meta["base_model"] == "tiny@1"
    assert meta["pipeline_tag"] == "text-classification"
    assert "A text classifier fine-tuned from tiny@1 with lmforge (LoRA adapters, rank 8)." in card
    model = dict(table(card, "Model"))
    assert model["Architecture"] == "LlamaForSequenceClassification (llama)"
    assert model["Task"] == "classify"
    assert model["Labels"] == "negative, positive"  # id2label in id order
    made = dict(table(card, "How it was made"))
    assert made["Parent"] == "tiny@1"
    assert made["Training data"] == (
        f"/data/sst2/train.tsv (sha256 {SHA_T}, format classify, 6,920 examples)"
    )
    assert made["LoRA"] == "rank 8, alpha 16.0, targets q, v, dropout 0.05"
    assert made["Head"] == "classify, last pooling, 2 labels"
    assert made["Final loss"] == "train 0.3000"
    assert "curl http://127.0.0.1:8000/v1/classifications" in card
    assert '"model": "sst2"' in card


def test_qa_head_and_full_fine_tune(tmp_path: Path) -> None:
    lineage = {
        **FINETUNED,
        "name": "squad",
        "task": "qa",
        "lora": None,
        "head": {"task": "qa", "labels": [], "pooling": "last"},
    }
    config = {**LLAMA_CONFIG, "architectures": ["LlamaForQuestionAnswering"]}
    card = write_card(model_dir(tmp_path, lineage, config=config)).read_text(encoding="utf-8")
    assert front_matter(card)["pipeline_tag"] == "question-answering"
    assert "An extractive question-answering model fine-tuned from tiny@1 with lmforge." in card
    assert dict(table(card, "How it was made"))["LoRA"] == "none (every weight trained)"
    assert "/v1/answers" in card and '"question"' in card


def test_adapter_directory_without_config_json(tmp_path: Path) -> None:
    lineage = {**FINETUNED, "task": "sft", "head": None, "kind": "lora-adapter"}
    lineage["model_config"] = {"arch": "llama", "n_layer": 2, "d_model": 32, "n_head": 4}
    adapter = {"base_model_name_or_path": "/models/tiny/1", "r": 8, "head": None}
    d = model_dir(tmp_path, lineage, adapter_config=adapter)
    card = write_card(d).read_text(encoding="utf-8")
    meta = front_matter(card)
    assert meta["pipeline_tag"] == "text-generation"
    assert meta["tags"] == ["lmforge", "lora"]
    model = dict(table(card, "Model"))
    assert model["Architecture"] == "LoRA adapters on /models/tiny/1 (llama)"
    assert model["Layers"] == "2" and model["Task"] == "sft"
    assert "A chat model fine-tuned from tiny@1" in card
    assert "lmforge generate sst2 'Once upon a time' -n 64 --chat" in card


def test_directory_without_lineage_gets_a_card_that_says_so(tmp_path: Path) -> None:
    d = model_dir(tmp_path, None, config=LLAMA_CONFIG)
    card = write_card(d).read_text(encoding="utf-8")
    assert "\n# model\n" in card
    assert "Not recorded: this model was not trained by lmforge." in card
    assert f"lmforge generate {d}" in card


def test_classifier_made_elsewhere_is_known_by_its_architecture(tmp_path: Path) -> None:
    config = {k: v for k, v in CLASSIFIER_CONFIG.items() if k != "lmforge_head"}
    d = model_dir(tmp_path, None, config=config)
    card = write_card(d).read_text(encoding="utf-8")
    assert front_matter(card)["pipeline_tag"] == "text-classification"
    assert "A text classifier in lmforge's model directory layout" in card
    model = dict(table(card, "Model"))
    assert model["Task"] == "classify" and model["Labels"] == "negative, positive"
    assert model["Architecture"] == "LlamaForSequenceClassification (llama)"
    assert "/v1/classifications" in card


def test_add_eval_result_twice_keeps_both_and_every_other_key(tmp_path: Path) -> None:
    d = model_dir(tmp_path, FINETUNED, config=CLASSIFIER_CONFIG)
    first = result()
    incomplete = {
        "n": 13,
        "example_rate": 0.0,
        "examples_flagged": 0,
        "complete": False,
        "sources": [{"status": "checked"}, {"status": "unknown"}, {"status": "missing"}],
    }
    second = result(
        task="perplexity",
        data={"path": "/data/wiki.txt", "sha256": SHA_T, "examples": 100},
        metrics={"perplexity": 12.3456, "bits_per_byte": 1.23456, "tokens": 5000},
        contamination=incomplete,
        created_at="2026-11-24T08:00:00Z",
    )
    add_eval_result(d, first)
    add_eval_result(d, second)
    record = json.loads((d / "lmforge.json").read_text(encoding="utf-8"))
    assert record["evals"] == [first, second]
    assert {k: v for k, v in record.items() if k != "evals"} == FINETUNED
    card = (d / "README.md").read_text(encoding="utf-8")
    rows = table(card, "Evaluation results")
    assert rows == [
        [
            "classify",
            "/data/sst2/dev.tsv (sha256 cccccccccccc)",
            "872",
            "accuracy 0.9100, macro F1 0.9050",
            "ngram overlap: 2.5% of examples (13-grams), checked against 2 sources",
            "2026-11-23",
        ],
        [
            "perplexity",
            "/data/wiki.txt (sha256 bbbbbbbbbbbb)",
            "100",
            "perplexity 12.346, bits/byte 1.2346",
            "incomplete: ngram overlap 0.0% of examples (13-grams) in the 1 of 3 sources "
            "that could be checked",
            "2026-11-24",
        ],
    ]


@pytest.mark.parametrize(
    ("task", "metrics", "shown"),
    [
        ("qa", {"exact_match": 71.234, "f1": 80.5, "questions": 10}, "exact match 71.23, F1 80.50"),
        ("bleu", {"bleu": 25.3, "chrf": 50.12, "pairs": 3}, "BLEU 25.30, chrF 50.12"),
        ("classify", {"accuracy": 1.0, "macro_f1": 0.5, "f1": 0.9}, "accuracy 1.0000, macro F1"),
        ("newtask", {"score": 0.5, "name": "x"}, "score 0.5"),
    ],
)
def test_headline_metrics_per_task(
    tmp_path: Path, task: str, metrics: dict[str, Any], shown: str
) -> None:
    d = model_dir(tmp_path, PRETRAINED)
    add_eval_result(d, result(task=task, metrics=metrics, contamination=None))
    (row,) = table((d / "README.md").read_text(encoding="utf-8"), "Evaluation results")
    assert row[3].startswith(shown)
    assert row[4] == "not checked"


def test_add_eval_result_to_a_directory_without_lineage_creates_it(tmp_path: Path) -> None:
    d = model_dir(tmp_path, None, config=LLAMA_CONFIG)
    add_eval_result(d, result())
    assert json.loads((d / "lmforge.json").read_text(encoding="utf-8")) == {"evals": [result()]}


def test_writes_are_atomic_and_leave_no_temp_files(tmp_path: Path) -> None:
    d = model_dir(tmp_path, FINETUNED, config=CLASSIFIER_CONFIG)
    add_eval_result(d, result())
    write_card(d)
    files = {"lmforge.json", "config.json", "README.md"}
    assert {p.name for p in d.iterdir()} == files
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    # A result that cannot be JSON changes nothing and leaves nothing behind.
    with pytest.raises(LmforgeError, match="cannot be stored"):
        add_eval_result(d, result(metrics={"perplexity": float("nan")}))
    with pytest.raises(LmforgeError, match="cannot be stored"):
        add_eval_result(d, result(metrics={"bad": object()}))
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before


def test_concurrent_add_eval_result_loses_nothing(tmp_path: Path) -> None:
    d = model_dir(tmp_path, PRETRAINED, config=LLAMA_CONFIG)
    threads = [
        threading.Thread(target=add_eval_result, args=(d, result(seconds=float(i))))
        for i in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    evals = json.loads((d / "lmforge.json").read_text(encoding="utf-8"))["evals"]
    assert sorted(e["seconds"] for e in evals) == [float(i) for i in range(8)]
    assert len(table((d / "README.md").read_text(encoding="utf-8"), "Evaluation results")) == 8
    assert {p.name for p in d.iterdir()} == {"lmforge.json", "config.json", "README.md"}


def test_user_strings_are_escaped(tmp_path: Path) -> None:
    nasty = "a|b\nc`d*e_f[g](h)<script>&amp;\\|"
    lineage = {
        **FINETUNED,
        "name": "evil|name\n# heading",
        "parent": 'tiny"@1\n: x|y\u2028',
        "task_data": {**FINETUNED["task_data"], "path": f"/data/{nasty}.tsv"},
    }
    config = {**CLASSIFIER_CONFIG, "id2label": {"0": nasty, "1": "ok"}}
    d = model_dir(tmp_path, lineage, config=config)
    add_eval_result(d, result(data={"path": nasty, "sha256": SHA_D, "examples": 1}))
    card = (d / "README.md").read_text(encoding="utf-8")
    assert front_matter(card)["base_model"] == lineage["parent"]  # YAML reads it back exactly
    assert "<script>" not in card and "\n# heading" not in card
    assert "\n# evil\\|name # heading\n" in card  # one line: the name cannot add a heading
    model = table(card, "Model")
    assert all(len(row) == 2 for row in model)
    labels = dict(model)["Labels"]
    assert labels == escape_markdown(nasty) + ", ok"
    made = table(card, "How it was made")
    assert all(len(row) == 2 for row in made)
    (row,) = table(card, "Evaluation results")
    assert len(row) == 6 and row[1].startswith(escape_markdown(nasty))


@pytest.mark.parametrize(
    ("text", "escaped"),
    [
        ("plain name-1.0", "plain name-1.0"),
        ("a|b", "a\\|b"),
        ("two\nlines\r\nhere", "two lines here"),
        ("`code` *em* _em_", "\\`code\\` \\*em\\* \\_em\\_"),
        ("[link](x) <b> &amp; ~~s~~", "\\[link\\](x) \\<b\\> \\&amp; \\~\\~s\\~\\~"),
        ("back\\slash|", "back\\\\slash\\|"),
        (None, "None"),
    ],
)
def test_escape_markdown(text: object, escaped: str) -> None:
    assert escape_markdown(text) == escaped


def test_bad_inputs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(LmforgeError, match="not a model directory"):
        write_card(tmp_path / "missing")
    d = model_dir(tmp_path, None)
    with pytest.raises(LmforgeError, match="task"):
        add_eval_result(d, {"metrics": {}})
    (d / "lmforge.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(CorruptArtifactError, match=r"lmforge\.json"):
        write_card(d)
    (d / "lmforge.json").write_text('{"evals": {}}', encoding="utf-8")
    with pytest.raises(CorruptArtifactError, match="evals"):
        add_eval_result(d, result())
    assert not (d / "README.md").exists()
