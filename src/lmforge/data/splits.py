"""The second pass of `prepare`: tokenizer → splits → token shards.

The tokenizer is trained on the kept documents (BPE on a sample of at most
`--tokenizer-sample-mb`, char on all of them) or given. `--split random` assigns whole documents
by a seeded permutation; `--split tail` cuts the character stream like nanoGPT. Each document's
ids are followed by the EOS token (when the tokenizer has one), except inside a text file's
consecutive parts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lmforge.data.funnel import Funnel, Progress, kept_records
from lmforge.data.shards import SPLITS, ShardInfo, ShardWriter, token_dtype
from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.bpe import byte_tokenizer, train_bpe
from lmforge.tokenizer.char import CharEncoder, is_char_tokenizer, train_char
from lmforge.tokenizer.chat import CHATML_TEMPLATE, render_chat

if TYPE_CHECKING:
    from lmforge.data.prepare import PrepareConfig

log = logging.getLogger(__name__)

_ENCODE_CHARS = 4 << 20  # documents are encoded in batches of about 4 M characters


def _training_text(record: dict[str, Any]) -> str:
    """A kept document as the trained tokenizer will see it (chats rendered as ChatML)."""
    if "m" in record:
        return render_chat(CHATML_TEMPLATE, record["m"], add_generation_prompt=False)
    return str(record["t"])


def train_tokenizer(
    config: PrepareConfig,
    kept_path: Path,
    funnel: Funnel,
    plan: np.ndarray | None,
    progress: Progress | None,
) -> Tokenizer:
    """The tokenizer --tokenizer names, trained on the kept documents where it learns anything.

    BPE learns from the training split only (held-out text must not shape the vocabulary), and
    from every k-th of its documents, k chosen so that at most --tokenizer-sample-mb of text is
    read: training time and memory grow with the text, the merges hardly change past ~100 MB.
    The char vocabulary is built from every document, so that held-out text encodes too.
    """
    if progress:
        progress.stage(f"train {config.tokenizer} tokenizer", None)
    if config.tokenizer == "char":
        return train_char(_training_text(r) for r in kept_records(kept_path))
    if config.tokenizer == "byte":
        return byte_tokenizer()
    train_share = 1 - config.val_fraction - config.test_fraction
    train_chars = funnel.kept_chars * train_share
    stride = max(1, int(-(-train_chars // (config.tokenizer_sample_mb * 1_000_000))))
    if stride > 1:
        log.info("training the BPE on every %d-th training document", stride)

    def texts() -> Iterator[str]:
        pos, bound, seen = 0, int(funnel.kept_chars * train_share), 0
        for i, record in enumerate(kept_records(kept_path)):
            in_train = plan[i] == 0 if plan is not None else pos < bound
            pos += len(record["t"])
            if in_train:
                if seen % stride == 0:
                    yield _training_text(record)
                seen += 1

    length = int(funnel.kept_docs * train_share) // stride + 1
    return train_bpe(texts(), vocab_size=config.vocab_size, length=length)


def split_plan(config: PrepareConfig, n_docs: int) -> np.ndarray:
    """Split index (0 train, 1 val, 2 test) of each kept document, for --split random.

    Exactly round(n · fraction) documents per held-out split (at least one when the fraction is
    positive), chosen by a permutation seeded with --seed: deterministic at document level.
    """
    plan = np.zeros(n_docs, dtype=np.int8)
    order = np.random.default_rng(config.seed).permutation(n_docs)
    start = 0
    for index, fraction in ((1, config.val_fraction), (2, config.test_fraction)):
        count = max(1, round(n_docs * fraction)) if fraction > 0 else 0
        plan[order[start : start + count]] = index
        start += count
    if start >= n_docs:
        raise LmforgeError(
            f"only {n_docs} documents: too few to hold out --val-fraction {config.val_fraction} "
            f"and --test-fraction {config.test_fraction} and still train (try --split tail)"
        )
    return plan


def _pieces(
    config: PrepareConfig,
    tokenizer: Tokenizer,
    kept_path: Path,
    total_chars: int,
    plan: np.ndarray | None,
) -> Iterator[tuple[int, str, bool]]:
    """(split, text, continued) for every piece of every kept document, in order.

    --split tail cuts the character stream like nanoGPT: the first (1 - val - test) of all
    characters train, then val, then test; a document on a boundary is cut in two.
    """
    held = config.val_fraction + config.test_fraction
    bounds = [int(total_chars * (1 - held)), int(total_chars * (1 - config.test_fraction))]
    pos = 0
    for i, record in enumerate(kept_records(kept_path)):
        text = _rendered(tokenizer, record)
        continued = bool(record["c"])
        if plan is not None:
            yield int(plan[i]), text, continued
            continue
        start, end = pos, pos + len(text)
        pos = end
        cut_from = start
        for split, bound in enumerate(bounds):
            if cut_from < bound < end:
                yield split, text[cut_from - start : bound - start], continued
                cut_from, continued = bound, True
        split = sum(cut_from >= b for b in bounds)
        yield split, text[cut_from - start :], continued


def write_splits(
    config: PrepareConfig,
    tokenizer: Tokenizer,
    kept_path: Path,
    build: Path,
    funnel: Funnel,
    plan: np.ndarray | None,
    progress: Progress | None,
) -> tuple[dict[str, dict[str, int]], list[ShardInfo], np.ndarray]:
    """Tokenize the kept documents into split shards; returns split counts, shards, doc lengths."""
    dtype = token_dtype(tokenizer.vocab_size)
    if config.executor == "ray":
        from lmforge.data import ray_executor

        encode = ray_executor.encoder(tokenizer)
    else:
        encode = encoder_for(tokenizer)
    writers = [ShardWriter(build, s, dtype, config.shard_tokens) for s in SPLITS]
    counts = {s: {"documents": 0, "chars": 0, "tokens": 0} for s in SPLITS}
    eos = tokenizer.eos_id
    total_chars = funnel.kept_chars
    if config.split == "tail":  # chats render longer than their contents: count what is cut
        total_chars = sum(len(_rendered(tokenizer, r)) for r in kept_records(kept_path))
    doc_tokens: list[int] = []
    current = 0
    pending_eos: int | None = None  # split of the document whose EOS is owed
    batch: list[tuple[int, str, bool]] = []
    batch_chars = 0

    def flush() -> None:
        nonlocal current, pending_eos, batch_chars
        encoded = encode([t for _, t, _ in batch])
        for (split, text, continued), ids in zip(batch, encoded, strict=True):
            if not continued and pending_eos is not None and eos is not None:
                writers[pending_eos].write(np.array([eos]))
                counts[SPLITS[pending_eos]]["tokens"] += 1
                current += 1
            if not continued and pending_eos is not None:
                doc_tokens.append(current)
                current = 0
            writers[split].write(ids)
            entry = counts[SPLITS[split]]
            entry["tokens"] += len(ids)
            entry["chars"] += len(text)
            entry["documents"] += 1  # a document cut by --split tail counts in both
            current += len(ids)
            pending_eos = split
        if progress:
            chars = sum(len(t) for _, t, _ in batch)  # the total is in characters
            progress.advance(len(batch), chars, chars)
        batch.clear()
        batch_chars = 0

    for piece in _pieces(config, tokenizer, kept_path, total_chars, plan):
        batch.append(piece)
        batch_chars += len(piece[1])
        if batch_chars >= _ENCODE_CHARS or len(batch) >= 2048:
            flush()
    if batch:
        flush()
    if pending_eos is not None:
        if eos is not None:
            writers[pending_eos].write(np.array([eos]))
            counts[SPLITS[pending_eos]]["tokens"] += 1
            current += 1
        doc_tokens.append(current)
    shards = [s for w in writers for s in w.close()]
    return counts, shards, np.asarray(doc_tokens, dtype=np.int64)


def encoder_for(tokenizer: Tokenizer) -> Callable[[list[str]], list[np.ndarray]]:
    """texts → id arrays: a lookup table for char tokenizers, HF's batch encoder otherwise."""
    if is_char_tokenizer(tokenizer):
        table = CharEncoder(tokenizer)
        return lambda texts: [table(t) for t in texts]

    def encode(texts: list[str]) -> list[np.ndarray]:
        batch = tokenizer.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(ids, dtype=np.int64) for ids in batch]

    return encode


def _rendered(tokenizer: Tokenizer, record: dict[str, Any]) -> str:
    if "m" in record:
        return tokenizer.render_chat(record["m"], add_generation_prompt=False)
    return str(record["t"])
