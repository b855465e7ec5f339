"""What the training loop trains on: batches, their loss, and where the data stream stands.

    data = TokenWindows(train_split, val_split)                 # pretraining
    data = PackedChat.build(tokenizer, examples, block_size=512) # SFT
    data = LabelledTexts.build(tokenizer, examples, labels, max_len=128)
    data = QAFeatures.build(tokenizer, examples, max_len=384, doc_stride=128)
    data = Distillation(TokenWindows(train_split, val_split), teacher, temperature=2.0, alpha=0.5)
    train(model, data, LoopConfig(...), run_dir)

A `TrainData` gives the loop an endless stream of batches (dicts of tensors), the validation
batches, and the loss of a batch under the model. The loop knows nothing else about the task.

Resuming exactly: `TokenWindows` draws every batch from the loop's seeded generator (whose state
the checkpoint keeps); the example-based tasks go through their examples epoch by epoch in an
order fixed by (seed, epoch) and report (epoch, position) as their stream's state, which the
checkpoint keeps too — so a killed run resumes on the very next batch.

- SFT: each conversation's ids with labels only on assistant tokens (`data/features.py`), packed
  back to back into rows of `block_size` (shuffled once, first fit; an example longer than a row
  is cut, counted and logged). Targets never cross from one example into the next; attention
  does, as in Hugging Face's and LitGPT's packing.
- classify: one text per row, right-padded to the longest in its batch; each epoch's batches are
  formed from length-sorted chunks (far less padding) and then shuffled.
- QA: one context window per row; start/end labels point at the answer's tokens, or at position 0
  when the answer is not inside the window.
- distillation: pretraining's windows and stream, a loss that mixes a frozen teacher's soft
  targets with the next tokens (`distill_loss`); validation is the plain next-token loss.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.data.examples import ChatExample, LabeledText, QAExample
from lmforge.data.features import chat_features, pad_id, qa_windows, text_features
from lmforge.data.loader import TokenSplit, eval_batches, random_batches
from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
Autocast = Callable[[], contextlib.AbstractContextManager[Any]]
IGNORE = -100  # label of a position that is not trained on (F.cross_entropy's ignore_index)


class BatchStream(Iterator[Batch]):
    """An endless iterator of training batches that can say, and restore, where it stands."""

    def state(self) -> dict[str, int]:
        return {}

    def restore(self, state: dict[str, int]) -> None:
        pass


class TrainData(Protocol):
    def check(self, model: nn.Module, batch_size: int, block_size: int) -> None:
        """Raise `LmforgeError` if MODEL cannot train on this data."""

    def stream(
        self, batch_size: int, block_size: int, generator: torch.Generator, seed: int
    ) -> BatchStream:
        """Endless training batches."""

    def val_batches(self, batch_size: int, block_size: int, max_batches: int) -> Iterable[Batch]:
        """The validation batches (the same ones every time)."""

    @property
    def has_val(self) -> bool: ...

    def loss(self, model: nn.Module, batch: Batch, autocast: Autocast) -> torch.Tensor:
        """The mean loss of BATCH (what is back-propagated)."""

    def loss_sum(self, model: nn.Module, batch: Batch, autocast: Autocast) -> tuple[float, int]:
        """(summed loss, number of targets) of BATCH, for validation."""

    def tokens(self, batch: Batch) -> int:
        """Tokens the model reads in BATCH (for the tokens-seen count)."""


# ---------------------------------------------------------------------------------------------
# Language modelling: pretraining windows and packed SFT rows share the loss


def _lm_loss(model: nn.Module, batch: Batch, autocast: Autocast, reduction: str) -> torch.Tensor:
    with autocast():
        logits = model(batch["x"])  # [B, T, V]
    return F.cross_entropy(logits.float().flatten(0, 1), batch["y"].flatten(), reduction=reduction)


class _LanguageModelLoss:
    def loss(self, model: nn.Module, batch: Batch, autocast: Autocast) -> torch.Tensor:
        return _lm_loss(model, batch, autocast, "mean")

    def loss_sum(self, model: nn.Module, batch: Batch, autocast: Autocast) -> tuple[float, int]:
        total = _lm_loss(model, batch, autocast, "sum")
        return total.item(), int((batch["y"] != IGNORE).sum())

    def tokens(self, batch: Batch) -> int:
        return int(batch["x"].numel())


class _Windows(BatchStream):
    def __init__(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.batches = batches

    def __next__(self) -> Batch:
        x, y = next(self.batches)
        return {"x": x, "y": y}


@dataclass
class TokenWindows(_LanguageModelLoss):
    """Pretraining: random windows of a token split; validation: consecutive windows."""

    train: TokenSplit
    val: TokenSplit | None

    @property
    def has_val(self) -> bool:
        return self.val is not None

    def check(self, model: nn.Module, batch_size: int, block_size: int) -> None:
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if vocab is not None and self.train.vocab_size > vocab:
            raise LmforgeError(
                f"the data set's vocabulary ({self.train.vocab_size}) is larger than the "
                f"model's ({vocab})"
            )

    def stream(
        self, batch_size: int, block_size: int, generator: torch.Generator, seed: int
    ) -> BatchStream:
        return _Windows(random_batches(self.train, batch_size, block_size, generator=generator))

    def val_batches(self, batch_size: int, block_size: int, max_batches: int) -> Iterable[Batch]:
        if self.val is None:
            return []
        return (
            {"x": x, "y": y}
            for x, y in eval_batches(self.val, batch_size, block_size, max_batches=max_batches)
        )


# ---------------------------------------------------------------------------------------------
# Knowledge distillation: pretraining windows, a frozen teacher's soft targets


def check_distill_settings(temperature: float, alpha: float) -> None:
    """Raise `LmforgeError` naming the flag when TEMPERATURE or ALPHA is out of range."""
    if not (temperature > 0 and math.isfinite(temperature)):
        raise LmforgeError(f"--temperature must be positive, not {temperature}")
    if not 0 <= alpha <= 1:
        raise LmforgeError(f"--alpha must be in [0, 1], not {alpha}")


def distill_loss(
    logits: torch.Tensor,  # [B, T, V] the student's
    teacher_logits: torch.Tensor,  # [B, T, V]
    targets: torch.Tensor,  # [B, T] the next tokens
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """alpha · T² · KL(softmax(teacher/T) ‖ softmax(student/T)) + (1 − alpha) · cross-entropy
    with TARGETS; both terms are means over the tokens (the KL is summed over the vocabulary).

    T² keeps the soft targets' gradients on the scale of the hard ones whatever T is (Hinton,
    Vinyals, Dean 2015, arXiv:1503.02531, section 2). With alpha 0 this is exactly the loss of
    `TokenWindows`: the KL term is multiplied by 0.0 and adds nothing, bit for bit.
    """
    student = logits.float().flatten(0, 1)  # [N, V]
    ce = F.cross_entropy(student, targets.flatten())
    log_q = F.log_softmax(student / temperature, dim=-1)  # [N, V]
    log_p = F.log_softmax(teacher_logits.float().flatten(0, 1) / temperature, dim=-1)
    # Σ_v p (log p − log q), divided by N: "batchmean" is the KL's true mean per token.
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
    return alpha * temperature**2 * kl + (1 - alpha) * ce


@dataclass
class Distillation:
    """Knowledge distillation on pretraining windows: `TokenWindows`' batches and stream state
    (so a resumed run goes on exactly) with `distill_loss` against a frozen TEACHER.

    The teacher is put in eval mode with its gradients off; it is not part of the trained model,
    so it never enters a checkpoint. It runs on every micro-batch under the loop's autocast (fp32
    unless `--dtype bf16`), without autograd. Validation (`loss_sum`) is the plain next-token
    cross-entropy, without the teacher, so a distilled model's val loss compares directly with
    one trained by `lmforge train` on the same data set; `teacher_kl` measures how close the
    student came to the teacher.
    """

    windows: TokenWindows
    teacher: nn.Module
    temperature: float = 2.0
    alpha: float = 0.5

    def __post_init__(self) -> None:
        check_distill_settings(self.temperature, self.alpha)
        self.teacher.eval()
        self.teacher.requires_grad_(False)

    @property
    def has_val(self) -> bool:
        return self.windows.has_val

    def check(self, model: nn.Module, batch_size: int, block_size: int) -> None:
        self.windows.check(model, batch_size, block_size)
        shape = getattr(self.teacher, "config", None)
        teacher_vocab = getattr(shape, "vocab_size", None)
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if teacher_vocab is not None and vocab is not None and teacher_vocab != vocab:
            raise LmforgeError(
                f"the teacher's vocabulary ({teacher_vocab:,} tokens) is not the student's "
                f"({vocab:,} tokens): distillation compares their next-token distributions"
            )
        context = getattr(shape, "max_seq_len", None)
        if getattr(shape, "arch", None) != "lstm" and context is not None and block_size > context:
            raise LmforgeError(
                f"--block-size {block_size} is longer than the teacher's context ({context})"
            )

    def stream(
        self, batch_size: int, block_size: int, generator: torch.Generator, seed: int
    ) -> BatchStream:
        return self.windows.stream(batch_size, block_size, generator, seed)

    def val_batches(self, batch_size: int, block_size: int, max_batches: int) -> Iterable[Batch]:
        return self.windows.val_batches(batch_size, block_size, max_batches)

    def loss(self, model: nn.Module, batch: Batch, autocast: Autocast) -> torch.Tensor:
        with autocast():
            logits = model(batch["x"])  # [B, T, V]
            with torch.no_grad():
                teacher_logits = self.teacher(batch["x"])  # [B, T, V]
        return distill_loss(logits, teacher_logits, batch["y"], self.temperature, self.alpha)

    def loss_sum(self, model: nn.Module, batch: Batch, autocast: Autocast) -> tuple[float, int]:
        """The plain next-token cross-entropy (not the distillation loss), summed."""
        return self.windows.loss_sum(model, batch, autocast)

    def tokens(self, batch: Batch) -> int:
        return self.windows.tokens(batch)

    def teacher_kl(
        self, model: nn.Module, batch_size: int, block_size: int, max_batches: int
    ) -> float | None:
        """Mean KL(teacher ‖ MODEL) per token at temperature 1 over the validation batches (None
        without a validation split): how far the student's next-token distribution is from the
        teacher's."""
        was_training = model.training
        model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in self.val_batches(batch_size, block_size, max_batches):
                student = model(batch["x"]).float().flatten(0, 1)  # [N, V]
                teacher = self.teacher(batch["x"]).float().flatten(0, 1)  # [N, V]
                log_q, log_p = F.log_softmax(student, -1), F.log_softmax(teacher, -1)
                total += F.kl_div(log_q, log_p, log_target=True, reduction="sum").item()
                count += len(student)
        model.train(was_training)
        return total / count if count else None


