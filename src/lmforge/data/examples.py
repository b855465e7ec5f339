"""Examples: fine-tuning and evaluation files → lists of small frozen records.

Each reader takes one file, checks every record, and returns all of them, or raises
`LmforgeError` with one line naming the file and the line (`train.jsonl:7: ...`), or for SQuAD
JSON the question id (`dev.json#5733be28: ...`). Each record keeps that location in `where`, so
later stages (tokenizing, labels, metrics) can name the record they reject.

| reader         | record        | formats, chosen by suffix                                   |
| -------------- | ------------- | ----------------------------------------------------------- |
| `read_chat`    | `ChatExample` | `.jsonl`, each line OpenAI `messages`, Alpaca               |
|                |               | `instruction`/`input`/`output` or ShareGPT `conversations`  |
| `read_labeled` | `LabeledText` | `.tsv` (tabs, no quoting), `.csv`, `.jsonl`; in TSV/CSV a   |
|                |               | header is optional (recognised by its column names)         |
| `read_squad`   | `QAExample`   | `.json` (SQuAD v1.1 nesting), `.jsonl` (HF datasets' rows)  |
| `read_pairs`   | `TextPair`    | `.jsonl` (source/prompt/input, reference/target/output),    |
|                |               | `.tsv` (source<TAB>reference)                               |
| `read_texts`   | `str`         | `.txt`, `.md` (the whole file), `.jsonl` (`text` per line)  |

Files must be UTF-8 (a leading byte-order mark is dropped); blank lines are skipped; a file with
no records is an error. Files are read whole into lists: these are fine-tuning and eval sets,
not pre-training corpora (those stream through `lmforge.data.sources`). Besides `lmforge.errors`
this module imports only the standard library: no torch, no tokenizer.

    from lmforge.data.examples import read_chat, read_labeled, read_squad

    chats = read_chat("train.jsonl")  # [ChatExample(messages=({"role": "user", ...}, ...), ...)]
    sst2 = read_labeled("SST-2/train.tsv")  # [LabeledText("hide new secretions ...", "0", ...)]
    dev = read_squad("dev-v1.1.json")
    print(dev[0].where, dev[0].answers[0])  # dev-v1.1.json#56be4db0acb8001400a502ec ('Denver
                                            # Broncos', 177)
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any, TypeVar

from lmforge.errors import LmforgeError

StrPath = str | os.PathLike[str]

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}
TEXT_COLUMNS = ("text", "sentence", "content", "review", "document")  # in order of preference
LABEL_COLUMNS = ("label", "labels", "class", "category", "target")
SOURCE_KEYS = ("source", "prompt", "input")
REFERENCE_KEYS = ("reference", "target", "output")
_READ_BYTES = 1 << 20

T = TypeVar("T")


@dataclass(frozen=True)
class ChatExample:
    """One conversation to fine-tune on: at least one assistant message."""

    messages: tuple[dict[str, str], ...]  # each {"role": system|user|assistant, "content": str}
    where: str  # "path:line"


@dataclass(frozen=True)
class LabeledText:
    """One text and its class label, kept as a string ("0", "positive", "World")."""

    text: str
    label: str
    where: str  # "path:line"


@dataclass(frozen=True)
class QAExample:
    """One extractive question; every answer is `context[start:start + len(text)]`."""

    id: str
    question: str
    context: str
    answers: tuple[tuple[str, int], ...]  # (text, answer_start char offset); () only in eval sets
    where: str  # "path#id" for SQuAD JSON, "path:line" for JSONL


@dataclass(frozen=True)
class TextPair:
    """A source text and the reference output (translation, summary, answer) to score against."""

    source: str
    reference: str
    where: str  # "path:line"


# -- chat ------------------------------------------------------------------------------------


def read_chat(path: StrPath) -> list[ChatExample]:
    """The conversations of a `.jsonl` file; each line OpenAI, Alpaca or ShareGPT shaped."""
    _check_suffix(path, (".jsonl",))
    examples = [
        ChatExample(tuple(_chat_messages(record, where)), where)
        for where, record in _jsonl_records(path)
    ]
    return _nonempty(path, examples)


def _chat_messages(record: dict[str, Any], where: str) -> list[dict[str, str]]:
    if "messages" in record:
        messages = _message_list(record["messages"], where, "messages", "{role, content}")
    elif "conversations" in record:
        messages = _message_list(record["conversations"], where, "conversations", "{from, value}")
    elif "instruction" in record or "output" in record:
        messages = _alpaca_messages(record, where)
    else:
        raise LmforgeError(
            f'{where}: want "messages", "conversations" or "instruction" + "output" '
            f"(fields: {_field_list(record)})"
        )
    if not any(m["role"] == "assistant" for m in messages):
        raise LmforgeError(f"{where}: no assistant message")
    return messages


def _message_list(value: Any, where: str, key: str, shape: str) -> list[dict[str, str]]:
    """OpenAI {role, content} or ShareGPT {from, value} messages (either, under either key)."""
    if not isinstance(value, list) or not value or not all(isinstance(m, dict) for m in value):
        raise LmforgeError(f'{where}: "{key}" must be a list of {shape} objects')
    out = []
    for i, m in enumerate(value):
        at = f"{key}[{i}]"
        if "from" in m:  # ShareGPT
            role = SHAREGPT_ROLES.get(m["from"]) if isinstance(m["from"], str) else None
            if role is None:
                raise LmforgeError(
                    f"{where}: {at}.from {m['from']!r} is not one of {', '.join(SHAREGPT_ROLES)}"
                )
            content = m.get("value")
            if not isinstance(content, str):
                raise LmforgeError(f"{where}: {at}.value must be a string")
        else:  # OpenAI
            role = m.get("role")
            if role not in ROLES:
                raise LmforgeError(f"{where}: {at}.role {role!r} is not one of {', '.join(ROLES)}")
            content = _openai_content(m.get("content"), where, at)
        out.append({"role": role, "content": content})
    return out


def _openai_content(value: Any, where: str, at: str) -> str:
    """A string, or OpenAI content parts [{"type": "text", "text": ...}] joined (as the tokenizer
    does: `lmforge.tokenizer.chat.validate_messages`)."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise LmforgeError(f"{where}: {at}.content must be a string or a list of text parts")
    texts = []
    for j, part in enumerate(value):
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise LmforgeError(
                f"{where}: {at}.content[{j}]: only text parts are supported (got {kind!r})"
            )
        if not isinstance(part.get("text"), str):
            raise LmforgeError(f"{where}: {at}.content[{j}].text must be a string")
        texts.append(part["text"])
    return "".join(texts)


