"""Metric functions against their references: scikit-learn, the SQuAD v1.1 script's
normalization, sacrebleu."""

from __future__ import annotations

import math
import random

import pytest
import sacrebleu
from sklearn import metrics as sk

from lmforge.errors import LmforgeError
from lmforge.eval.metrics import (
    bits_per_byte,
    bleu_chrf,
    classification,
    exact_match,
    normalize_answer,
    perplexity,
    qa_f1,
    squad,
)


def test_perplexity_and_bits_per_byte() -> None:
    assert perplexity(10 * math.log(4), 10) == pytest.approx(4.0)
    assert bits_per_byte(8 * math.log(2), 8) == pytest.approx(1.0)
    with pytest.raises(LmforgeError):
        perplexity(1.0, 0)


@pytest.mark.parametrize("seed", range(5))
def test_classification_agrees_with_sklearn(seed: int) -> None:
    rng = random.Random(seed)
    labels = ["neg", "pos", "neutral", "other"][: rng.randint(2, 4)]
    gold = [rng.choice(labels) for _ in range(200)]
    # Mostly right, some wrong, and one label the model never predicts.
    pred = [g if rng.random() < 0.7 else rng.choice(labels[:-1]) for g in gold]
    ours = classification(gold, pred)
    assert ours.accuracy == pytest.approx(sk.accuracy_score(gold, pred))
    p, r, f, _ = sk.precision_recall_fscore_support(
        gold, pred, labels=ours.labels, average="macro", zero_division=0
    )
    assert (ours.precision, ours.recall, ours.f1) == pytest.approx((p, r, f))
    assert ours.confusion == sk.confusion_matrix(gold, pred, labels=ours.labels).tolist()
    per = sk.precision_recall_fscore_support(gold, pred, labels=ours.labels, zero_division=0)
    for i, label in enumerate(ours.labels):
        assert ours.per_label[label]["f1"] == pytest.approx(per[2][i])
        assert ours.per_label[label]["support"] == per[3][i]


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("  an   apple, a pear  ", "apple pear"),
        ("Theater", "theater"),  # articles only as whole words
        ("U.S.A.", "usa"),
        ("the the", ""),
    ],
)
def test_squad_normalization(text: str, normalized: str) -> None:
    assert normalize_answer(text) == normalized


def test_squad_em_and_f1_take_the_best_gold_answer() -> None:
    assert exact_match("the Denver Broncos", ["Denver Broncos", "Broncos"]) == 1.0
    assert exact_match("Denver", ["Denver Broncos"]) == 0.0
    # "denver" vs "denver broncos": precision 1, recall 1/2 → F1 2/3.
    assert qa_f1("Denver", ["Denver Broncos"]) == pytest.approx(2 / 3)
    assert qa_f1("Denver", ["Denver Broncos", "Denver"]) == 1.0
    assert qa_f1("the", ["a"]) == 0.0  # both empty after normalization: no overlap
    scores = squad(["Broncos", "nothing"], [["Denver Broncos", "Broncos"], ["something"]])
    assert scores == {"exact_match": 50.0, "f1": 50.0}


def test_bleu_and_chrf_are_sacrebleus_corpus_scores() -> None:
    hyps = ["the cat sat on the mat", "a quick brown fox", "hello world"]
    refs = ["the cat is on the mat", "the quick brown fox jumps", "hello there world"]
    ours = bleu_chrf(hyps, refs)
    assert ours["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert ours["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    pairs = zip(hyps, refs, strict=True)
    mean_of_sentences = sum(sacrebleu.sentence_bleu(h, [r]).score for h, r in pairs) / 3
    assert ours["bleu"] != pytest.approx(mean_of_sentences)  # corpus, not averaged sentences
    assert bleu_chrf(refs, refs) == pytest.approx({"bleu": 100.0, "chrf": 100.0})
    with pytest.raises(LmforgeError, match="references"):
        bleu_chrf(hyps, refs[:2])
