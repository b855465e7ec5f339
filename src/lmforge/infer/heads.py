"""Inference with task heads: labels with scores, answers with character offsets.

    preds = classify(model, tokenizer, ["a fine film", "dull"])  # [Prediction(label, scores)]
    ans = answer(model, tokenizer, "Who?", context)  # Answer(text, start, end, score)

Used by `lmforge eval` and the server's /v1/classifications and /v1/answers, with the token
layout the head was trained on (`data/features.py`). Texts are run in batches of similar length
(right-padded; `model/heads.py`). A QA context longer than the model's window is split into
overlapping windows as in training; the answer is the span (start ≤ end, at most
`max_answer_tokens`) with the highest start + end logit over every window — Hugging Face
`run_qa.py`'s post-processing — mapped back to the exact characters of the context.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmforge.data.features import pad_id, qa_windows, text_features
from lmforge.model.devices import model_device
from lmforge.model.heads import SequenceClassifier, SpanQA
from lmforge.tokenizer import Tokenizer

MAX_ANSWER_TOKENS = 30
BATCH = 16


@dataclass(frozen=True)
class Prediction:
    label: str
    scores: dict[str, float]  # label → probability
    tokens: int  # input tokens read


@dataclass(frozen=True)
class Answer:
    text: str
    start: int  # character offsets in the context: context[start:end] == text
    end: int
    score: float  # start logit + end logit of the chosen span
    tokens: int


def _batch(
    rows: Sequence[list[int]], pad: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = [r + [pad] * (width - len(r)) for r in rows]
    lengths = [len(r) for r in rows]
    return torch.tensor(ids, dtype=torch.long, device=device), torch.tensor(lengths, device=device)


@torch.inference_mode()
def classify(
    model: SequenceClassifier, tokenizer: Tokenizer, texts: Sequence[str], *, batch: int = BATCH
) -> list[Prediction]:
    max_len = model.config.max_seq_len
    rows = [text_features(tokenizer, t, max_len=max_len) for t in texts]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out: list[Prediction | None] = [None] * len(rows)
    labels = model.labels
    for at in range(0, len(order), batch):
        idx = order[at : at + batch]
        ids, lengths = _batch([rows[i] for i in idx], pad_id(tokenizer), model_device(model))
        probs = torch.softmax(model(ids, lengths).float(), dim=-1)
        for i, p in zip(idx, probs.tolist(), strict=True):
            best = max(range(len(p)), key=p.__getitem__)
            out[i] = Prediction(labels[best], dict(zip(labels, p, strict=True)), len(rows[i]))
    return [p for p in out if p is not None]


@torch.inference_mode()
def answer(
    model: SpanQA,
    tokenizer: Tokenizer,
    question: str,
    context: str,
    *,
    max_answer_tokens: int = MAX_ANSWER_TOKENS,
) -> Answer:
    extra = model.head.extra
    max_len = int(extra.get("max_len") or model.config.max_seq_len)
    stride = int(extra.get("doc_stride", 128))
    windows = qa_windows(tokenizer, question, context, max_len=max_len, doc_stride=stride)
    best: tuple[float, int, int] | None = None  # score, start char, end char
    tokens = 0
    for at in range(0, len(windows), BATCH):
        group = windows[at : at + BATCH]
        ids, lengths = _batch([w.ids for w in group], pad_id(tokenizer), model_device(model))
        logits = model(ids, lengths).float()  # [B, T, 2]
        tokens += int(lengths.sum())
        for w, row in zip(group, logits, strict=True):
            first, last = w.context_start, len(w.ids) - 1
            start = row[first : last + 1, 0]
            end = row[first : last + 1, 1]
            # score[i, j] = start[i] + end[j], for i ≤ j < i + max_answer_tokens
            n = start.shape[0]
            scores = start.unsqueeze(1) + end.unsqueeze(0)
            steps = torch.arange(n, device=scores.device)
            i, j = torch.meshgrid(steps, steps, indexing="ij")
            scores = scores.masked_fill((j < i) | (j - i >= max_answer_tokens), float("-inf"))
            flat = int(scores.argmax())
            s_tok, e_tok = divmod(flat, n)
            score = float(scores[s_tok, e_tok])
            if best is None or score > best[0]:
                a, b = w.char_span(first + s_tok, first + e_tok)
                best = (score, a, b)
    assert best is not None
    score, a, b = best
    while a < b and context[a].isspace():  # byte-level tokens carry their leading space
        a += 1
    while b > a and context[b - 1].isspace():
        b -= 1
    return Answer(context[a:b], a, b, score, tokens)