def _alpaca_messages(record: dict[str, Any], where: str) -> list[dict[str, str]]:
    for key in ("instruction", "output"):
        if not isinstance(record.get(key), str):
            raise LmforgeError(f'{where}: "{key}" must be a string (Alpaca format)')
    for key in ("input", "system"):
        if record.get(key) is not None and not isinstance(record[key], str):
            raise LmforgeError(f'{where}: "{key}" must be a string (Alpaca format)')
    user = record["instruction"]
    if (record.get("input") or "").strip():
        user += "\n\n" + record["input"]
    messages = [
        {"role": "user", "content": user},
        {"role": "assistant", "content": record["output"]},
    ]
    if record.get("system"):
        messages.insert(0, {"role": "system", "content": record["system"]})
    return messages


# -- labeled texts ---------------------------------------------------------------------------


def read_labeled(
    path: StrPath, *, text_field: str | None = None, label_field: str | None = None
) -> list[LabeledText]:
    """The (text, label) rows of a `.tsv`, `.csv` or `.jsonl` file.

    TSV/CSV: a first row naming a text column (text, sentence, content, review, document) and a
    label column (label, labels, class, category, target), or TEXT_FIELD / LABEL_FIELD, is a
    header; without one, the first column is the text and the last the label. JSONL: those same
    names (or the given ones) as fields; integer labels become strings.
    """
    suffix = _check_suffix(path, (".tsv", ".csv", ".jsonl"))
    if suffix == ".jsonl":
        examples = [
            _labeled_record(record, where, text_field, label_field)
            for where, record in _jsonl_records(path)
        ]
    else:
        rows = _tsv_rows(path) if suffix == ".tsv" else _csv_rows(path)
        examples = list(_labeled_rows(path, rows, text_field, label_field))
    return _nonempty(path, examples)


def _labeled_rows(
    path: StrPath,
    rows: Iterator[tuple[int, list[str]]],
    text_field: str | None,
    label_field: str | None,
) -> Iterator[LabeledText]:
    first = next(rows, None)
    if first is None:
        return
    first_line, cells = first
    columns = _header_columns(f"{path}:{first_line}", cells, text_field, label_field)
    if columns is None:  # no header: the first row is data; text first, label last
        if len(cells) < 2:
            raise LmforgeError(
                f"{path}:{first_line}: want at least 2 columns (text ... label), got {len(cells)}"
            )
        width, text_col, label_col = len(cells), 0, len(cells) - 1
        rows = _chain_first(first, rows)
        shape = f"as in line {first_line}"
    else:
        width, (text_col, label_col) = len(cells), columns
        shape = "as in the header"
    for line, row in rows:
        where = f"{path}:{line}"
        if len(row) != width:
            raise LmforgeError(f"{where}: want {width} columns ({shape}), got {len(row)}")
        text, label = row[text_col], row[label_col]
        if not text:
            raise LmforgeError(f"{where}: empty text")
        if not label:
            raise LmforgeError(f"{where}: empty label")
        yield LabeledText(text, label, where)


