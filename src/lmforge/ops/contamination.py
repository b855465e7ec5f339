"""Contamination check: does an eval set overlap what a model and its ancestors trained on?

This file owns finding a model's training texts from what the stages recorded and running
`eval.contamination`'s n-gram overlap (13-grams by default) over them. The model SPEC and each
ancestor (`parent` in `lmforge.json`, followed with `ops.lineage.model_chain`) contribute:

- a pretrained model — `"dataset": {"path": <data set dir>, "content_key": …}`: the source
  files that data set's `manifest.json` lists (`"sources": [{"path", "sha256", …}]`), read
  with the same `data.sources` readers and `--text-field` that `data prepare` used, so the
  same documents (before cleaning: a document the filters dropped still counts, which errs
  on the side of reporting overlap);
- a fine-tuned model — `"stage": "finetune"`, `"task_data": {"path", "sha256", "format"}`:
  its task file, read generically (`task_texts`): every string value of each `.jsonl`
  object or of a `.json` document (SQuAD), each line of any other file;
- a quantized copy (`"stage": "quantize"`) — nothing of its own; its parent is checked;
- the built-in model, a model without `lmforge.json`, or one that records no training data
  (an imported GGUF): a source marked `unknown`.

A file that is gone or whose sha256 differs from the record, a data set re-prepared since
(other content key), or an ancestor that cannot be found is marked `missing`. Either mark
makes the result `complete: false`: the overlap numbers then cover only what was checked.

Memory follows the eval set, not the corpus: only training n-grams that also occur in the
eval set are kept (`NgramIndex(only=…)`). Time is about one hash per training word.

    from lmforge.ops.contamination import check_contamination

    report = check_contamination("words2@1", eval_texts)   # registry ref, directory, built-in
    report["example_rate"], report["complete"], report["sources"]

torch-free: only JSON files and the training text files are read.
"""

from __future__ import annotations

import io
import json
import logging
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lmforge.data.shards import read_manifest
from lmforge.data.sources import (
    SourceOptions,
    SourceTally,
    file_sha256,
    format_of,
    open_binary,
    read_documents,
)
from lmforge.errors import CorruptArtifactError, LmforgeError
from lmforge.eval.contamination import DEFAULT_N, NgramIndex, eval_hashes, overlap
from lmforge.home import lmforge_home
from lmforge.ops.lineage import ModelFacts, find_model, model_chain

log = logging.getLogger(__name__)

Status = Literal["checked", "missing", "unknown"]
Reader = Literal["dataset", "task"]


@dataclass
class TrainingSource:
    """One file a model in the chain was trained on, or why its training data is not known.

    `status` starts as "checked" for a file that is there as recorded (it is read later by
    `check_contamination`), "missing" or "unknown" (with `reason`) otherwise.
    """

    model: str  # the model's label: "name@3", a directory as given, the built-in name
    path: str | None  # the file (for a missing data set: its directory; None: not known)
    origin: str  # "data set NAME" | "task data (FORMAT)" | "model"
    status: Status
    reason: str | None = None
    sha256: str | None = None  # as recorded
    reader: Reader = "dataset"
    text_field: str = "text"  # data set sources: prepare's --text-field
    ngrams: int = 0  # n-gram positions read from the file
    overlapping: int = 0  # distinct eval n-grams found in it

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model": self.model,
            "path": self.path,
            "from": self.origin,
            "status": self.status,
            "ngrams": self.ngrams,
            "overlapping": self.overlapping,
        }
        if self.reason is not None:
            out["reason"] = self.reason
        return out


# -- what a model was trained on ---------------------------------------------------------------


def training_sources(spec: str, *, home: Path | None = None) -> list[TrainingSource]:
    """The training files of model SPEC and of its ancestors, nearest model first.

    Raises `ModelNotFoundError` when SPEC itself names no model; an ancestor that cannot be
    found becomes a `missing` source.
    """
    home = home or lmforge_home()
    chain = _unique(model_chain(find_model(spec, home=home), home=home))
    sources: list[TrainingSource] = []
    for facts in chain:
        sources += _model_sources(facts)
    parent = _parent_spec(chain[-1])
    if parent is not None:
        try:
            beyond = find_model(parent, home=home)
        except LmforgeError as exc:
            sources.append(_note(parent, "missing", f"ancestor of {chain[-1].label}: {exc}"))
        else:
            if not any(_same(beyond, f) for f in chain):  # not a loop: the chain was cut
                reason = f"more than {len(chain)} ancestors: not followed further"
                sources.append(_note(beyond.label, "unknown", reason))
    return sources


