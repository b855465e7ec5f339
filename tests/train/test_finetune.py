"""Fine-tuning: SFT loss masks, heads that learn synthetic tasks, resume, HF compatibility."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from lmforge.data.examples import ChatExample, LabeledText, QAExample
from lmforge.data.features import chat_features, qa_windows
from lmforge.errors import LmforgeError
from lmforge.infer.heads import answer, classify
from lmforge.model.heads import HeadConfig, SequenceClassifier, SpanQA
from lmforge.model.transformer import Transformer
from lmforge.train.loop import LoopConfig, train
from lmforge.train.tasks import IGNORE, LabelledTexts, PackedChat, QAFeatures

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
ANIMALS = ["fox", "dog", "zebras"]


def _body(seed: int = 0, **overrides: object) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny_config("llama", **{"max_seq_len": 64, **overrides}))


def _loop(steps: int, **kw: object) -> LoopConfig:
    base = dict(
        max_steps=steps, batch_size=16, block_size=64, lr=3e-3, min_lr=3e-4, warmup=10,
        weight_decay=0.0, eval_every=0, ckpt_every=0, seed=3,
    )  # fmt: skip
    base.update(kw)
    return LoopConfig(**base)  # type: ignore[arg-type]


def test_sft_mask_marks_exactly_the_assistant_turns(tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "The quick brown fox?"},
        {"role": "assistant", "content": "Jumps over the lazy dog."},
        {"role": "user", "content": "Five dozen?"},
        {"role": "assistant", "content": "Liquor jugs!"},
    ]
    ids, mask = chat_features(tiny_tokenizer, messages)
    assert len(ids) == len(mask)
    # The ids are the rendered conversation, token for token.
    full = tiny_tokenizer.render_chat(messages, add_generation_prompt=False)
    assert tiny_tokenizer.decode(ids, skip_special_tokens=False) == full
    # The trained tokens are each assistant turn's content and its end-of-turn marker.
    runs, current = [], []
    for tid, trained in zip(ids, mask, strict=True):
        if trained:
            current.append(tid)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    texts = [tiny_tokenizer.decode(r, skip_special_tokens=False) for r in runs]
    assert texts == ["Jumps over the lazy dog.<|im_end|>\n", "Liquor jugs!<|im_end|>\n"]
    # Labels of the packed rows keep exactly those tokens as targets.
    data = PackedChat.build(tiny_tokenizer, [ChatExample(tuple(messages), "x:1")], block_size=256)
    x, y = data.rows[0]
    targets = [t for t in y if t != IGNORE]
    assert targets == [t for t, m in zip(ids, mask, strict=True) if m]
    assert x == ids[:-1]


def test_sft_without_assistant_turn_is_an_error(tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(LmforgeError, match="nothing to learn"):
        chat_features(tiny_tokenizer, [{"role": "user", "content": "hi"}])


def _animal_examples(n: int, seed: int) -> list[LabeledText]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = rng.sample(WORDS, rng.randint(3, 6))
        label = "animal" if i % 2 else "other"
        if label == "animal":
            words.insert(rng.randrange(len(words) + 1), rng.choice(ANIMALS))
        out.append(LabeledText(" ".join(words), label, f"syn:{i}"))
    return out


def test_classifier_learns_a_synthetic_task(tiny_tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    train_ex, test_ex = _animal_examples(400, 1), _animal_examples(100, 2)
    labels = ("animal", "other")
    data = LabelledTexts.build(tiny_tokenizer, train_ex, labels, max_len=64)
    model = SequenceClassifier(_body(), HeadConfig("classify", labels))
    result = train(model, data, _loop(150), tmp_path / "run")
    assert result.train_loss < 0.2
    model.eval()
    predicted = [p.label for p in classify(model, tiny_tokenizer, [e.text for e in test_ex])]
    accuracy = sum(p == e.label for p, e in zip(predicted, test_ex, strict=True)) / len(test_ex)
    assert accuracy >= 0.95


def _key_examples(n: int, seed: int) -> list[QAExample]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        before = " ".join(rng.sample(WORDS, rng.randint(1, 5)))
        after = " ".join(rng.sample(WORDS, rng.randint(1, 5)))
        key = rng.choice([*ANIMALS, "café", "naïve", "zebras jump"])
        context = f"{before} the key is {key} {after}"
        answers = ((key, context.index(f"is {key}") + 3),)
        out.append(QAExample(f"q{i}", "what is the key", context, answers, f"syn#{i}"))
    return out


def test_span_head_learns_a_synthetic_task(tiny_tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    train_ex, test_ex = _key_examples(300, 1), _key_examples(60, 2)
    data = QAFeatures.build(tiny_tokenizer, train_ex, max_len=64, doc_stride=16)
    model = SpanQA(_body(), HeadConfig("qa", extra={"doc_stride": 16, "max_len": 64}))
    train(model, data, _loop(200), tmp_path / "run")
    model.eval()
    exact = 0
    for ex in test_ex:
        got = answer(model, tiny_tokenizer, ex.question, ex.context)
        assert ex.context[got.start : got.end] == got.text  # offsets are the context's
        exact += got.text == ex.answers[0][0]
    assert exact / len(test_ex) >= 0.95


def test_qa_windows_split_long_contexts_and_map_answers_back(tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    context = " ".join(WORDS * 4) + " the key is fox at the end"
    start = context.index("fox")
    windows = qa_windows(tiny_tokenizer, "what is the key", context, max_len=48, doc_stride=8)
    assert len(windows) > 2
    assert all(len(w.ids) <= 48 for w in windows)
    holding = [w for w in windows if w.token_span(start, start + 3) is not None]
    assert holding  # the answer lies wholly inside at least one window
    first, last = holding[-1].token_span(start, start + 3)  # type: ignore[misc]
    a, b = holding[-1].char_span(first, last)
    assert context[a:b].strip() == "fox"
    # Consecutive windows share exactly doc_stride context tokens.
    assert windows[0].offsets[-8:] == windows[1].offsets[:8]


def test_example_stream_resumes_on_the_next_batch(tiny_tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A run resumed from its step-30 checkpoint computes the same losses as the run that went
    straight through (epochs of 8 batches: the cut falls mid-epoch)."""
    examples = _animal_examples(120, 3)
    labels = ("animal", "other")

    def run(directory: Path, *, resume: bool = False) -> list[float]:
        data = LabelledTexts.build(tiny_tokenizer, examples, labels, max_len=64)
        model = SequenceClassifier(_body(), HeadConfig("classify", labels))
        train(model, data, _loop(45, ckpt_every=30), directory, resume=resume)
        return [json.loads(line)["loss"] for line in (directory / "metrics.jsonl").open()]

    whole = run(tmp_path / "run")
    (tmp_path / "run" / "ckpt-00000045.pt").unlink()  # as if killed after step 30's checkpoint
    resumed = run(tmp_path / "run", resume=True)
    assert len(resumed) == 45
    assert resumed == whole