def _header_columns(
    where: str, cells: list[str], text_field: str | None, label_field: str | None
) -> tuple[int, int] | None:
    """(text column, label column) when CELLS is a header; None when it is a data row."""
    names = [c.lower() for c in cells]
    text_col = _first_index(names, (text_field.lower(),) if text_field else TEXT_COLUMNS)
    label_col = _first_index(names, (label_field.lower(),) if label_field else LABEL_COLUMNS)
    if text_col is None and label_col is None and not (text_field or label_field):
        return None
    listed = ", ".join(cells)
    for col, given, kind in ((text_col, text_field, "text"), (label_col, label_field, "label")):
        if col is None and given:
            raise LmforgeError(f"{where}: no column {given!r} in the header (columns: {listed})")
        if col is None:  # a header that names only one of the two: guessing would misread it
            raise LmforgeError(
                f"{where}: the header has no {kind} column (columns: {listed}); "
                f"choose one with {kind}_field"
            )
    assert text_col is not None and label_col is not None
    if text_col == label_col:
        raise LmforgeError(f"{where}: the text and label columns are the same ({cells[text_col]})")
    return text_col, label_col


def _labeled_record(
    record: dict[str, Any], where: str, text_field: str | None, label_field: str | None
) -> LabeledText:
    text_key = _record_key(record, where, text_field, TEXT_COLUMNS, "text")
    label_key = _record_key(record, where, label_field, LABEL_COLUMNS, "label")
    text, label = record[text_key], record[label_key]
    if not isinstance(text, str):
        raise LmforgeError(f'{where}: "{text_key}" must be a string')
    if not text.strip():
        raise LmforgeError(f"{where}: empty text")
    if isinstance(label, bool) or not isinstance(label, str | int):
        raise LmforgeError(f'{where}: "{label_key}" must be a string or an integer')
    label = str(label).strip()
    if not label:
        raise LmforgeError(f"{where}: empty label")
    return LabeledText(text, label, where)


# -- extractive QA ---------------------------------------------------------------------------


def read_squad(path: StrPath, *, require_answers: bool = True) -> list[QAExample]:
    """The questions of a SQuAD v1.1 `.json` file or a flat `.jsonl` file, answers checked.

    JSONL lines are {"id", "question", "context", "answers"} with answers as HF datasets write
    them ({"text": [...], "answer_start": [...]}) or as a list of {"text", "answer_start"}.
    REQUIRE_ANSWERS=False allows questions without answers (eval sets, SQuAD v2 style).
    """
    suffix = _check_suffix(path, (".json", ".jsonl"))
    if suffix == ".json":
        examples = list(_squad_json(path, require_answers))
    else:
        examples = [
            _squad_record(record, where, require_answers) for where, record in _jsonl_records(path)
        ]
    seen: set[str] = set()
    for ex in examples:
        if ex.id in seen:
            raise LmforgeError(f"{ex.where}: duplicate question id {ex.id!r}")
        seen.add(ex.id)
    return _nonempty(path, examples)


def _squad_json(path: StrPath, require_answers: bool) -> Iterator[QAExample]:
    text = _read_text(path)
    try:
        top = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LmforgeError(
            f"{path}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})"
        ) from None
    if not isinstance(top, dict) or not isinstance(top.get("data"), list):
        raise LmforgeError(
            f'{path}: want a SQuAD object {{"data": [...]}} (use .jsonl for one question a line)'
        )
    for i, article in enumerate(top["data"]):
        at = f"{path}: data[{i}]"
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            raise LmforgeError(f'{at}: "paragraphs" must be a list')
        for j, paragraph in enumerate(paragraphs):
            at = f"{path}: data[{i}].paragraphs[{j}]"
            if not isinstance(paragraph, dict):
                raise LmforgeError(f"{at}: must be an object with a context and qas")
            context, qas = paragraph.get("context"), paragraph.get("qas")
            if not isinstance(context, str) or not context:
                raise LmforgeError(f'{at}: "context" must be a non-empty string')
            if not isinstance(qas, list):
                raise LmforgeError(f'{at}: "qas" must be a list')
            for k, qa in enumerate(qas):
                if not isinstance(qa, dict):
                    raise LmforgeError(f"{at}.qas[{k}]: must be an object")
                qid = qa.get("id")
                if isinstance(qid, bool) or not isinstance(qid, str | int) or qid == "":
                    raise LmforgeError(f'{at}.qas[{k}]: "id" must be a string')
                where = f"{path}#{qid}"
                yield _qa_example(
                    str(qid), qa.get("question"), context, qa.get("answers"), where, require_answers
                )


