"""Sources: files, folders and globs → a stream of `Document`s, in a stable order.

Formats, chosen by suffix (after an optional `.gz` / `.zst`, decompressed on the fly):

| suffix          | a document is                                                             |
| --------------- | ------------------------------------------------------------------------- |
| `.txt`, `.md`   | the file; files over `max_doc_chars` become consecutive parts, cut at a   |
|                 | blank line, that join back to the exact file (`Document.continued`)       |
| `.jsonl`        | a line: the string in `--text-field`, or an OpenAI-style `messages` list   |
| `.json`         | an element of a top-level array (or the one top-level object), as above   |
| `.csv`, `.tsv`  | a row: the `--text-field` column (header row required)                    |
| `.parquet`      | a row: the `--text-field` column, or a `messages` column (via pyarrow)    |

Everything streams: memory holds one document (one part of a big text file, one parquet batch)
at a time, whatever the corpus size — except `.json`, which is parsed whole (use `.jsonl` for
big corpora). Text must be UTF-8: an undecodable byte is an error naming the file and offset.

Errors in single records (a malformed JSON line, a missing field) raise `LmforgeError` naming the
file and line, or — with `on_error="skip"` — are counted in `SourceTally.errors` and skipped.
The readers form a registry (`READERS`, suffix → function) like every extension point.
"""

from __future__ import annotations

import codecs
import csv
import glob
import gzip
import hashlib
import io
import json
import logging
import os
import sys
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import zstandard

from lmforge.errors import LmforgeError
from lmforge.tokenizer.chat import validate_messages

log = logging.getLogger(__name__)

OnError = Literal["skip", "fail"]
COMPRESSIONS = (".gz", ".zst")
_READ_BYTES = 1 << 20


@dataclass(slots=True)
class Document:
    """One unit of text: a file, a line, a row or a conversation."""

    text: str  # for chat documents: the message contents joined by blank lines (for filters)
    source: str  # where it came from, e.g. "corpus.jsonl:17" (1-based line numbers)
    messages: list[dict[str, str]] | None = None  # set for chat documents
    continued: bool = False  # True for parts 2… of a big text file: no separator before it
    origin: int = 0  # index of the file it came from in the list of sources


@dataclass
class SourceTally:
    """What reading saw: bytes consumed on disk (for MB/s) and skipped records by reason."""

    bytes_read: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    first_errors: list[str] = field(default_factory=list)  # up to 10 messages, for the report

    def skip(self, reason: str, message: str) -> None:
        self.errors[reason] += 1
        if len(self.first_errors) < 10:
            self.first_errors.append(message)
        log.info("skipped %s", message)


@dataclass(frozen=True)
class SourceOptions:
    text_field: str = "text"
    on_error: OnError = "fail"
    max_doc_chars: int = 4_000_000  # text files larger than this are cut into parts

    def __post_init__(self) -> None:
        if self.on_error not in ("skip", "fail"):
            raise LmforgeError(f"--on-error must be skip or fail, not {self.on_error!r}")
        if not self.text_field:
            raise LmforgeError("--text-field must not be empty")
        if self.max_doc_chars < 1024:
            raise LmforgeError("max_doc_chars must be at least 1024")


# -- finding files ---------------------------------------------------------------------------


def format_of(path: Path) -> str:
    """The reader suffix of PATH, ignoring a compression suffix: `a.jsonl.gz` → `.jsonl`."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


def expand_sources(specs: Sequence[str | Path]) -> list[Path]:
    """Files named by SPECS (files, folders searched recursively, globs), each once, in order.

    Within a folder or glob, files are sorted by path so a data set never depends on directory
    listing order. Raises `LmforgeError` for a spec that names nothing readable.
    """
    if not specs:
        raise LmforgeError("no sources given")
    found: list[Path] = []
    seen: set[Path] = set()
    for spec in specs:
        text = str(spec)
        path = Path(text).expanduser()
        if path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.is_file() and _supported(p))
            if not matches:
                raise LmforgeError(f"{text}: folder has no {_supported_list()} files")
        elif path.exists():
            if not path.is_file():
                raise LmforgeError(f"{text}: not a regular file")
            if not _supported(path):
                raise LmforgeError(f"{text}: unsupported file type (want {_supported_list()})")
            matches = [path]
        elif glob.has_magic(text):
            matches = sorted(
                Path(p)
                for p in glob.glob(os.path.expanduser(text), recursive=True)
                if Path(p).is_file() and _supported(Path(p))
            )
            if not matches:
                raise LmforgeError(f"{text}: pattern matches no {_supported_list()} files")
        else:
            raise LmforgeError(f"{text}: no such file or folder")
        for match in matches:
            resolved = match.resolve()
            if resolved in seen:
                continue
            if not os.access(resolved, os.R_OK):
                raise LmforgeError(f"{match}: permission denied")
            seen.add(resolved)
            found.append(resolved)
    return found


def file_sha256(path: Path) -> str:
    """sha256 of PATH's bytes as stored (compressed files hash compressed)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_READ_BYTES):
                digest.update(chunk)
    except OSError as exc:
        raise LmforgeError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return digest.hexdigest()