def _unique(chain: list[ModelFacts]) -> list[ModelFacts]:
    """CHAIN up to the first model seen twice (a parent chain that loops)."""
    out: list[ModelFacts] = []
    for facts in chain:
        if any(_same(facts, f) for f in out):
            break
        out.append(facts)
    return out


def _same(a: ModelFacts, b: ModelFacts) -> bool:
    if a.path is not None and b.path is not None:
        return a.path.resolve() == b.path.resolve()
    return a.label == b.label


def _parent_spec(facts: ModelFacts) -> str | None:
    """The spec `model_chain` follows to FACTS' parent (lineage's own rule)."""
    parent = facts.record.get("parent") or (facts.registry.parent if facts.registry else None)
    return str(parent) if parent else None


def _note(model: str, status: Status, reason: str, path: str | None = None) -> TrainingSource:
    return TrainingSource(model, path, "model", status, reason)


def _model_sources(facts: ModelFacts) -> list[TrainingSource]:
    label, record = facts.label, facts.record
    if facts.kind == "builtin":
        path = str(facts.gguf) if facts.gguf else None
        reason = "built-in model, pretrained outside lmforge: its training data is not recorded"
        return [_note(label, "unknown", reason, path)]
    if facts.missing is not None:
        return [_note(label, "missing", facts.missing, str(facts.path))]
    if not record:
        return [_note(label, "unknown", "no lmforge.json: made outside lmforge", str(facts.path))]
    if record.get("stage") == "quantize" and record.get("parent"):
        return []  # trained on nothing itself: what it knows is its parent's (checked next)
    sources: list[TrainingSource] = []
    dataset = record.get("dataset")
    if isinstance(dataset, dict) and dataset.get("path"):
        sources += _dataset_sources(label, dataset)
    task = record.get("task_data")
    if isinstance(task, dict) and task.get("path"):
        sources.append(_task_source(label, task))
    if not sources:
        imported = record.get("source")
        reason = (
            f"imported from {imported.get('path')}: trained outside lmforge"
            if isinstance(imported, dict)
            else "lmforge.json records no training data"
        )
        sources.append(_note(label, "unknown", reason, str(facts.path)))
    return sources


def _dataset_sources(model: str, dataset: dict[str, Any]) -> list[TrainingSource]:
    directory = Path(str(dataset["path"]))
    name = str(dataset.get("name") or directory.name)
    origin = f"data set {name}"
    try:
        manifest = read_manifest(directory)
    except CorruptArtifactError as exc:
        return [TrainingSource(model, str(directory), origin, "missing", str(exc))]
    key = dataset.get("content_key")
    if key and manifest.get("content_key") != key:
        reason = (
            f"re-prepared since (now content key {str(manifest.get('content_key'))[:12]}): "
            "the training data is gone"
        )
        return [TrainingSource(model, str(directory), origin, "missing", reason)]
    text_field = str((manifest.get("options") or {}).get("text_field") or "text")
    listed = manifest.get("sources") or []
    if not listed:
        reason = f"{directory}: the manifest lists no source files"
        return [TrainingSource(model, str(directory), origin, "unknown", reason)]
    return [
        _file_source(
            model, str(s.get("path")), origin, s.get("sha256"), "dataset", text_field=text_field
        )
        for s in listed
    ]


def _task_source(model: str, task: dict[str, Any]) -> TrainingSource:
    origin = f"task data ({task.get('format', '?')})"
    return _file_source(model, str(task["path"]), origin, task.get("sha256"), "task")


def _file_source(
    model: str,
    path: str,
    origin: str,
    sha256: Any,
    reader: Reader,
    *,
    text_field: str = "text",
) -> TrainingSource:
    sha = str(sha256) if sha256 else None
    source = TrainingSource(model, path, origin, "checked", None, sha, reader, text_field)
    if not Path(path).is_file():
        source.status, source.reason = "missing", "no longer there"
    return source


# -- reading training texts --------------------------------------------------------------------