# ---------------------------------------------------------------------------------------------
# Example-based tasks: epochs over a fixed set of rows


class _Epochs(BatchStream):
    """Batches of row indices, epoch after epoch, in an order fixed by (seed, epoch)."""

    def __init__(
        self, order: Callable[[int], list[list[int]]], collate: Callable[[list[int]], Batch]
    ) -> None:
        self.order, self.collate = order, collate
        self.epoch, self.position = 0, 0
        self.batches = order(0)

    def __next__(self) -> Batch:
        if self.position >= len(self.batches):
            self.epoch, self.position = self.epoch + 1, 0
            self.batches = self.order(self.epoch)
        batch = self.collate(self.batches[self.position])
        self.position += 1
        return batch

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def restore(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state.get("epoch", 0)), int(state.get("position", 0))
        self.batches = self.order(self.epoch)


def _permutation(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return [int(i) for i in torch.randperm(n, generator=g)]


def _chunks(indices: list[int], size: int) -> list[list[int]]:
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def _pad(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows], dtype=torch.long)


class _RowData:
    """Shared by the example tasks: rows, a validation subset, epochs, collation."""

    rows: list[Any]
    val_rows: list[Any]

    @property
    def has_val(self) -> bool:
        return bool(self.val_rows)

    def collate(self, rows: list[Any]) -> Batch:
        raise NotImplementedError

    def order(self, batch_size: int, seed: int) -> Callable[[int], list[list[int]]]:
        n = len(self.rows)
        return lambda epoch: _chunks(_permutation(n, seed, epoch), batch_size)

    def stream(
        self, batch_size: int, block_size: int, generator: torch.Generator, seed: int
    ) -> BatchStream:
        if len(self.rows) < 1:
            raise LmforgeError("no training examples")
        return _Epochs(
            self.order(batch_size, seed),
            lambda idx: self.collate([self.rows[i] for i in idx]),
        )

    def val_batches(self, batch_size: int, block_size: int, max_batches: int) -> Iterable[Batch]:
        for chunk in _chunks(list(range(len(self.val_rows))), batch_size)[:max_batches]:
            yield self.collate([self.val_rows[i] for i in chunk])

    def check(self, model: nn.Module, batch_size: int, block_size: int) -> None:
        context = getattr(getattr(model, "config", None), "max_seq_len", None)
        longest = max((len(r[0]) for r in self.rows), default=0)
        if context is not None and longest > context:
            raise LmforgeError(f"a training row has {longest} tokens; the context is {context}")