def _supported(path: Path) -> bool:
    return format_of(path) in READERS


def _supported_list() -> str:
    return "/".join(s.lstrip(".") for s in READERS)


# -- opening ---------------------------------------------------------------------------------


class _CountingReader(io.RawIOBase):
    """Counts the bytes read from the file on disk (before decompression) into a tally."""

    def __init__(self, raw: IO[bytes], tally: SourceTally) -> None:
        self.raw = raw
        self.tally = tally

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self.raw.readinto(buffer)  # type: ignore[attr-defined]
        self.tally.bytes_read += n or 0
        return n or 0

    def close(self) -> None:
        self.raw.close()
        super().close()


def open_binary(path: Path, tally: SourceTally) -> IO[bytes]:
    """PATH's decompressed bytes, counting on-disk bytes into TALLY."""
    try:
        raw = open(path, "rb")  # noqa: SIM115 - closed through the returned stream
    except OSError as exc:
        raise LmforgeError(f"{path}: cannot read ({exc.strerror or exc})") from None
    counted = io.BufferedReader(_CountingReader(raw, tally), buffer_size=_READ_BYTES)
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return gzip.GzipFile(fileobj=counted, mode="rb")  # type: ignore[return-value]
    if suffix == ".zst":
        reader = zstandard.ZstdDecompressor().stream_reader(counted, closefd=True)
        return io.BufferedReader(reader, buffer_size=_READ_BYTES)
    return counted


def _read_failure(path: Path, exc: Exception) -> LmforgeError:
    if isinstance(exc, gzip.BadGzipFile | EOFError | zlib.error):
        return LmforgeError(f"{path}: not a valid gzip file ({exc})")
    if isinstance(exc, zstandard.ZstdError):
        return LmforgeError(f"{path}: not a valid zstd file ({exc})")
    if isinstance(exc, OSError):
        return LmforgeError(f"{path}: cannot read ({exc.strerror or exc})")
    return LmforgeError(f"{path}: {exc}")


def _decode_error(path: Path, where: str, exc: UnicodeDecodeError, offset: int) -> str:
    return f"{path}{where}: not valid UTF-8 at byte {offset + exc.start} ({exc.reason})"


# -- readers ---------------------------------------------------------------------------------

Reader = Callable[[Path, SourceOptions, SourceTally], Iterator[Document]]


def read_documents(path: Path, options: SourceOptions, tally: SourceTally) -> Iterator[Document]:
    """The documents of one file, in file order."""
    reader = READERS.get(format_of(path))
    if reader is None:
        raise LmforgeError(f"{path}: unsupported file type (want {_supported_list()})")
    try:
        yield from reader(path, options, tally)
    except LmforgeError:
        raise
    except (OSError, EOFError, ValueError, zlib.error, zstandard.ZstdError) as exc:
        raise _read_failure(path, exc) from None  # corrupt compression, I/O errors


