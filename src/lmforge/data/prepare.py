"""`prepare`: raw files → a data set directory (token shards + tokenizer + manifest.json).

Two passes over the corpus, memory bounded whatever its size:

1. `funnel`: read → normalize → quality filters → PII → exact / near-duplicate removal, the
   per-document work in `workers` processes; kept documents go to a temporary JSON-lines file
   inside the build directory.
2. `splits`: tokenizer (trained on the kept documents, or taken as given) → splits → shards.

This file owns the options (`PrepareConfig`), the content key, the build directory and the
manifest.

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
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from lmforge.atomic import fsync_dir
from lmforge.data import clean, pii
from lmforge.data.dedup import (
    DEDUP_VERSION,
    MinHashParams,
)
from lmforge.data.funnel import (
    KEPT,
    Funnel,
    Progress,
    filter_documents,
    nothing_left,
    worker_count,
)
from lmforge.data.report import write_token_histogram
from lmforge.data.shards import (
    MANIFEST,
    MANIFEST_FORMAT,
    read_manifest,
    shards_dict,
    token_dtype,
    write_manifest,
)
from lmforge.data.sources import (
    SourceOptions,
    SourceTally,
    expand_sources,
    file_sha256,
)
from lmforge.data.splits import split_plan, train_tokenizer, write_splits
from lmforge.errors import CorruptArtifactError, LmforgeError
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.bpe import check_vocab_size

log = logging.getLogger(__name__)

# Bump when the same inputs and options would give different shards (changes content keys).
PIPELINE_VERSION = 1
TRAINED_TOKENIZERS = ("bpe", "char", "byte")


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
    executor: Literal["local", "ray"] = "local"  # ray: the work runs as Ray tasks (ray_executor)
    ray_address: str | None = None  # None: $RAY_ADDRESS, else a local Ray for this run
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
        if self.executor not in ("local", "ray"):
            raise LmforgeError(f"--executor must be local or ray, not {self.executor!r}")
        if self.ray_address is not None and self.executor != "ray":
            raise LmforgeError("--ray-address needs --executor ray")
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
        for name in ("sources", "workers", "save_removed", "executor", "ray_address"):
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


@dataclass
class PrepareResult:
    path: Path
    manifest: dict[str, Any]
    unchanged: bool  # True: the data set already existed with the same content key
    manifest_sha256: str


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
        manifest_sha = file_sha256(out_dir / MANIFEST)
        return PrepareResult(out_dir, existing, unchanged=True, manifest_sha256=manifest_sha)
    if out_dir.exists() and not overwrite:
        raise LmforgeError(
            f"data set {name!r} already exists with other inputs or options; "
            "use --overwrite to replace it, or another --name"
        )
    if config.executor == "ray":
        from lmforge.data.ray_executor import init_ray

        init_ray(config.ray_address)
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
        manifest_sha = write_manifest(build, manifest)
        fsync_dir(build)
        _swap_into_place(build, out_dir)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return PrepareResult(out_dir, manifest, unchanged=False, manifest_sha256=manifest_sha)


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
    kept_path = build / KEPT
    removed_file = (
        gzip.open(build / "removed.jsonl.gz", "wt", encoding="utf-8")  # noqa: SIM115 - closed below
        if config.save_removed
        else None
    )
    started = time.perf_counter()
    try:
        with open(kept_path, "w", encoding="utf-8") as kept:
            if progress:
                progress.stage("clean", sum(s["bytes"] for s in sources))
            filter_documents(config, files, funnel, tally, kept, removed_file, progress)
    finally:
        if removed_file is not None:
            removed_file.close()
    for i, source in enumerate(sources):
        source["documents_read"] = funnel.read_per_source[i]
        source["documents_kept"] = funnel.kept_per_source[i]
    if funnel.kept_docs == 0:
        raise LmforgeError(nothing_left(funnel, tally))
    plan = split_plan(config, funnel.kept_docs) if config.split == "random" else None
    filtered = time.perf_counter()
    tokenizer = given or train_tokenizer(config, kept_path, funnel, plan, progress)
    tokenizer.save(build)
    trained = time.perf_counter()
    if progress:
        progress.stage("tokenize", funnel.kept_chars)  # counted in characters
    splits, shards, doc_tokens = write_splits(
        config, tokenizer, kept_path, build, funnel, plan, progress
    )
    kept_path.unlink()
    stage_seconds = {
        "filter": round(filtered - started, 3),
        "tokenizer": round(trained - filtered, 3),
        "tokenize": round(time.perf_counter() - trained, 3),
    }
    histogram = write_token_histogram(build / "token_lengths.png", doc_tokens, title=name)
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
        "timing": {
            "executor": config.executor,
            "workers": worker_count(config),
            "text_bytes": funnel.read_bytes,
            "stages": stage_seconds,
        },
    }


def describe(manifest: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of a manifest (for `data list` and logs)."""
    return {
        "documents": manifest["funnel"][-1]["documents"],
        "tokens": sum(s["tokens"] for s in manifest["splits"].values()),
        "vocab_size": manifest["tokenizer"]["vocab_size"],
    }