def _squad_record(record: dict[str, Any], where: str, require_answers: bool) -> QAExample:
    qid = record.get("id")
    if isinstance(qid, bool) or not isinstance(qid, str | int) or qid == "":
        raise LmforgeError(f'{where}: "id" must be a string')
    context = record.get("context")
    if not isinstance(context, str) or not context:
        raise LmforgeError(f'{where}: "context" must be a non-empty string')
    answers = record.get("answers")
    if isinstance(answers, dict):  # HF datasets: {"text": [...], "answer_start": [...]}
        texts, starts = answers.get("text"), answers.get("answer_start")
        if not isinstance(texts, list) or not isinstance(starts, list) or len(texts) != len(starts):
            raise LmforgeError(
                f'{where}: "answers" must hold lists "text" and "answer_start" of equal length'
            )
        answers = [{"text": t, "answer_start": s} for t, s in zip(texts, starts, strict=True)]
    return _qa_example(str(qid), record.get("question"), context, answers, where, require_answers)


def _qa_example(
    qid: str, question: Any, context: str, answers: Any, where: str, require_answers: bool
) -> QAExample:
    if not isinstance(question, str) or not question.strip():
        raise LmforgeError(f'{where}: "question" must be a non-empty string')
    if answers is None:
        answers = []
    if not isinstance(answers, list):
        raise LmforgeError(f'{where}: "answers" must be a list of {{text, answer_start}} objects')
    checked = []
    for answer in answers:
        text = answer.get("text") if isinstance(answer, dict) else None
        start = answer.get("answer_start") if isinstance(answer, dict) else None
        if not isinstance(text, str) or not text:
            raise LmforgeError(f'{where}: an answer\'s "text" must be a non-empty string')
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise LmforgeError(f'{where}: answer {text!r}: "answer_start" must be an integer >= 0')
        if context[start : start + len(text)] != text:
            raise LmforgeError(f"{where}: answer {text!r} is not in its context at offset {start}")
        checked.append((text, start))
    if require_answers and not checked:
        raise LmforgeError(f"{where}: question has no answers")
    return QAExample(qid, question, context, tuple(checked), where)


# -- text pairs ------------------------------------------------------------------------------


def read_pairs(path: StrPath) -> list[TextPair]:
    """The (source, reference) pairs of a `.jsonl` file or a two-column `.tsv` file."""
    suffix = _check_suffix(path, (".jsonl", ".tsv"))
    if suffix == ".jsonl":
        pairs = [_pair_record(record, where) for where, record in _jsonl_records(path)]
    else:
        pairs = list(_pair_rows(path))
    return _nonempty(path, pairs)


def _pair_record(record: dict[str, Any], where: str) -> TextPair:
    values = []
    for keys, kind in ((SOURCE_KEYS, "source"), (REFERENCE_KEYS, "reference")):
        key = _record_key(record, where, None, keys, kind)
        value = record[key]
        if not isinstance(value, str) or not value.strip():
            raise LmforgeError(f'{where}: "{key}" must be a non-empty string')
        values.append(value)
    return TextPair(values[0], values[1], where)


def _pair_rows(path: StrPath) -> Iterator[TextPair]:
    headers = {(s, r) for s in SOURCE_KEYS for r in REFERENCE_KEYS}
    for n, (line, row) in enumerate(_tsv_rows(path)):
        where = f"{path}:{line}"
        if n == 0 and len(row) == 2 and (row[0].lower(), row[1].lower()) in headers:
            continue
        if len(row) != 2:
            raise LmforgeError(
                f"{where}: want 2 tab-separated columns (source, reference), got {len(row)}"
            )
        if not row[0]:
            raise LmforgeError(f"{where}: empty source")
        if not row[1]:
            raise LmforgeError(f"{where}: empty reference")
        yield TextPair(row[0], row[1], where)


# -- plain texts -----------------------------------------------------------------------------