# -- SFT ---------------------------------------------------------------------------------------


def _sft_rows(
    tokenizer: Tokenizer, examples: Sequence[ChatExample], block_size: int, seed: int
) -> tuple[list[tuple[list[int], list[int]]], int]:
    """Packed (x, y) rows of BLOCK_SIZE and how many examples were cut to fit one row."""
    pairs = []
    cut = 0
    for ex in examples:
        try:
            ids, mask = chat_features(tokenizer, ex.messages)
        except LmforgeError as exc:
            raise LmforgeError(f"{ex.where}: {exc}") from None
        labels = [t if m else IGNORE for t, m in zip(ids, mask, strict=True)]
        x, y = ids[:-1], labels[1:]
        if len(x) > block_size:
            x, y, cut = x[:block_size], y[:block_size], cut + 1
        if any(t != IGNORE for t in y):
            pairs.append((x, y))
    order = _permutation(len(pairs), seed, -1)
    rows: list[tuple[list[int], list[int]]] = []
    free: list[int] = []  # room left in each row
    for i in order:  # first fit
        x, y = pairs[i]
        slot = next((r for r, room in enumerate(free) if room >= len(x)), None)
        if slot is None:
            rows.append(([], []))
            free.append(block_size)
            slot = len(rows) - 1
        rows[slot][0].extend(x)
        rows[slot][1].extend(y)
        free[slot] -= len(x)
    return rows, cut


