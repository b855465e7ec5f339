"""Task heads on the Transformer: sequence classification and extractive (span) QA.

    model = SequenceClassifier(body, labels=("neg", "pos"), pooling="last")
    logits = model(ids, lengths)                   # [B, n_labels]
    qa = SpanQA(body)
    start, end = qa(ids).unbind(-1)                # [B, T] each

Both reuse the decoder's final hidden states (`Transformer.hidden_states`) and drop its LM head,
as Hugging Face's `*ForSequenceClassification` / `*ForQuestionAnswering` do, so a saved head
model loads there unchanged (`model/formats/heads.py` writes the names and architectures):

- `SequenceClassifier`: pooling `last` takes the hidden state of each row's last real token (a
  decoder's only position that has seen the whole text; HF's pooling for right-padded input),
  `mean` averages the real tokens; then `score` (no bias) → one logit per label. The label set is
  part of the model (`labels`, HF's `id2label`).
- `SpanQA`: `qa_outputs` (with bias) maps every position to a start and an end logit.

Rows are right-padded; `lengths` says how many tokens of each row are real. A causal decoder's
real tokens never attend to the padding after them, so padding changes nothing they compute.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.model.transformer import ModelConfig, Transformer

HeadTask = Literal["classify", "qa"]
POOLINGS = ("last", "mean")


@dataclass(frozen=True)
class HeadConfig:
    """What a head model adds to its decoder; stored in config.json as `lmforge_head`."""

    task: HeadTask
    labels: tuple[str, ...] = ()  # classify: index → label
    pooling: str = "last"  # classify: last | mean
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. qa: max_answer_tokens

    def __post_init__(self) -> None:
        if self.task not in ("classify", "qa"):
            raise LmforgeError(f"unknown head task {self.task!r} (classify, qa)")
        if self.task == "classify":
            if len(self.labels) < 2:
                raise LmforgeError(f"a classifier needs at least 2 labels, got {len(self.labels)}")
            if len(set(self.labels)) != len(self.labels):
                raise LmforgeError("the classifier's labels must be distinct")
            if self.pooling not in POOLINGS:
                raise LmforgeError(f"--pooling must be last or mean, not {self.pooling!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "labels": list(self.labels),
            "pooling": self.pooling,
            **({"extra": self.extra} if self.extra else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HeadConfig:
        return cls(
            task=data["task"],
            labels=tuple(str(x) for x in data.get("labels", ())),
            pooling=str(data.get("pooling", "last")),
            extra=dict(data.get("extra") or {}),
        )


def headless(body: Transformer) -> Transformer:
    """BODY without its LM head (in place): a head model never computes vocabulary logits."""
    if hasattr(body, "lm_head"):
        del body.lm_head
    return body


class HeadModel(nn.Module):
    """A decoder body plus a task head; `config` is the body's (the training loop reads it)."""

    body: Transformer
    head: HeadConfig

    @property
    def config(self) -> ModelConfig:
        return self.body.config


class SequenceClassifier(HeadModel):
    def __init__(self, body: Transformer, head: HeadConfig) -> None:
        super().__init__()
        if head.task != "classify":
            raise LmforgeError(f"SequenceClassifier needs a classify head, not {head.task}")
        self.body = headless(body)
        self.head = head
        self.score = nn.Linear(body.config.d_model, len(head.labels), bias=False)
        if not self.score.weight.is_meta:
            nn.init.normal_(self.score.weight, 0.0, body.config.init_std)

    @property
    def labels(self) -> tuple[str, ...]:
        return self.head.labels

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, n_labels] for right-padded IDS [B, T] with LENGTHS [B] real tokens."""
        h = self.body.hidden_states(ids)  # [B, T, C]
        b, t = ids.shape
        if lengths is None:
            lengths = torch.full((b,), t, dtype=torch.long, device=h.device)
        if self.head.pooling == "mean":
            mask = (torch.arange(t, device=h.device).unsqueeze(0) < lengths.unsqueeze(1)).to(
                h.dtype
            )
            pooled = (h * mask.unsqueeze(-1)).sum(1) / lengths.clamp(min=1).unsqueeze(1).to(h.dtype)
        else:
            pooled = h[torch.arange(b, device=h.device), (lengths - 1).clamp(min=0)]
        return self.score(pooled)


class SpanQA(HeadModel):
    def __init__(self, body: Transformer, head: HeadConfig | None = None) -> None:
        super().__init__()
        head = head or HeadConfig("qa")
        if head.task != "qa":
            raise LmforgeError(f"SpanQA needs a qa head, not {head.task}")
        self.body = headless(body)
        self.head = head
        self.qa_outputs = nn.Linear(body.config.d_model, 2)
        if not self.qa_outputs.weight.is_meta:
            nn.init.normal_(self.qa_outputs.weight, 0.0, body.config.init_std)
            nn.init.zeros_(self.qa_outputs.bias)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Start and end logits [B, T, 2]; positions at or past LENGTHS are -inf."""
        logits = self.qa_outputs(self.body.hidden_states(ids))
        if lengths is not None:
            pad = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0) >= lengths.unsqueeze(1)
            logits = logits.masked_fill(pad.unsqueeze(-1), float("-inf"))
        return logits


def head_model(body: Transformer, head: HeadConfig) -> SequenceClassifier | SpanQA:
    """The head model HEAD describes, on BODY (whose LM head is dropped)."""
    if head.task == "classify":
        return SequenceClassifier(body, head)
    return SpanQA(body, head)