def read_text_file(path: Path, options: SourceOptions, tally: SourceTally) -> Iterator[Document]:
    """A text file as one document, or as parts cut at blank lines if it is big."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    offset = 0  # bytes decoded so far, for error messages
    buffer = ""
    part = 0
    with open_binary(path, tally) as f:
        while True:
            chunk = f.read(_READ_BYTES)
            final = not chunk
            try:
                buffer += decoder.decode(chunk, final=final)
            except UnicodeDecodeError as exc:
                message = _decode_error(path, "", exc, offset)
                if options.on_error == "fail":
                    raise LmforgeError(message) from None
                tally.skip("undecodable", message)
                return
            offset += len(chunk)
            while len(buffer) > options.max_doc_chars:
                cut = _cut_point(buffer, options.max_doc_chars)
                yield Document(buffer[:cut], f"{path}#{part + 1}", continued=part > 0)
                buffer = buffer[cut:]
                part += 1
            if final:
                break
    if buffer or part == 0:
        name = f"{path}#{part + 1}" if part else str(path)
        yield Document(buffer, name, continued=part > 0)


def _cut_point(text: str, limit: int) -> int:
    """Where to cut TEXT at most LIMIT chars in: after a blank line, else a newline, else LIMIT."""
    for sep in ("\n\n", "\n"):
        at = text.rfind(sep, limit // 2, limit)
        if at >= 0:
            return at + len(sep)
    return limit


def read_jsonl(path: Path, options: SourceOptions, tally: SourceTally) -> Iterator[Document]:
    with open_binary(path, tally) as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                message = f"{where}: not valid UTF-8 at column {exc.start + 1} ({exc.reason})"
                _fail_or_skip(options, tally, "undecodable", message)
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                message = f"{where}: malformed JSON ({exc.msg} at column {exc.colno})"
                _fail_or_skip(options, tally, "malformed_json", message)
                continue
            doc = _record_document(record, where, options, tally)
            if doc is not None:
                yield doc


def read_json(path: Path, options: SourceOptions, tally: SourceTally) -> Iterator[Document]:
    with open_binary(path, tally) as f:
        data = f.read()
    try:
        records = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise LmforgeError(_decode_error(path, "", exc, 0)) from None
    except json.JSONDecodeError as exc:
        raise LmforgeError(
            f"{path}: malformed JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None
    if isinstance(records, dict):
        records = [records]
    if not isinstance(records, list):
        raise LmforgeError(f"{path}: want a JSON array of records or strings")
    for i, record in enumerate(records):
        where = f"{path}[{i}]"
        if isinstance(record, str):
            yield Document(record, where)
            continue
        doc = _record_document(record, where, options, tally)
        if doc is not None:
            yield doc


def read_delimited(path: Path, options: SourceOptions, tally: SourceTally) -> Iterator[Document]:
    delimiter = "\t" if format_of(path) == ".tsv" else ","
    csv.field_size_limit(sys.maxsize)
    with (
        open_binary(path, tally) as f,
        io.TextIOWrapper(f, encoding="utf-8", errors="strict", newline="") as text,
    ):
        reader = csv.reader(text, delimiter=delimiter)
        try:
            header = next(reader, None)
            if header is None:
                return
            if options.text_field not in header:
                raise LmforgeError(
                    f"{path}: no column {options.text_field!r} (columns: {', '.join(header)}); "
                    "choose one with --text-field"
                )
            column = header.index(options.text_field)
            for row in reader:
                where = f"{path}:{reader.line_num}"
                if len(row) <= column:
                    if row:
                        message = f"{where}: row has {len(row)} fields, want {column + 1}"
                        _fail_or_skip(options, tally, "short_row", message)
                    continue
                yield Document(row[column], where)
        except UnicodeDecodeError as exc:
            raise LmforgeError(
                f"{path}:{reader.line_num + 1}: not valid UTF-8 ({exc.reason})"
            ) from None
        except csv.Error as exc:
            raise LmforgeError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from None


def read_parquet(path: Path, options: SourceOptions, tally: SourceTally) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise LmforgeError(f"{path}: not a readable parquet file ({exc})") from None
    names = parquet.schema_arrow.names
    column = options.text_field
    if column not in names:
        if "messages" not in names:
            raise LmforgeError(
                f"{path}: no column {column!r} (columns: {', '.join(names)}); "
                "choose one with --text-field"
            )
        column = "messages"
    size = path.stat().st_size
    rows = max(1, parquet.metadata.num_rows)
    row = 0
    with parquet:
        for batch in parquet.iter_batches(columns=[column], batch_size=1024):
            for value in batch.column(0).to_pylist():
                where = f"{path}:row {row + 1}"
                row += 1
                record = {column: value}
                doc = _record_document(record, where, options, tally)
                if doc is not None:
                    yield doc
            tally.bytes_read += size * batch.num_rows // rows


def _record_document(
    record: Any, where: str, options: SourceOptions, tally: SourceTally
) -> Document | None:
    """A JSON-like record → a text or chat document; None (counted) when skipped."""
    if not isinstance(record, dict):
        message = f"{where}: want a JSON object, got {type(record).__name__}"
        _fail_or_skip(options, tally, "not_an_object", message)
        return None
    value = record.get(options.text_field)
    if isinstance(value, str):
        return Document(value, where)
    if value is None and "messages" in record:
        messages = _chat_messages(record["messages"])
        if isinstance(messages, str):
            _fail_or_skip(options, tally, "bad_messages", f"{where}: {messages}")
            return None
        text = "\n\n".join(m["content"] for m in messages)
        return Document(text, where, messages=messages)
    if value is None:
        fields = ", ".join(map(str, record)) or "none"
        message = (
            f"{where}: no field {options.text_field!r} and no 'messages' (fields: {fields}); "
            "choose one with --text-field"
        )
        _fail_or_skip(options, tally, "missing_field", message)
        return None
    message = f"{where}: field {options.text_field!r} is {type(value).__name__}, not a string"
    _fail_or_skip(options, tally, "not_a_string", message)
    return None


def _chat_messages(value: Any) -> list[dict[str, str]] | str:
    """OpenAI-style messages → [{"role", "content"}]; a string says what is wrong."""
    if not isinstance(value, list):
        return "'messages' must be a list"
    try:
        return [{"role": m["role"], "content": m["content"]} for m in validate_messages(value)]
    except LmforgeError as exc:
        return str(exc)


def _fail_or_skip(options: SourceOptions, tally: SourceTally, reason: str, message: str) -> None:
    """Raise for MESSAGE, or (with --on-error skip) count it and return None: the record is gone."""
    if options.on_error == "fail":
        raise LmforgeError(f"{message} (use --on-error skip to skip such records)")
    tally.skip(reason, message)


READERS: dict[str, Reader] = {
    ".txt": read_text_file,
    ".md": read_text_file,
    ".jsonl": read_jsonl,
    ".json": read_json,
    ".csv": read_delimited,
    ".tsv": read_delimited,
    ".parquet": read_parquet,
}