def read_texts(path: StrPath) -> list[str]:
    """Texts to measure perplexity on: a `.txt`/`.md` file whole, or each `.jsonl` "text".

    Empty JSONL texts are skipped (WikiText exports are full of them); a file with no text left
    is an error.
    """
    suffix = _check_suffix(path, (".txt", ".md", ".jsonl"))
    if suffix != ".jsonl":
        text = _read_text(path)
        return _nonempty(path, [text] if text.strip() else [])
    texts = []
    for where, record in _jsonl_records(path):
        if "text" not in record:
            raise LmforgeError(f'{where}: no "text" field (fields: {_field_list(record)})')
        if not isinstance(record["text"], str):
            raise LmforgeError(f'{where}: "text" must be a string')
        if record["text"].strip():
            texts.append(record["text"])
    return _nonempty(path, texts)


def file_sha256(path: StrPath) -> str:
    """Hex sha256 of PATH's bytes, to record exactly which file a run read."""
    digest = hashlib.sha256()
    with _open(path) as f:
        while chunk := f.read(_READ_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


# -- reading ---------------------------------------------------------------------------------


def _check_suffix(path: StrPath, allowed: Sequence[str]) -> str:
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in allowed:
        raise LmforgeError(f"{path}: unsupported file type (want {'/'.join(allowed)})")
    return suffix


def _open(path: StrPath) -> IO[bytes]:
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise LmforgeError(f"{path}: no such file") from None
    except OSError as exc:
        raise LmforgeError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _read_text(path: StrPath) -> str:
    """PATH whole, decoded; an undecodable byte is an error naming its line."""
    with _open(path) as f:
        data = f.read()
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise LmforgeError(f"{path}:{line}: not valid UTF-8 ({exc.reason})") from None


def _lines(path: StrPath) -> Iterator[tuple[int, str]]:
    """PATH's lines with their numbers (from 1), decoded, line endings kept."""
    with _open(path) as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise LmforgeError(
                    f"{path}:{number}: not valid UTF-8 at byte {exc.start} of the line "
                    f"({exc.reason})"
                ) from None
            yield number, line.removeprefix("\ufeff") if number == 1 else line


def _jsonl_records(path: StrPath) -> Iterator[tuple[str, dict[str, Any]]]:
    """("path:line", object) for each non-blank line."""
    for number, line in _lines(path):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LmforgeError(
                f"{where}: not valid JSON ({exc.msg} at column {exc.colno})"
            ) from None
        if not isinstance(record, dict):
            raise LmforgeError(f"{where}: want a JSON object, got {type(record).__name__}")
        yield where, record


def _tsv_rows(path: StrPath) -> Iterator[tuple[int, list[str]]]:
    """Non-blank lines split on tabs, fields stripped. No quoting: AG News text has bare quotes."""
    for number, line in _lines(path):
        if line.strip():
            yield number, [cell.strip() for cell in line.split("\t")]


def _csv_rows(path: StrPath) -> Iterator[tuple[int, list[str]]]:
    """Non-blank CSV records (quoted fields may span lines) with their first line, stripped."""
    csv.field_size_limit(sys.maxsize)  # as `sources.read_delimited`: long reviews are fine
    reader = csv.reader(line for _, line in _lines(path))
    start = 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise LmforgeError(f"{path}:{start}: malformed CSV ({exc})") from None
        line, start = start, reader.line_num + 1
        if any(cell.strip() for cell in row):
            yield line, [cell.strip() for cell in row]


def _chain_first(
    first: tuple[int, list[str]], rest: Iterator[tuple[int, list[str]]]
) -> Iterator[tuple[int, list[str]]]:
    yield first
    yield from rest


def _first_index(names: list[str], wanted: Sequence[str]) -> int | None:
    """The column of the first name in WANTED (in WANTED's order) that NAMES has."""
    for name in wanted:
        if name in names:
            return names.index(name)
    return None


def _record_key(
    record: dict[str, Any], where: str, given: str | None, known: Sequence[str], kind: str
) -> str:
    """The field of RECORD holding KIND: GIVEN, or the first of KNOWN present."""
    for key in (given,) if given else known:
        if key in record:
            return key
    want = repr(given) if given else "one of " + ", ".join(f'"{k}"' for k in known)
    hint = f"; choose one with {kind}_field" if kind in ("text", "label") else ""
    raise LmforgeError(
        f"{where}: no {kind} field (want {want}; fields: {_field_list(record)}){hint}"
    )


def _field_list(record: dict[str, Any]) -> str:
    return ", ".join(map(str, record)) or "none"


def _nonempty(path: StrPath, items: list[T]) -> list[T]:
    if not items:
        raise LmforgeError(f"{path}: no examples")
    return items
