"""`prepare --executor ray`: the per-document work and the tokenization as Ray tasks.

The same steps as the local executor, in the same code (`funnel.DocumentProcessor`,
`splits.write_splits`), with the work placed on a Ray cluster:

- sources → clean → PII → dedup keys: a Ray Data pipeline. Each source file is one input row;
  `map_batches` runs `_ReadAndProcess` actors (one `DocumentProcessor` each) that read the file
  and emit, per document, its source fields and what the processor made of it (text, reason,
  character counts, exact key, MinHash signature as bytes). `preserve_order` keeps the corpus
  order, which the next step needs.
- dedup: the exact and near-duplicate *indexes* are global state, so the driver adds the
  documents to them in corpus order, as the local executor does. The expensive part (shingling
  and 128 permutation hashes per document) ran on the cluster; what is left is a band lookup per
  document. So the MinHash outcome does not depend on how the corpus is partitioned: a document
  is a near duplicate of the kept documents before it, whichever worker computed either.
- tokenize: each batch of kept text is cut into pieces encoded by Ray tasks in parallel (the
  tokenizer is put in the object store once); the driver writes the shards in order.

Parallelism of the first step is across source files (a file is read by one task), as with
Ray Data's own file readers: give a big corpus as several files. The outcome — manifest and
shards — is byte-identical to the local executor's but for timings, and a bad record fails the
run with the local executor's one-line message (tested).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lmforge.data.funnel import DocumentProcessor, Processed
from lmforge.data.sources import Document, SourceOptions, SourceTally, read_documents
from lmforge.errors import LmforgeError

if TYPE_CHECKING:
    from lmforge.data.prepare import PrepareConfig
    from lmforge.tokenizer import Tokenizer

log = logging.getLogger(__name__)

_ENCODE_PIECES_MIN_CHARS = 64 << 10  # a tokenize task gets at least this much text


def init_ray(address: str | None) -> None:
    """Connect to the Ray cluster at ADDRESS (HOST:PORT, ray://…, or "auto": the one `ray start`
    runs here; None: $RAY_ADDRESS, else a new local Ray for this run)."""
    try:
        import ray
    except ImportError as e:
        raise LmforgeError(
            "--executor ray needs Ray: pip install 'lmforge[ray]' (ray[data])"
        ) from e
    if ray.is_initialized():
        return
    _quiet_ray()
    # No address: $RAY_ADDRESS, else a new local Ray ("local"; Ray's own default would look for
    # a cluster `ray start` left behind, and wait minutes on a stale one).
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    _check_reachable(address)
    try:
        ray.init(
            address=address,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    except ConnectionError as e:
        raise LmforgeError(f"cannot reach the Ray cluster at {address}: {e}") from e
    log.info("ray: %s", ray.cluster_resources())


def _check_reachable(address: str) -> None:
    """Fail in one line, now, if ADDRESS is a HOST:PORT nothing answers on (Ray itself would
    retry for minutes)."""
    import socket

    if address in ("auto", "local") or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            pass
    except (OSError, ValueError) as e:
        raise LmforgeError(f"cannot reach the Ray cluster at {address}: {e}") from e


def _quiet_ray() -> None:
    """Ray's own logs only with LMFORGE_LOG=info (a failed task is reported as one line)."""
    if not log.isEnabledFor(logging.INFO):
        for name in ("ray", "ray.data"):  # ray.data has handlers of its own
            logging.getLogger(name).setLevel(logging.CRITICAL)


# -- sources → clean → PII → dedup keys --------------------------------------------------------


class _ReadAndProcess:
    """A Ray Data actor: source files in, one row per document out (see the module doc)."""

    def __init__(self, config: PrepareConfig) -> None:
        self.options = SourceOptions(text_field=config.text_field, on_error=config.on_error)
        self.processor = DocumentProcessor(config)

    def __call__(self, files: dict[str, Any]) -> Iterator[dict[str, Any]]:
        for origin, path in zip(files["origin"], files["path"], strict=True):
            tally = SourceTally()
            rows: list[dict[str, Any]] = []
            for doc in read_documents(Path(path), self.options, tally):
                rows.append(_row(int(origin), doc, self.processor.process(doc.text, doc.messages)))
                if len(rows) >= 512:
                    yield _columns(rows)
                    rows = []
            # The file's tally follows its documents, in a row of its own.
            rows.append({**_EMPTY_ROW, "origin": int(origin), "tally": _tally_json(tally)})
            yield _columns(rows)


_EMPTY_ROW: dict[str, Any] = {
    "origin": 0,
    "doc": "",
    "processed": "",
    "exact_key": b"",
    "signature": b"",
    "tally": "",
}


def _row(origin: int, doc: Document, res: Processed) -> dict[str, Any]:
    processed = {
        "text": res.text,
        "messages": res.messages,
        "reason": res.reason,
        "chars": res.chars,
        "lines_removed": res.lines_removed,
        "pii_counts": res.pii_counts,
        "has_key": res.exact_key is not None,
        "has_signature": res.signature is not None,
    }
    source = {
        "text": doc.text,
        "source": doc.source,
        "messages": doc.messages,
        "continued": doc.continued,
    }
    return {
        "origin": origin,
        "doc": json.dumps(source, ensure_ascii=False),
        "processed": json.dumps(processed, ensure_ascii=False),
        "exact_key": res.exact_key or b"",
        "signature": b"" if res.signature is None else res.signature.astype("<u8").tobytes(),
        "tally": "",
    }


def _columns(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "origin": np.array([r["origin"] for r in rows], dtype=np.int64),
        "doc": np.array([r["doc"] for r in rows], dtype=object),
        "processed": np.array([r["processed"] for r in rows], dtype=object),
        "exact_key": np.array([r["exact_key"] for r in rows], dtype=object),
        "signature": np.array([r["signature"] for r in rows], dtype=object),
        "tally": np.array([r["tally"] for r in rows], dtype=object),
    }


