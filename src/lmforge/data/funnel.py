"""The first pass of `prepare`: read → normalize → quality filters → PII → duplicates.

Per-document work (`DocumentProcessor`: everything that needs no other document) runs in
worker processes, a bounded window of batches in flight; the main process consumes the results
in corpus order, so the duplicate indexes — and therefore the outcome — do not depend on the
number of workers. Kept documents are appended to a JSON-lines file for the second pass
(`splits`); `Funnel` counts documents and characters after every step and why each removed one
went.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

import numpy as np

from lmforge.data import clean, pii
from lmforge.data.dedup import ExactIndex, NearDuplicateIndex, exact_key, minhash_signature
from lmforge.data.sources import Document, SourceOptions, SourceTally, read_documents

if TYPE_CHECKING:
    from lmforge.data.prepare import PrepareConfig

KEPT = "_kept.jsonl"  # the kept documents, between the passes: {"t": text, "c": continued, "m"?}
_BATCH_CHARS = 1 << 20  # documents are sent to workers in batches of about 1 MB
_BATCH_DOCS = 512


class Progress(Protocol):
    """What `prepare` reports while it works (the CLI draws it as a progress bar)."""

    def stage(self, name: str, total: int | None) -> None:
        """A new stage begins; TOTAL is what its `advance` calls add up to (None: unknown)."""

    def advance(self, documents: int, done: int, text_bytes: int) -> None:
        """DOCUMENTS more handled; DONE more units of the total; TEXT_BYTES more text (MB/s)."""


# -- per-document work (runs in worker processes) --------------------------------------------


@dataclass(slots=True)
class Processed:
    text: str | None  # None: removed
    messages: list[dict[str, str]] | None
    reason: str | None  # why it was removed
    chars: list[int]  # characters after each worker step it passed: read, normalize, quality, pii
    lines_removed: dict[str, int]
    pii_counts: dict[str, int]
    exact_key: bytes | None = None
    signature: np.ndarray | None = None


class DocumentProcessor:
    """Everything done to one document that needs no other document."""

    def __init__(self, config: PrepareConfig) -> None:
        self.quality = clean.QualityFilter(config.quality_config())
        self.pii_mode = config.pii
        self.scanner = pii.PiiScanner() if config.pii != "keep" else None
        self.kinds = {r.name: r.kind for r in self.scanner.rules} if self.scanner else {}
        self.dedup = config.dedup
        self.minhash = config.minhash_params() if config.dedup == "minhash" else None

    def process(self, text: str, messages: list[dict[str, str]] | None) -> Processed:
        chars_in = len(text)
        if messages is not None:
            messages = [{**m, "content": clean.normalize(m["content"])} for m in messages]
            text = "\n\n".join(m["content"] for m in messages)
        else:
            text = clean.normalize(text)
        out = Processed(None, messages, None, [chars_in, len(text)], {}, {})
        if not text.strip():
            out.reason = "empty"
            return out
        result = self.quality.apply(text)
        out.lines_removed = dict(result.lines_removed)
        if result.text is None:
            out.reason = result.reason
            return out
        if messages is None:  # line-level removals apply to plain text only
            text = result.text
        out.chars.append(len(text))
        if self.scanner is not None:
            if self.pii_mode == "drop":
                found = self.scanner.find(text)
                if found:
                    out.pii_counts = dict(Counter(m.kind for m in found))
                    out.reason = "pii"
                    return out
            else:
                text, by_rule = self.scanner.scrub(text)
                kinds: Counter[str] = Counter()
                for rule, n in by_rule.items():
                    kinds[self.kinds[rule]] += n
                out.pii_counts = dict(kinds)
                if messages is not None:
                    messages = [
                        {**m, "content": self.scanner.scrub(m["content"])[0]} for m in messages
                    ]
        out.text, out.messages = text, messages
        out.chars.append(len(text))
        if self.dedup != "none":
            out.exact_key = exact_key(text)
        if self.minhash is not None:
            out.signature = minhash_signature(text, self.minhash)
        return out

    def process_batch(
        self, batch: list[tuple[str, list[dict[str, str]] | None]]
    ) -> list[Processed]:
        return [self.process(text, messages) for text, messages in batch]


_worker_processor: DocumentProcessor | None = None  # set once per worker process


def _init_worker(config: PrepareConfig) -> None:
    global _worker_processor
    _worker_processor = DocumentProcessor(config)


def _work(batch: list[tuple[str, list[dict[str, str]] | None]]) -> list[Processed]:
    assert _worker_processor is not None
    return _worker_processor.process_batch(batch)


# -- the funnel ------------------------------------------------------------------------------


STEPS = ("read", "normalize", "quality", "pii", "exact_dedup", "near_dedup")


@dataclass
class Funnel:
    """Counts for the manifest: documents and characters through every step, and why removed."""

    read_bytes: int = 0  # UTF-8 bytes of the text read (MB/s are of these)
    passed: dict[str, list[int]] = field(  # step → [documents, chars] after it
        default_factory=lambda: {step: [0, 0] for step in STEPS}
    )
    removed: dict[str, list[int]] = field(default_factory=dict)  # reason → [documents, chars]
    lines_removed: Counter[str] = field(default_factory=Counter)
    pii: Counter[str] = field(default_factory=Counter)
    read_per_source: Counter[int] = field(default_factory=Counter)  # by index in the sources
    kept_per_source: Counter[int] = field(default_factory=Counter)

    def record(self, chars: list[int], reason: str | None) -> None:
        """A document that passed len(CHARS) steps (CHARS after each), removed for REASON."""
        for step, n in zip(STEPS, chars, strict=False):
            self.passed[step][0] += 1
            self.passed[step][1] += n
        if reason is not None:
            entry = self.removed.setdefault(reason, [0, 0])
            entry[0] += 1
            entry[1] += chars[-1]

    @property
    def read_docs(self) -> int:
        return self.passed["read"][0]

    @property
    def kept_docs(self) -> int:
        return self.passed[STEPS[-1]][0]

    @property
    def kept_chars(self) -> int:
        return self.passed[STEPS[-1]][1]

    def steps(self) -> list[dict[str, Any]]:
        """Documents and characters after each step, raw → kept."""
        return [{"step": s, "documents": d, "chars": c} for s, (d, c) in self.passed.items()]


def worker_count(config: PrepareConfig) -> int:
    return config.workers or os.cpu_count() or 1


def _batches(
    files: list[Path], options: SourceOptions, tally: SourceTally
) -> Iterator[list[Document]]:
    batch: list[Document] = []
    chars = 0
    for origin, path in enumerate(files):
        for doc in read_documents(path, options, tally):
            doc.origin = origin
            batch.append(doc)
            chars += len(doc.text)
            if chars >= _BATCH_CHARS or len(batch) >= _BATCH_DOCS:
                yield batch
                batch, chars = [], 0
    if batch:
        yield batch


def _processed_batches(
    config: PrepareConfig, files: list[Path], tally: SourceTally
) -> Iterator[tuple[list[Document], list[Processed]]]:
    """(documents, results) batch by batch, in corpus order, WORKERS processes working (or the
    Ray cluster, with --executor ray)."""
    if config.executor == "ray":
        from lmforge.data import ray_executor

        yield from ray_executor.processed_batches(config, files, tally)
        return
    options = SourceOptions(text_field=config.text_field, on_error=config.on_error)
    batches = _batches(files, options, tally)
    workers = worker_count(config)
    if workers == 1:
        processor = DocumentProcessor(config)
        for batch in batches:
            yield batch, processor.process_batch([(d.text, d.messages) for d in batch])
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with context.Pool(workers, initializer=_init_worker, initargs=(config,)) as pool:
        window: deque[tuple[list[Document], Any]] = deque()
        for batch in batches:
            window.append(
                (batch, pool.apply_async(_work, ([(d.text, d.messages) for d in batch],)))
            )
            if len(window) >= 2 * workers:  # bounded: at most 2 batches per worker in flight
                done, result = window.popleft()
                yield done, result.get()
        while window:
            done, result = window.popleft()
            yield done, result.get()


def filter_documents(
    config: PrepareConfig,
    files: list[Path],
    funnel: Funnel,
    tally: SourceTally,
    kept: IO[str],
    removed_file: IO[str] | None,
    progress: Progress | None,
) -> None:
    exact = ExactIndex() if config.dedup != "none" else None
    near = NearDuplicateIndex(config.minhash_params()) if config.dedup == "minhash" else None
    seen_bytes = text = 0
    for batch, results in _processed_batches(config, files, tally):
        for doc, res in zip(batch, results, strict=True):
            funnel.read_per_source[doc.origin] += 1
            funnel.read_bytes += len(doc.text.encode("utf-8", "surrogatepass"))
            funnel.lines_removed.update(res.lines_removed)
            funnel.pii.update(res.pii_counts)
            reason, chars = res.reason, res.chars
            if reason is None:
                if exact is not None and exact.add(res.exact_key or b""):
                    reason = "exact_duplicate"
                else:
                    chars.append(chars[-1])
            if reason is None:
                index = funnel.read_docs  # a unique key per document
                if (
                    near is not None
                    and res.signature is not None
                    and near.add(index, res.signature)
                ):
                    reason = "near_duplicate"
                else:
                    chars.append(chars[-1])
            funnel.record(chars, reason)
            if reason is not None:
                if removed_file is not None:
                    removed = {"source": doc.source, "reason": reason, "text": doc.text}
                    removed_file.write(json.dumps(removed, ensure_ascii=False) + "\n")
                continue
            assert res.text is not None
            funnel.kept_per_source[doc.origin] += 1
            record: dict[str, Any] = {"t": res.text, "c": doc.continued}
            if res.messages is not None:
                record["m"] = res.messages
            kept.write(json.dumps(record, ensure_ascii=False) + "\n")
        if progress:  # the total is the sources' size on disk (compressed or not)
            progress.advance(len(batch), tally.bytes_read - seen_bytes, funnel.read_bytes - text)
            seen_bytes, text = tally.bytes_read, funnel.read_bytes


def nothing_left(funnel: Funnel, tally: SourceTally) -> str:
    if funnel.read_docs == 0:
        skipped = sum(tally.errors.values())
        return (
            f"no documents in the sources ({skipped} records skipped)"
            if skipped
            else ("no documents in the sources (all files are empty)")
        )
    reasons = ", ".join(
        f"{reason} {n}"
        for reason, (n, _) in sorted(funnel.removed.items(), key=lambda kv: -kv[1][0])
    )
    return f"no documents left after filtering: read {funnel.read_docs}, removed {reasons}"


def kept_records(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)
