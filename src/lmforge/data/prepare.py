"""`prepare`: raw files → a data set directory (token shards + tokenizer + manifest.json).

Two passes over the corpus, memory bounded whatever its size:

1. read → normalize → quality filters → PII → exact / near-duplicate removal. Per-document work
   (everything but the duplicate indexes) runs in `workers` processes, a bounded window of
   batches in flight, results consumed in order so the outcome does not depend on `workers`.
   Kept documents go to a temporary JSON-lines file inside the build directory.
2. tokenizer (trained on the kept documents, or taken as given) → splits → shards.

The build happens in a temporary directory renamed into place at the end, so an interrupted
run leaves no half-written data set. The data set's content key is the sha256 of the inputs'
hashes, every option that changes the output and the versions of the rules; re-running with
the same key finds the finished data set and does nothing.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Literal, Protocol

import numpy as np

from lmforge.atomic import fsync_dir
from lmforge.data import clean, pii
from lmforge.data.dedup import (
    DEDUP_VERSION,
    ExactIndex,
    MinHashParams,
    NearDuplicateIndex,
    exact_key,
    minhash_signature,
)
from lmforge.data.report import write_token_histogram
from lmforge.data.shards import (
    MANIFEST_FORMAT,
    SPLITS,
    ShardInfo,
    ShardWriter,
    read_manifest,
    shards_dict,
    token_dtype,
    write_manifest,
)
from lmforge.data.sources import (
    Document,
    SourceOptions,
    SourceTally,
    expand_sources,
    file_sha256,
    read_documents,
)
from lmforge.errors import CorruptArtifactError, LmforgeError
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.bpe import byte_tokenizer, check_vocab_size, train_bpe
from lmforge.tokenizer.char import CharEncoder, is_char_tokenizer, train_char
from lmforge.tokenizer.chat import CHATML_TEMPLATE, render_chat

log = logging.getLogger(__name__)

# Bump when the same inputs and options would give different shards (changes content keys).
PIPELINE_VERSION = 1
TRAINED_TOKENIZERS = ("bpe", "char", "byte")
_KEPT = "_kept.jsonl"
_BATCH_CHARS = 1 << 20  # documents are sent to workers in batches of about 1 MB
_BATCH_DOCS = 512


@dataclass(frozen=True)
class PrepareConfig:
    """Every option of `lmforge data prepare`; validated here with the flag's name."""

    sources: tuple[str, ...]
    tokenizer: str = "bpe"  # bpe | char | byte | a directory with tokenizer.json
    vocab_size: int = 8192  # for bpe
    tokenizer_sample_mb: int = 100  # bpe trains on about this much of the kept text at most
    dedup: Literal["none", "exact", "minhash"] = "minhash"
    minhash_threshold: float = 0.8
    pii: Literal["scrub", "drop", "keep"] = "scrub"
    val_fraction: float = 0.1
    test_fraction: float = 0.0
    split: Literal["random", "tail"] = "random"
    seed: int = 1337
    text_field: str = "text"
    min_chars: int = 20
    on_error: Literal["skip", "fail"] = "fail"
    workers: int = 0  # 0: one per CPU core
    save_removed: bool = False  # write removed documents to removed.jsonl.gz
    shard_tokens: int = 100_000_000  # tokens per shard file at most

    def __post_init__(self) -> None:
        if not self.sources:
            raise LmforgeError("no sources given")
        if self.tokenizer not in TRAINED_TOKENIZERS and not Path(self.tokenizer).exists():
            raise LmforgeError(
                f"--tokenizer {self.tokenizer!r} is not bpe, char, byte or a tokenizer directory"
            )
        if self.dedup not in ("none", "exact", "minhash"):
            raise LmforgeError(f"--dedup must be none, exact or minhash, not {self.dedup!r}")
        if self.pii not in ("scrub", "drop", "keep"):
            raise LmforgeError(f"--pii must be scrub, drop or keep, not {self.pii!r}")
        if self.split not in ("random", "tail"):
            raise LmforgeError(f"--split must be random or tail, not {self.split!r}")
        for flag, value in (
            ("--val-fraction", self.val_fraction),
            ("--test-fraction", self.test_fraction),
        ):
            if not 0 <= value < 1:
                raise LmforgeError(f"{flag} must be in [0, 1), not {value}")
        if self.val_fraction + self.test_fraction >= 1:
            raise LmforgeError("--val-fraction + --test-fraction must leave some training data")
        if self.tokenizer == "bpe":
            check_vocab_size(self.vocab_size)
        if self.tokenizer_sample_mb < 1:
            raise LmforgeError(
                f"--tokenizer-sample-mb must be at least 1, not {self.tokenizer_sample_mb}"
            )
        if self.workers < 0:
            raise LmforgeError(f"--workers must be 0 (one per core) or more, not {self.workers}")
        if self.shard_tokens < 1024:
            raise LmforgeError(f"--shard-tokens must be at least 1024, not {self.shard_tokens}")
        # These raise with their own flag names.
        SourceOptions(text_field=self.text_field, on_error=self.on_error)
        self.quality_config()
        if self.dedup == "minhash":
            self.minhash_params()

    def quality_config(self) -> clean.QualityConfig:
        return clean.QualityConfig(min_chars=self.min_chars)

    def minhash_params(self) -> MinHashParams:
        return MinHashParams(threshold=self.minhash_threshold)

    def output_options(self) -> dict[str, Any]:
        """The options that change the output (not workers or save_removed) — for the key."""
        options = asdict(self)
        for name in ("sources", "workers", "save_removed"):
            options.pop(name)
        if self.tokenizer not in TRAINED_TOKENIZERS:
            options["tokenizer"] = "path"
        if self.tokenizer != "bpe":
            options.pop("vocab_size")
            options.pop("tokenizer_sample_mb")
        if self.dedup != "minhash":
            options.pop("minhash_threshold")
        if self.split == "tail":
            options.pop("seed")
        return options


