"""Evaluation tasks: a model and a file in, metrics out.

    metrics = eval_perplexity(model, tokenizer, texts, block_size=512)
    metrics = eval_classify(classifier, tokenizer, examples)      # + confusion matrix
    metrics = eval_qa(span_model, tokenizer, questions)
    metrics = eval_bleu(model, tokenizer, pairs, max_tokens=128)

- perplexity: every text is tokenized with a leading BOS (or EOS) so its first token is
  predicted too, then cut into consecutive windows of `block_size` predicted tokens, each window
  seeing only itself (nanoGPT's and lm-eval's disjoint windows). Bits per byte divide the total
  negative log-likelihood by ln 2 and the UTF-8 bytes of the texts: comparable across tokenizers.
- classify: the head's argmax against the gold labels; a gold label the model does not know is
  an error naming the example (it can never be predicted right).
- qa: the best span per question (`infer/heads.py`) scored with the official SQuAD v1.1
  normalization, against every gold answer.
- bleu: greedy generation for each source (rendered as a one-turn chat when the model has a chat
  template, raw otherwise; up to the first newline for raw prompts), corpus BLEU and chrF with
  sacrebleu.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from lmforge.data.examples import LabeledText, QAExample, TextPair
from lmforge.errors import LmforgeError
from lmforge.eval import metrics as m
from lmforge.infer.generate import generate_ids
from lmforge.infer.heads import answer, classify
from lmforge.infer.params import SamplingParams
from lmforge.model.heads import SequenceClassifier, SpanQA
from lmforge.model.transformer import Transformer
from lmforge.tokenizer import Tokenizer

Progress = Callable[[int], None]  # called with how many items were just done


def _noop(_: int) -> None:
    pass


@torch.inference_mode()
def eval_perplexity(
    model: Transformer,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    *,
    block_size: int = 512,
    progress: Progress = _noop,
) -> dict[str, Any]:
    block = min(block_size, model.config.max_seq_len)
    start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    nll, tokens, n_bytes = 0.0, 0, 0
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        n_bytes += len(text.encode("utf-8"))
        seq = ([start] if start is not None else []) + ids
        for at in range(0, len(seq) - 1, block):
            window = torch.tensor([seq[at : at + block + 1]])
            if window.shape[1] < 2:
                continue
            logits = model(window[:, :-1]).float()
            nll += F.cross_entropy(logits[0], window[0, 1:], reduction="sum").item()
            tokens += window.shape[1] - 1
        progress(1)
    if tokens == 0:
        raise LmforgeError("the texts hold no token to predict")
    return {
        "perplexity": m.perplexity(nll, tokens),
        "bits_per_byte": m.bits_per_byte(nll, n_bytes),
        "loss": nll / tokens,
        "tokens": tokens,
        "bytes": n_bytes,
    }


def eval_classify(
    model: SequenceClassifier,
    tokenizer: Tokenizer,
    examples: Sequence[LabeledText],
    *,
    progress: Progress = _noop,
) -> dict[str, Any]:
    known = set(model.labels)
    for ex in examples:
        if ex.label not in known:
            raise LmforgeError(
                f"{ex.where}: label {ex.label!r} was never seen in training "
                f"(the model knows {', '.join(model.labels)})"
            )
    predicted: list[str] = []
    for at in range(0, len(examples), 64):
        chunk = examples[at : at + 64]
        predicted += [p.label for p in classify(model, tokenizer, [e.text for e in chunk])]
        progress(len(chunk))
    result = m.classification([e.label for e in examples], predicted)
    return {
        "accuracy": result.accuracy,
        "precision": result.precision,
        "recall": result.recall,
        "f1": result.f1,
        "per_label": result.per_label,
        "labels": result.labels,
        "confusion": result.confusion,
    }


def eval_qa(
    model: SpanQA,
    tokenizer: Tokenizer,
    examples: Sequence[QAExample],
    *,
    progress: Progress = _noop,
) -> dict[str, Any]:
    predictions = []
    for ex in examples:
        predictions.append(answer(model, tokenizer, ex.question, ex.context).text)
        progress(1)
    scores = m.squad(predictions, [[a for a, _ in ex.answers] for ex in examples])
    return {**scores, "questions": len(examples)}


def eval_bleu(
    model: Transformer,
    tokenizer: Tokenizer,
    pairs: Sequence[TextPair],
    *,
    max_tokens: int = 128,
    stop_ids: Sequence[int] = (),
    progress: Progress = _noop,
) -> dict[str, Any]:
    chat = bool(tokenizer.chat_template)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, stop_token_ids=list(stop_ids))
    hypotheses = []
    for pair in pairs:
        if chat:
            prompt = tokenizer.encode_chat([{"role": "user", "content": pair.source}])
        else:
            prompt = tokenizer.encode(pair.source, add_special_tokens=False)
        out = [step.token_id for step in generate_ids(model, prompt, params)]
        text = tokenizer.decode([t for t in out if t not in set(stop_ids)]).strip()
        if not chat:
            text = text.split("\n", 1)[0].strip()
        hypotheses.append(text)
        progress(1)
    scores = m.bleu_chrf(hypotheses, [p.reference for p in pairs])
    return {**scores, "pairs": len(pairs), "prompt_format": "chat" if chat else "raw"}


def eval_texts(task: str, items: Sequence[Any]) -> list[str]:
    """The texts of an eval set that the contamination check compares with training data."""
    if task == "perplexity":
        return [str(t) for t in items]
    if task == "classify":
        return [e.text for e in items]
    if task == "qa":
        return [f"{e.question} {e.context}" for e in items]
    return [f"{p.source} {p.reference}" for p in items]


def headline(task: str, metrics: dict[str, Any]) -> str:
    """The one-line summary of METRICS."""
    if task == "perplexity":
        return (
            f"perplexity {metrics['perplexity']:.3f}, bits/byte {metrics['bits_per_byte']:.4f} "
            f"({metrics['tokens']:,} tokens)"
        )
    if task == "classify":
        return (
            f"accuracy {metrics['accuracy']:.4f}, macro F1 {metrics['f1']:.4f}, "
            f"macro P {metrics['precision']:.4f}, macro R {metrics['recall']:.4f}"
        )
    if task == "qa":
        return f"exact match {metrics['exact_match']:.2f}, F1 {metrics['f1']:.2f}"
    return f"BLEU {metrics['bleu']:.2f}, chrF {metrics['chrf']:.2f}"


def is_finite_metrics(metrics: dict[str, Any]) -> bool:
    return all(not isinstance(v, float) or math.isfinite(v) for v in metrics.values())