def test_saved_classifier_matches_transformers(tiny_tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    transformers = pytest.importorskip("transformers")
    from lmforge.model.formats import load_head_model, save_model

    torch.manual_seed(0)
    model = SequenceClassifier(_body(), HeadConfig("classify", ("a", "b", "c"))).eval()
    directory = save_model(model, tiny_tokenizer, tmp_path / "clf")
    ids = torch.tensor([tiny_tokenizer.encode("the quick brown fox", add_special_tokens=False)])
    with torch.no_grad():
        ours = model(ids)
        reloaded, _, _ = load_head_model(directory)
        again = reloaded(ids)
        hf = transformers.AutoModelForSequenceClassification.from_pretrained(directory).eval()
        theirs = hf(ids).logits
    torch.testing.assert_close(again, ours)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)
    assert hf.config.id2label == {0: "a", 1: "b", 2: "c"}


def test_saved_span_model_matches_transformers(tiny_tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    transformers = pytest.importorskip("transformers")
    from lmforge.model.formats import load_head_model, save_model

    torch.manual_seed(0)
    model = SpanQA(_body()).eval()
    directory = save_model(model, tiny_tokenizer, tmp_path / "qa")
    ids = torch.tensor([tiny_tokenizer.encode("what is the key fox", add_special_tokens=False)])
    with torch.no_grad():
        ours = model(ids)
        reloaded, _, _ = load_head_model(directory)
        hf = transformers.AutoModelForQuestionAnswering.from_pretrained(directory).eval()
        out = hf(ids)
    torch.testing.assert_close(reloaded(ids), ours)
    torch.testing.assert_close(out.start_logits, ours[..., 0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.end_logits, ours[..., 1], atol=1e-5, rtol=1e-4)