def task_texts(path: Path) -> Iterator[str]:
    """A task file's texts, whatever its task format: every string value (recursively) of each
    `.jsonl` object or of a `.json` document, else (`.tsv`, `.csv`, `.txt`, …) each line.
    `.gz` / `.zst` files are decompressed."""
    fmt = format_of(path)
    with open_binary(path, SourceTally()) as f:
        if fmt == ".jsonl":
            for lineno, raw in enumerate(f, start=1):
                if raw.strip():
                    yield from _strings(_parse_json(raw, f"{path}:{lineno}"))
        elif fmt == ".json":
            yield from _strings(_parse_json(f.read(), str(path)))
        else:
            yield from io.TextIOWrapper(f, encoding="utf-8", errors="replace")


def _parse_json(raw: bytes, where: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise LmforgeError(f"{where}: not valid JSON ({exc})") from None


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _index_file(source: TrainingSource, n: int, only: set[int]) -> NgramIndex:
    """SOURCE's file read into an n-gram index that keeps only the hashes in ONLY."""
    path = Path(str(source.path))
    index = NgramIndex(n, only=only)
    if source.reader == "task":
        for text in task_texts(path):
            index.add(text)
    else:
        options = SourceOptions(text_field=source.text_field, on_error="skip")
        for doc in read_documents(path, options, SourceTally()):
            index.add(doc.text, continued=doc.continued)
    return index


# -- the check ---------------------------------------------------------------------------------


def check_contamination(
    spec: str, eval_texts: Sequence[str], *, n: int = DEFAULT_N, home: Path | None = None
) -> dict[str, Any]:
    """The n-gram overlap of EVAL_TEXTS with the training data of model SPEC and its ancestors.

    Returns a JSON-ready dict: the `OverlapResult` numbers (n, eval_examples, eval_ngrams,
    overlapping_ngrams, ngram_rate, examples_flagged, example_rate, too_short,
    flagged_examples), `sources` (one entry per training file or unknown model: model, path,
    from, status checked|missing|unknown, ngrams, overlapping, reason) and `complete` (false
    when any source is missing or unknown). Raises `ModelNotFoundError` for an unknown SPEC.
    """
    wanted = eval_hashes(eval_texts, n)
    sources = training_sources(spec, home=home)
    log.info(
        "contamination check of %s: %d eval examples, %d distinct %d-grams, %d training sources",
        spec,
        len(eval_texts),
        len(wanted),
        n,
        len(sources),
    )
    combined = NgramIndex(n, only=wanted)
    done: dict[tuple[str, str | None], NgramIndex] = {}  # a file two models trained on: once
    for source in sources:
        if source.status != "checked":
            log.warning("%s: %s %s (%s)", source.model, source.status, source.path, source.reason)
            continue
        key = (str(Path(str(source.path)).resolve()), source.sha256)
        index = done.get(key)
        if index is None:
            index = _checked_index(source, n, wanted)
            if index is None:
                continue
            done[key] = index
            combined.update(index)
        source.ngrams, source.overlapping = index.ngrams_seen, len(index)
    result = overlap(eval_texts, combined, n).to_dict()
    complete = all(s.status == "checked" for s in sources)
    log.info(
        "%d of %d eval examples overlap the training data (%.2f%% of %d-grams)%s",
        result["examples_flagged"],
        result["eval_examples"],
        100 * result["ngram_rate"],
        n,
        "" if complete else "; incomplete: some training data is missing or unknown",
    )
    return {**result, "sources": [s.to_dict() for s in sources], "complete": complete}


def _checked_index(source: TrainingSource, n: int, wanted: set[int]) -> NgramIndex | None:
    """SOURCE's file, verified against its recorded sha256 and indexed; None (and SOURCE
    marked missing) when it changed or cannot be read."""
    path = Path(str(source.path))
    try:
        if source.sha256 is not None:
            actual = file_sha256(path)
            if actual != source.sha256:
                source.status = "missing"
                source.reason = (
                    f"changed since (sha256 now {actual[:12]}…, recorded {source.sha256[:12]}…)"
                )
                log.warning("%s: %s %s", source.model, path, source.reason)
                return None
        log.info("%s: reading %s (%s)", source.model, path, source.origin)
        index = _index_file(source, n, wanted)
    except (LmforgeError, OSError, EOFError, ValueError, zlib.error) as exc:
        source.status, source.reason = "missing", f"cannot be read: {exc}"
        log.warning("%s: %s %s", source.model, path, source.reason)
        return None
    log.info(
        "%s: %s: %d %d-grams, %d of the eval set's found",
        source.model,
        path.name,
        index.ngrams_seen,
        n,
        len(index),
    )
    return index
