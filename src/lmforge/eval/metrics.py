"""Evaluation metrics as plain functions: perplexity and bits per byte; accuracy, macro
precision / recall / F1 and the confusion matrix; SQuAD exact match and F1 with the official
answer normalization; BLEU and chrF through `sacrebleu`.

Conventions follow the references the tests compare against: scikit-learn's macro averages
(a class never predicted has precision 0, as with `zero_division=0`), the SQuAD v1.1 evaluation
script (lower-case, strip punctuation and the articles a/an/the, collapse whitespace; the best
score over the gold answers), and sacrebleu's corpus scores with its defaults.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from lmforge.errors import LmforgeError

# -- language modelling ------------------------------------------------------------------------


def perplexity(total_nll: float, tokens: int) -> float:
    """exp(mean negative log-likelihood in nats per token)."""
    if tokens <= 0:
        raise LmforgeError("perplexity needs at least one token")
    return math.exp(total_nll / tokens)


def bits_per_byte(total_nll: float, n_bytes: int) -> float:
    """Total negative log-likelihood (nats) over the text's UTF-8 bytes, in bits per byte:
    comparable across tokenizers, unlike perplexity."""
    if n_bytes <= 0:
        raise LmforgeError("bits per byte needs a non-empty text")
    return total_nll / (n_bytes * math.log(2))


# -- classification ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Classification:
    labels: list[str]  # the confusion matrix's order: sorted union of gold and predicted
    accuracy: float
    precision: float  # macro averages over LABELS
    recall: float
    f1: float
    per_label: dict[str, dict[str, float]]  # label → precision, recall, f1, support
    confusion: list[list[int]]  # [gold][predicted]


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def classification(gold: Sequence[str], predicted: Sequence[str]) -> Classification:
    """Accuracy, macro precision / recall / F1 and the confusion matrix of PREDICTED vs GOLD."""
    if len(gold) != len(predicted):
        raise LmforgeError(f"{len(gold)} gold labels but {len(predicted)} predictions")
    if not gold:
        raise LmforgeError("no examples to score")
    labels = sorted(set(gold) | set(predicted))
    index = {label: i for i, label in enumerate(labels)}
    confusion = [[0] * len(labels) for _ in labels]
    for g, p in zip(gold, predicted, strict=True):
        confusion[index[g]][index[p]] += 1
    per_label: dict[str, dict[str, float]] = {}
    for label, i in index.items():
        tp = confusion[i][i]
        predicted_as = sum(row[i] for row in confusion)
        support = sum(confusion[i])
        precision, recall = _ratio(tp, predicted_as), _ratio(tp, support)
        f1 = _ratio(2 * precision * recall, precision + recall)
        per_label[label] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    n = len(labels)
    correct = sum(confusion[i][i] for i in range(n))
    return Classification(
        labels=labels,
        accuracy=correct / len(gold),
        precision=sum(m["precision"] for m in per_label.values()) / n,
        recall=sum(m["recall"] for m in per_label.values()) / n,
        f1=sum(m["f1"] for m in per_label.values()) / n,
        per_label=per_label,
        confusion=confusion,
    )


# -- extractive QA (SQuAD v1.1) ----------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalization: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if PREDICTION equals any of ANSWERS after normalization."""
    norm = normalize_answer(prediction)
    return float(any(norm == normalize_answer(a) for a in answers))


def _token_f1(prediction: str, answer: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(answer).split()
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, answers: Sequence[str]) -> float:
    """The best token-overlap F1 of PREDICTION against any of ANSWERS."""
    return max((_token_f1(prediction, a) for a in answers), default=0.0)


def squad(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, float]:
    """Exact match and F1 in percent over a data set, as the official script reports them."""
    if len(predictions) != len(answers):
        raise LmforgeError(f"{len(answers)} questions but {len(predictions)} predictions")
    if not answers:
        raise LmforgeError("no questions to score")
    em = sum(exact_match(p, a) for p, a in zip(predictions, answers, strict=True))
    f1 = sum(qa_f1(p, a) for p, a in zip(predictions, answers, strict=True))
    return {"exact_match": 100 * em / len(answers), "f1": 100 * f1 / len(answers)}


# -- generation --------------------------------------------------------------------------------


def bleu_chrf(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU and chrF (sacrebleu's defaults) of HYPOTHESES against one reference each."""
    import sacrebleu

    if len(hypotheses) != len(references):
        raise LmforgeError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    if not references:
        raise LmforgeError("no pairs to score")
    refs = [list(references)]
    return {
        "bleu": float(sacrebleu.corpus_bleu(list(hypotheses), refs).score),
        "chrf": float(sacrebleu.corpus_chrf(list(hypotheses), refs).score),
    }