class Progress(Protocol):
    """What `prepare` reports while it works (the CLI draws it as a progress bar)."""

    def stage(self, name: str, total_bytes: int | None) -> None: ...

    def advance(self, documents: int, nbytes: int) -> None: ...


@dataclass
class PrepareResult:
    path: Path
    manifest: dict[str, Any]
    unchanged: bool  # True: the data set already existed with the same content key


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


# -- prepare ---------------------------------------------------------------------------------


def content_key(
    config: PrepareConfig, sources: list[dict[str, Any]], tokenizer_sha: str | None
) -> str:
    """sha256 naming the data set's content: same key, same shards."""
    identity = {
        "pipeline": PIPELINE_VERSION,
        "inputs": [s["sha256"] for s in sources],
        "options": config.output_options(),
        "rules": {
            "clean": clean.CLEAN_VERSION,
            "pii": pii.PII_RULES_VERSION,
            "dedup": DEDUP_VERSION,
        },
        "tokenizer": tokenizer_sha,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def prepare(
    config: PrepareConfig,
    out_dir: Path,
    *,
    name: str | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> PrepareResult:
    """Build the data set at OUT_DIR from CONFIG (a no-op when it already holds the same data)."""
    started = time.perf_counter()
    name = name or out_dir.name
    files = expand_sources(config.sources)
    sources: list[dict[str, Any]] = [
        {"path": str(p), "sha256": file_sha256(p), "bytes": p.stat().st_size} for p in files
    ]
    given = _given_tokenizer(config)
    tokenizer_sha = hashlib.sha256(given.backend.to_str().encode()).hexdigest() if given else None
    key = content_key(config, sources, tokenizer_sha)
    existing = _existing_manifest(out_dir)
    if existing is not None and existing.get("content_key") == key:
        log.info("data set %s is up to date (content key %s)", name, key[:12])
        return PrepareResult(out_dir, existing, unchanged=True)
    if out_dir.exists() and not overwrite:
        raise LmforgeError(
            f"data set {name!r} already exists with other inputs or options; "
            "use --overwrite to replace it, or another --name"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_builds(out_dir)
    build = Path(
        tempfile.mkdtemp(
            prefix=f".{out_dir.name}.{os.getpid()}.", suffix=".tmp", dir=out_dir.parent
        )
    )
    try:
        manifest = _build(config, build, name, files, sources, given, key, progress)
        manifest["timing"]["seconds"] = round(time.perf_counter() - started, 3)
        text_mb = manifest["timing"].pop("text_bytes") / 1e6
        manifest["timing"]["mb_per_s"] = round(
            text_mb / max(manifest["timing"]["seconds"], 1e-9), 3
        )
        write_manifest(build, manifest)
        fsync_dir(build)
        _swap_into_place(build, out_dir)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return PrepareResult(out_dir, manifest, unchanged=False)


def _remove_abandoned_builds(out_dir: Path) -> None:
    """Delete build directories of OUT_DIR left by killed runs (their process is gone)."""
    for build in out_dir.parent.glob(f".{out_dir.name}.*.tmp"):
        pid = build.name[len(out_dir.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            log.info("removing %s, left by an interrupted run", build)
            shutil.rmtree(build, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _existing_manifest(out_dir: Path) -> dict[str, Any] | None:
    try:
        return read_manifest(out_dir) if out_dir.is_dir() else None
    except CorruptArtifactError:
        return None


def _swap_into_place(build: Path, out_dir: Path) -> None:
    """Rename BUILD to OUT_DIR; an old OUT_DIR is moved aside first and deleted after."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.rename(out_dir, old)
    os.rename(build, out_dir)
    fsync_dir(out_dir.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _given_tokenizer(config: PrepareConfig) -> Tokenizer | None:
    if config.tokenizer in TRAINED_TOKENIZERS:
        return None
    path = Path(config.tokenizer)
    return Tokenizer.load(path.parent if path.is_file() else path)


def _build(
    config: PrepareConfig,
    build: Path,
    name: str,
    files: list[Path],
    sources: list[dict[str, Any]],
    given: Tokenizer | None,
    key: str,
    progress: Progress | None,
) -> dict[str, Any]:
    funnel = Funnel()
    tally = SourceTally()
    kept_path = build / _KEPT
    removed_file = (
        gzip.open(build / "removed.jsonl.gz", "wt", encoding="utf-8")  # noqa: SIM115 - closed below
        if config.save_removed
        else None
    )
    try:
        with open(kept_path, "w", encoding="utf-8") as kept:
            if progress:
                progress.stage("clean", sum(s["bytes"] for s in sources))
            _first_pass(config, files, funnel, tally, kept, removed_file, progress)
    finally:
        if removed_file is not None:
            removed_file.close()
    for i, source in enumerate(sources):
        source["documents_read"] = funnel.read_per_source[i]
        source["documents_kept"] = funnel.kept_per_source[i]
    if funnel.kept_docs == 0:
        raise LmforgeError(_nothing_left(funnel, tally))
    plan = _split_plan(config, funnel.kept_docs) if config.split == "random" else None

    tokenizer = given or _train_tokenizer(config, kept_path, funnel, progress)
    tokenizer.save(build)
    if progress:
        progress.stage("tokenize", funnel.kept_chars)  # counted in characters
    splits, shards, doc_tokens = _second_pass(
        config, tokenizer, kept_path, build, funnel, plan, progress
    )
    kept_path.unlink()
    histogram = write_token_histogram(build / "token_lengths.png", doc_tokens, title=name)
    if config.split == "random" and config.val_fraction > 0 and splits["val"]["tokens"] == 0:
        log.warning("the val split is empty: too few documents for --val-fraction")
    tokenizer_json = (build / "tokenizer.json").read_bytes()
    return {
        "format": MANIFEST_FORMAT,
        "name": name,
        "content_key": key,
        "created_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "options": asdict(config) | {"sources": list(config.sources)},
        "versions": {
            "pipeline": PIPELINE_VERSION,
            "clean": clean.CLEAN_VERSION,
            "pii_rules": pii.PII_RULES_VERSION,
            "dedup": DEDUP_VERSION,
        },
        "sources": sources,
        "funnel": [
            *funnel.steps(),
            {
                "step": "tokenize",
                "documents": funnel.kept_docs,
                "chars": funnel.kept_chars,
                "tokens": int(doc_tokens.sum()),
            },
        ],
        "removed": {
            r: {"documents": d, "chars": c}
            for r, (d, c) in sorted(funnel.removed.items(), key=lambda kv: -kv[1][0])
        },
        "lines_removed": dict(funnel.lines_removed),
        "read_errors": dict(tally.errors),
        "first_errors": tally.first_errors,
        "pii": {
            "mode": config.pii,
            "rules_version": pii.PII_RULES_VERSION,
            "found": dict(funnel.pii),
        },
        "dedup": {
            "mode": config.dedup,
            "threshold": config.minhash_threshold if config.dedup == "minhash" else None,
            "exact_duplicates": funnel.removed.get("exact_duplicate", [0, 0])[0],
            "near_duplicates": funnel.removed.get("near_duplicate", [0, 0])[0],
        },
        "tokenizer": {
            "kind": config.tokenizer if given is None else "given",
            "source": None if given is None else str(Path(config.tokenizer).resolve()),
            "vocab_size": tokenizer.vocab_size,
            "eos_token": tokenizer.eos_token,
            "sha256": hashlib.sha256(tokenizer_json).hexdigest(),
        },
        "splits": splits,
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "shards": shards_dict(shards),
        "token_lengths": histogram,
        "timing": {"workers": _worker_count(config), "text_bytes": funnel.read_bytes},
    }


def _worker_count(config: PrepareConfig) -> int:
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
    """(documents, results) batch by batch, in corpus order, WORKERS processes working."""
    options = SourceOptions(text_field=config.text_field, on_error=config.on_error)
    batches = _batches(files, options, tally)
    workers = _worker_count(config)
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


def _first_pass(
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
    seen_bytes = 0
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
        if progress:
            progress.advance(len(batch), tally.bytes_read - seen_bytes)
            seen_bytes = tally.bytes_read


def _nothing_left(funnel: Funnel, tally: SourceTally) -> str:
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


def _kept_records(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def _training_text(record: dict[str, Any]) -> str:
    """A kept document as the trained tokenizer will see it (chats rendered as ChatML)."""
    if "m" in record:
        return render_chat(CHATML_TEMPLATE, record["m"], add_generation_prompt=False)
    return str(record["t"])


def _train_tokenizer(
    config: PrepareConfig, kept_path: Path, funnel: Funnel, progress: Progress | None
) -> Tokenizer:
    if progress:
        progress.stage(f"train {config.tokenizer} tokenizer", None)
    if config.tokenizer == "char":  # every character must be seen
        return train_char(_training_text(r) for r in _kept_records(kept_path))
    if config.tokenizer == "byte":
        return byte_tokenizer()
    # BPE learns from every k-th document, k chosen so that at most --tokenizer-sample-mb of
    # text is read: training time and memory grow with the text, merges hardly after ~100 MB.
    stride = max(1, -(-funnel.kept_chars // (config.tokenizer_sample_mb * 1_000_000)))
    texts = (_training_text(r) for i, r in enumerate(_kept_records(kept_path)) if i % stride == 0)
    if stride > 1:
        log.info("training the BPE on every %d-th document", stride)
    return train_bpe(texts, vocab_size=config.vocab_size, length=-(-funnel.kept_docs // stride))


def _split_plan(config: PrepareConfig, n_docs: int) -> np.ndarray:
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
    for i, record in enumerate(_kept_records(kept_path)):
        text = (
            tokenizer.render_chat(record["m"], add_generation_prompt=False)
            if "m" in record
            else record["t"]
        )
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


def _second_pass(
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
    encode = _encoder(tokenizer)
    writers = [ShardWriter(build, s, dtype, config.shard_tokens) for s in SPLITS]
    counts = {s: {"documents": 0, "chars": 0, "tokens": 0} for s in SPLITS}
    eos = tokenizer.eos_id
    total_chars = funnel.kept_chars
    if config.split == "tail":  # chats render longer than their contents: count what is cut
        total_chars = sum(len(_rendered(tokenizer, r)) for r in _kept_records(kept_path))
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
            progress.advance(len(batch), sum(len(t) for _, t, _ in batch))
        batch.clear()
        batch_chars = 0

    for piece in _pieces(config, tokenizer, kept_path, total_chars, plan):
        batch.append(piece)
        batch_chars += len(piece[1])
        if batch_chars >= 4 * _BATCH_CHARS or len(batch) >= 2048:
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


def _encoder(tokenizer: Tokenizer) -> Callable[[list[str]], list[np.ndarray]]:
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


def describe(manifest: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of a manifest (for `data list` and logs)."""
    return {
        "documents": manifest["funnel"][-1]["documents"],
        "tokens": sum(s["tokens"] for s in manifest["splits"].values()),
        "vocab_size": manifest["tokenizer"]["vocab_size"],
    }


def source_paths(manifest: dict[str, Any]) -> Sequence[str]:
    return [s["path"] for s in manifest["sources"]]