class PackedChat(_LanguageModelLoss, _RowData):
    """SFT: conversations packed into rows, loss on the assistant tokens only."""

    def __init__(
        self, rows: list[tuple[list[int], list[int]]], val_rows: list[Any], pad_id: int
    ) -> None:
        self.rows, self.val_rows, self.pad_id = rows, val_rows, pad_id

    @classmethod
    def build(
        cls,
        tokenizer: Tokenizer,
        examples: Sequence[ChatExample],
        val_examples: Sequence[ChatExample] = (),
        *,
        block_size: int,
        seed: int = 1337,
    ) -> PackedChat:
        rows, cut = _sft_rows(tokenizer, examples, block_size, seed)
        if not rows:
            raise LmforgeError("no conversation has an assistant token left to train on")
        val_rows, _ = _sft_rows(tokenizer, val_examples, block_size, seed)
        if cut:
            log.warning("%d conversation(s) longer than %d tokens were cut", cut, block_size)
        log.info("SFT: %d conversations packed into %d rows", len(examples), len(rows))
        return cls(rows, val_rows, pad_id(tokenizer))

    def collate(self, rows: list[Any]) -> Batch:
        return {
            "x": _pad([r[0] for r in rows], self.pad_id),
            "y": _pad([r[1] for r in rows], IGNORE),
        }

    def tokens(self, batch: Batch) -> int:
        return int((batch["y"] != IGNORE).sum())


# -- classification ----------------------------------------------------------------------------


def _head_batch(model: nn.Module, batch: Batch, autocast: Autocast) -> torch.Tensor:
    with autocast():
        out: torch.Tensor = model(batch["ids"], batch["lengths"])
    return out.float()