def _tally_json(tally: SourceTally) -> str:
    return json.dumps(
        {"bytes": tally.bytes_read, "errors": dict(tally.errors), "first": tally.first_errors}
    )


def processed_batches(
    config: PrepareConfig, files: list[Path], tally: SourceTally
) -> Iterator[tuple[list[Document], list[Processed]]]:
    """(documents, results) in corpus order, computed on the Ray cluster; TALLY is filled in
    as each file's last row arrives."""
    import ray.data

    _quiet_ray()  # again: importing ray.data sets up its loggers
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    workers = max(1, min(len(files), int(ray.cluster_resources().get("CPU", 1))))
    inputs = ray.data.from_items(
        [{"origin": i, "path": str(p)} for i, p in enumerate(files)],
        override_num_blocks=len(files),
    )
    with warnings.catch_warnings():  # remote args as keywords: deprecated in Ray 2.60, working
        warnings.simplefilter("ignore")
        results = inputs.map_batches(
            _with_config(config),  # the config travels with the class, not as actor arguments
            batch_size=1,
            concurrency=workers,
            zero_copy_batch=False,
            max_restarts=0,  # a failed read fails the run, as locally (and Ray does not warn
            # that a restarted actor may lack its arguments)
        )
    try:
        yield from _consume(results, tally)
    except Exception as e:  # Ray wraps what a task raised; a bad record is one line here too
        original = _original_error(e)
        if original is None or original is e:
            raise
        message = str(original.args[0] if original.args else original)
        raise LmforgeError(message.splitlines()[0]) from None  # Ray appends retry advice


def _with_config(config: PrepareConfig) -> type[_ReadAndProcess]:
    class ReadAndProcess(_ReadAndProcess):
        def __init__(self) -> None:
            super().__init__(config)

    return ReadAndProcess


def _original_error(error: BaseException) -> LmforgeError | None:
    """The LmforgeError a Ray task raised, from the exception Ray raised here (or None)."""
    import ray.exceptions

    seen: set[int] = set()
    stack: list[BaseException | None] = [error]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, LmforgeError) and not isinstance(e, ray.exceptions.RayError):
            return e
        stack += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return None


def _consume(results: Any, tally: SourceTally) -> Iterator[tuple[list[Document], list[Processed]]]:
    for batch in results.iter_batches(batch_format="numpy", batch_size=None):
        docs: list[Document] = []
        done: list[Processed] = []
        for i in range(len(batch["origin"])):
            if batch["tally"][i]:
                _merge_tally(tally, json.loads(batch["tally"][i]))
                continue
            docs.append(_document(int(batch["origin"][i]), json.loads(batch["doc"][i])))
            done.append(_processed(batch, i))
        if docs:
            yield docs, done


def _document(origin: int, fields: dict[str, Any]) -> Document:
    return Document(
        text=fields["text"],
        source=fields["source"],
        messages=fields["messages"],
        continued=fields["continued"],
        origin=origin,
    )


def _processed(batch: dict[str, Any], i: int) -> Processed:
    fields = json.loads(batch["processed"][i])
    signature = None
    if fields["has_signature"]:
        signature = np.frombuffer(batch["signature"][i], dtype="<u8").astype(np.uint64)
    return Processed(
        text=fields["text"],
        messages=fields["messages"],
        reason=fields["reason"],
        chars=fields["chars"],
        lines_removed=fields["lines_removed"],
        pii_counts=fields["pii_counts"],
        exact_key=bytes(batch["exact_key"][i]) if fields["has_key"] else None,
        signature=signature,
    )


def _merge_tally(tally: SourceTally, part: dict[str, Any]) -> None:
    tally.bytes_read += part["bytes"]
    tally.errors.update(part["errors"])
    room = 10 - len(tally.first_errors)
    tally.first_errors.extend(part["first"][: max(room, 0)])


# -- tokenize ----------------------------------------------------------------------------------


def encoder(tokenizer: Tokenizer) -> Callable[[list[str]], list[np.ndarray]]:
    """texts → id arrays, the texts cut into pieces encoded by Ray tasks in parallel."""
    import ray

    from lmforge.tokenizer import Tokenizer as TokenizerType

    saved = ray.put(_tokenizer_files(tokenizer))
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))

    @ray.remote
    def encode_piece(files: dict[str, str], texts: list[str]) -> list[np.ndarray]:
        from lmforge.data.splits import encoder_for

        return encoder_for(_load_tokenizer(TokenizerType, files))(texts)

    def encode(texts: list[str]) -> list[np.ndarray]:
        chars = sum(len(t) for t in texts)
        pieces = max(1, min(cpus, chars // _ENCODE_PIECES_MIN_CHARS, len(texts)))
        bounds = np.linspace(0, len(texts), pieces + 1).astype(int)
        futures = [encode_piece.remote(saved, texts[a:b]) for a, b in itertools.pairwise(bounds)]
        return [ids for part in ray.get(futures) for ids in part]

    return encode


def _tokenizer_files(tokenizer: Tokenizer) -> dict[str, str]:
    """The tokenizer's saved files (tokenizer.json and its config), as text."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(Path(tmp))
        return {p.name: p.read_text(encoding="utf-8") for p in Path(tmp).iterdir() if p.is_file()}


def _load_tokenizer(kind: type[Tokenizer], files: dict[str, str]) -> Tokenizer:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for name, text in files.items():
            (Path(tmp) / name).write_text(text, encoding="utf-8")
        return kind.load(Path(tmp))
