"""`lmforge finetune`, `lmforge eval`, `lmforge models merge` as a user runs them (in-process)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from conftest import assert_one_line_error, lmforge_here, tiny_config

WORDS = [
    "quick",
    "brown",
    "jumps",
    "over",
    "lazy",
    "pack",
    "my",
    "box",
    "with",
    "five",
    "dozen",
    "liquor",
    "jugs",
    "how",
    "daft",
]
CHAT = json.dumps(
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
)


@pytest.fixture
def base_dir(tiny_tokenizer, tmp_path: Path) -> Path:  # type: ignore[no-untyped-def]
    import torch

    from lmforge.model.formats import save_model
    from lmforge.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(tiny_config("llama", max_seq_len=64))
    return save_model(model, tiny_tokenizer, tmp_path / "base", lineage={"name": "base"})


def _classify_file(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    lines = ["sentence\tlabel"]
    for i in range(n):
        words = rng.sample(WORDS, rng.randint(3, 6))
        if i % 2:
            words.insert(rng.randrange(len(words) + 1), "fox")
        lines.append(" ".join(words) + f"\t{'animal' if i % 2 else 'other'}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_lora_classifier_end_to_end(
    capsys, base_dir: Path, tmp_path: Path, lmforge_home: Path
) -> None:  # type: ignore[no-untyped-def]
    train = _classify_file(tmp_path / "train.tsv", 300, 1)
    dev = _classify_file(tmp_path / "dev.tsv", 60, 2)
    args = ["finetune", "--base", str(base_dir), "--task", "classify", "--data", str(train)]
    args += ["--name", "clf", "--lora", "--lora-rank", "4", "--merge", "--epochs", "8"]
    args += ["--lr", "3e-3", "--batch-size", "16", "-q"]
    proc = lmforge_here(capsys, *args)
    assert proc.returncode == 0, proc.stderr
    adapters = list((lmforge_home / "adapters" / "clf").iterdir())
    assert len(adapters) == 1
    adapter = adapters[0]
    weights = (adapter / "adapter_model.safetensors").stat().st_size
    assert weights < (base_dir / "model.safetensors").stat().st_size / 2  # small, separate
    # The merged, registered model and the adapter score the same.
    scores = {}
    for spec in ("clf", str(adapter)):
        out = tmp_path / f"{len(scores)}.json"
        proc = lmforge_here(
            capsys, "eval", spec, "--task", "classify", "--data", str(dev), "--json", str(out)
        )
        assert proc.returncode == 0, proc.stderr
        scores[spec] = json.loads(out.read_text())
    merged, unmerged = scores["clf"], scores[str(adapter)]
    assert merged["metrics"]["accuracy"] >= 0.95
    assert merged["metrics"]["confusion"] == unmerged["metrics"]["confusion"]
    assert Path(merged["confusion_png"]).read_bytes()[:4] == b"\x89PNG"
    # The dev file shares no 13-gram with the training file; the base has no known data.
    assert merged["contamination"]["examples_flagged"] == 0
    assert not merged["contamination"]["complete"]
    # The card shows the result; the registry holds it.
    from lmforge.registry import evals
    from lmforge.registry.db import connect

    engine = connect(home=lmforge_home)
    with engine.connect() as conn:
        rows = evals.list_evals(conn, model_name="clf")
    engine.dispose()
    assert rows and rows[0].metrics["accuracy"] == merged["metrics"]["accuracy"]
    card = (Path(merged["model_path"]) / "README.md").read_text(encoding="utf-8")
    assert "classify" in card and "accuracy" in card.lower()
    # `models merge` makes the same model from the adapter.
    proc = lmforge_here(capsys, "models", "merge", str(adapter), "--name", "clf-again")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "again.json"
    proc = lmforge_here(
        capsys,
        "eval",
        "clf-again",
        "--task",
        "classify",
        "--data",
        str(dev),
        "--json",
        str(out),
        "--no-record",
    )
    assert json.loads(out.read_text())["metrics"]["confusion"] == merged["metrics"]["confusion"]


def test_eval_contamination_found_when_eval_is_training_data(
    capsys, base_dir: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(4)
    lines = ["sentence\tlabel"] + [
        " ".join(rng.choice(WORDS) for _ in range(16)) + f"\t{'ab'[i % 2]}" for i in range(40)
    ]
    train = tmp_path / "train.tsv"
    train.write_text("\n".join(lines) + "\n", encoding="utf-8")
    proc = lmforge_here(
        capsys,
        "finetune",
        "--base",
        str(base_dir),
        "--task",
        "classify",
        "--data",
        str(train),
        "--name",
        "leaky",
        "--max-steps",
        "2",
        "-q",
    )
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "r.json"
    proc = lmforge_here(
        capsys, "eval", "leaky", "--task", "classify", "--data", str(train), "--json", str(out)
    )
    assert proc.returncode == 0, proc.stderr
    c = json.loads(out.read_text())["contamination"]
    assert c["examples_flagged"] == 40 and c["example_rate"] == 1.0
    assert "contamination: 100.00%" in proc.stdout


def test_sft_trains_only_on_the_assistant(capsys, base_dir: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    chats = tmp_path / "chats.jsonl"
    rows = [
        {
            "messages": [
                {"role": "user", "content": "quick?"},
                {"role": "assistant", "content": "brown fox"},
            ]
        },
        {"instruction": "pack my box", "input": "", "output": "five dozen jugs"},
        {"conversations": [{"from": "human", "value": "lazy?"}, {"from": "gpt", "value": "dog"}]},
    ]
    chats.write_text("".join(json.dumps(r) + "\n" for r in rows * 5), encoding="utf-8")
    proc = lmforge_here(
        capsys,
        "finetune",
        "--base",
        str(base_dir),
        "--task",
        "sft",
        "--data",
        str(chats),
        "--name",
        "chatty",
        "--epochs",
        "2",
        "--batch-size",
        "2",
        "-q",
    )
    assert proc.returncode == 0, proc.stderr
    from lmforge.model.formats import load_model
    from lmforge.resolve import resolve

    loaded = load_model(resolve("chatty").path)
    assert loaded.lineage["stage"] == "finetune" and loaded.lineage["task"] == "sft"
    text = tmp_path / "held.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.\n", encoding="utf-8")
    proc = lmforge_here(capsys, "eval", "chatty", "--task", "perplexity", "--data", str(text))
    assert proc.returncode == 0, proc.stderr
    assert "perplexity" in proc.stdout and "bits/byte" in proc.stdout


def test_bad_input_is_one_line(capsys, base_dir: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    train = _classify_file(tmp_path / "train.tsv", 20, 1)
    base = ["finetune", "--base", str(base_dir), "--name", "x", "--max-steps", "1", "-q"]
    # A label in eval that training never saw.
    assert lmforge_here(capsys, *base, "--task", "classify", "--data", str(train)).returncode == 0
    unseen = tmp_path / "unseen.tsv"
    unseen.write_text("sentence\tlabel\nquick fox\tanimal\nlazy dog\tplant\n", encoding="utf-8")
    proc = lmforge_here(capsys, "eval", "x", "--task", "classify", "--data", str(unseen))
    assert_one_line_error(proc, "unseen.tsv:3", "'plant'", "never seen")
    # Malformed rows name the file and line.
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        CHAT + "\n{not json\n",
        encoding="utf-8",
    )
    assert_one_line_error(
        lmforge_here(capsys, *base, "--task", "sft", "--data", str(bad)), "bad.jsonl:2"
    )
    # An answer that is not in its context.
    squad = tmp_path / "squad.json"
    squad.write_text(
        json.dumps(
            {
                "data": [
                    {
                        "paragraphs": [
                            {
                                "context": "the key is fox",
                                "qas": [
                                    {
                                        "id": "q1",
                                        "question": "key?",
                                        "answers": [{"text": "dog", "answer_start": 11}],
                                    }
                                ],
                            }
                        ]
                    }
                ]
            }
        ),
        encoding="utf-8",
    )
    assert_one_line_error(
        lmforge_here(capsys, *base, "--task", "qa", "--data", str(squad)),
        "q1",
        "not in its context",
    )
    # SFT on a base model without a chat template.
    cfg_path = base_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg))
    good = tmp_path / "good.jsonl"
    good.write_text(
        CHAT + "\n",
        encoding="utf-8",
    )
    assert_one_line_error(
        lmforge_here(capsys, *base, "--task", "sft", "--data", str(good)), "no chat template"
    )
    # LoRA targets that match no layer of a GPT-2 model (it has no gate projection).
    import torch

    from lmforge.model.formats import save_model
    from lmforge.model.transformer import Transformer

    gpt2 = save_model(Transformer(tiny_config("gpt2")), load_tok(base_dir), tmp_path / "gpt2")
    proc = lmforge_here(
        capsys,
        "finetune",
        "--base",
        str(gpt2),
        "--name",
        "g",
        "--task",
        "classify",
        "--data",
        str(train),
        "--lora",
        "--lora-targets",
        "gate",
        "-q",
    )
    assert_one_line_error(proc, "gate", "match no layer")
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox\n", encoding="utf-8")
    # Unknown targets, unknown tasks, --merge without --lora, a classifier evaluated as an LM.
    assert_one_line_error(
        lmforge_here(
            capsys,
            *base,
            "--task",
            "classify",
            "--data",
            str(train),
            "--lora",
            "--lora-targets",
            "qq",
        ),
        "qq",
    )
    assert_one_line_error(
        lmforge_here(capsys, *base, "--task", "summarize", "--data", str(train)), "summarize"
    )
    assert_one_line_error(
        lmforge_here(capsys, *base, "--task", "classify", "--data", str(train), "--merge"),
        "--merge needs --lora",
    )
    assert_one_line_error(
        lmforge_here(capsys, "eval", "x", "--task", "perplexity", "--data", str(text)),
        "classification model",
    )
    assert_one_line_error(lmforge_here(capsys, "generate", "x", "hello"), "classification model")
    del torch


def load_tok(directory: Path):  # type: ignore[no-untyped-def]
    from lmforge.tokenizer import Tokenizer

    return Tokenizer.load(directory)