class LabelledTexts(_RowData):
    """Classification: one text per row, cross-entropy over the label set."""

    def __init__(self, rows: list[tuple[list[int], int]], val_rows: list[Any], pad_id: int) -> None:
        self.rows, self.val_rows, self.pad_id = rows, val_rows, pad_id

    @classmethod
    def build(
        cls,
        tokenizer: Tokenizer,
        examples: Sequence[LabeledText],
        labels: Sequence[str],
        val_examples: Sequence[LabeledText] = (),
        *,
        max_len: int,
    ) -> LabelledTexts:
        index = {label: i for i, label in enumerate(labels)}

        def rows(exs: Sequence[LabeledText]) -> list[tuple[list[int], int]]:
            out = []
            for ex in exs:
                if ex.label not in index:
                    raise LmforgeError(
                        f"{ex.where}: label {ex.label!r} is not one of the model's labels "
                        f"({', '.join(labels)})"
                    )
                out.append((text_features(tokenizer, ex.text, max_len=max_len), index[ex.label]))
            return out

        return cls(rows(examples), rows(val_examples), pad_id(tokenizer))

    def order(self, batch_size: int, seed: int) -> Callable[[int], list[list[int]]]:
        lengths = [len(r[0]) for r in self.rows]

        def batches(epoch: int) -> list[list[int]]:
            perm = _permutation(len(self.rows), seed, epoch)
            out: list[list[int]] = []
            for chunk in _chunks(perm, batch_size * 32):  # sort within chunks: little padding
                chunk.sort(key=lambda i: lengths[i])
                out += _chunks(chunk, batch_size)
            shuffle = _permutation(len(out), seed, -2 - epoch)
            return [out[i] for i in shuffle]

        return batches

    def collate(self, rows: list[Any]) -> Batch:
        return {
            "ids": _pad([r[0] for r in rows], self.pad_id),
            "lengths": torch.tensor([len(r[0]) for r in rows]),
            "labels": torch.tensor([r[1] for r in rows]),
        }

    def loss(self, model: nn.Module, batch: Batch, autocast: Autocast) -> torch.Tensor:
        return F.cross_entropy(_head_batch(model, batch, autocast), batch["labels"])

    def loss_sum(self, model: nn.Module, batch: Batch, autocast: Autocast) -> tuple[float, int]:
        logits = _head_batch(model, batch, autocast)
        return F.cross_entropy(logits, batch["labels"], reduction="sum").item(), len(logits)

    def tokens(self, batch: Batch) -> int:
        return int(batch["lengths"].sum())


# -- extractive QA -----------------------------------------------------------------------------


def qa_rows(
    tokenizer: Tokenizer, examples: Sequence[QAExample], *, max_len: int, doc_stride: int
) -> list[tuple[list[int], int, int]]:
    """(ids, start, end) per context window; (0, 0) where the first answer is not inside it."""
    rows = []
    for ex in examples:
        if not ex.answers:
            raise LmforgeError(f"{ex.where}: a training question needs an answer")
        text, start = ex.answers[0]
        for window in qa_windows(
            tokenizer, ex.question, ex.context, max_len=max_len, doc_stride=doc_stride
        ):
            span = window.token_span(start, start + len(text))
            rows.append((window.ids, *(span or (0, 0))))
    return rows


class QAFeatures(_RowData):
    """Extractive QA: start and end cross-entropy over the positions of each window."""

    def __init__(
        self, rows: list[tuple[list[int], int, int]], val_rows: list[Any], pad_id: int
    ) -> None:
        self.rows, self.val_rows, self.pad_id = rows, val_rows, pad_id

    @classmethod
    def build(
        cls,
        tokenizer: Tokenizer,
        examples: Sequence[QAExample],
        val_examples: Sequence[QAExample] = (),
        *,
        max_len: int,
        doc_stride: int,
    ) -> QAFeatures:
        rows = qa_rows(tokenizer, examples, max_len=max_len, doc_stride=doc_stride)
        val_rows = qa_rows(tokenizer, val_examples, max_len=max_len, doc_stride=doc_stride)
        inside = sum(1 for r in rows if r[1] > 0)
        log.info(
            "QA: %d questions → %d windows (%d hold the answer)", len(examples), len(rows), inside
        )
        return cls(rows, val_rows, pad_id(tokenizer))

    def collate(self, rows: list[Any]) -> Batch:
        return {
            "ids": _pad([r[0] for r in rows], self.pad_id),
            "lengths": torch.tensor([len(r[0]) for r in rows]),
            "start": torch.tensor([r[1] for r in rows]),
            "end": torch.tensor([r[2] for r in rows]),
        }

    def _losses(
        self, model: nn.Module, batch: Batch, autocast: Autocast, reduction: str
    ) -> torch.Tensor:
        logits = _head_batch(model, batch, autocast)  # [B, T, 2]
        start = F.cross_entropy(logits[..., 0], batch["start"], reduction=reduction)
        end = F.cross_entropy(logits[..., 1], batch["end"], reduction=reduction)
        return (start + end) / 2

    def loss(self, model: nn.Module, batch: Batch, autocast: Autocast) -> torch.Tensor:
        return self._losses(model, batch, autocast, "mean")

    def loss_sum(self, model: nn.Module, batch: Batch, autocast: Autocast) -> tuple[float, int]:
        return self._losses(model, batch, autocast, "sum").item(), len(batch["ids"])

    def tokens(self, batch: Batch) -> int:
        return int(batch["lengths"].sum())
