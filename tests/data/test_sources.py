"""Sources: every format, compression, folder/glob expansion, and each bad-input error."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from lmforge.data.sources import (
    SourceOptions,
    SourceTally,
    expand_sources,
    file_sha256,
    read_documents,
)
from lmforge.errors import LmforgeError


def read_all(path: Path, **options: object) -> tuple[list, SourceTally]:
    tally = SourceTally()
    docs = list(read_documents(path, SourceOptions(**options), tally))  # type: ignore[arg-type]
    return docs, tally


def test_text_and_markdown_files_are_one_document_each(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("first line\n\nsecond  paragraph \n", encoding="utf-8")
    (tmp_path / "b.md").write_text("# Title\n\n你好，世界。\n", encoding="utf-8")
    for name, want in (
        ("a.txt", "first line\n\nsecond  paragraph \n"),
        ("b.md", "# Title\n\n你好，世界。\n"),
    ):
        docs, tally = read_all(tmp_path / name)
        assert [d.text for d in docs] == [want]
        assert tally.bytes_read == (tmp_path / name).stat().st_size


def test_big_text_file_is_cut_at_blank_lines_into_parts_that_join_back_exactly(
    tmp_path: Path,
) -> None:
    paragraphs = [f"Paragraph {i}. " + "word " * (i % 40 + 5) + "\n\n" for i in range(3000)]
    text = "".join(paragraphs)
    (tmp_path / "big.txt").write_text(text, encoding="utf-8")
    docs, _ = read_all(tmp_path / "big.txt", max_doc_chars=20_000)
    assert len(docs) > 5
    assert "".join(d.text for d in docs) == text
    assert [d.continued for d in docs] == [False] + [True] * (len(docs) - 1)
    assert all(len(d.text) <= 20_000 for d in docs)
    assert all(d.text.endswith("\n\n") for d in docs[:-1])


def test_jsonl_text_field_and_chat_messages(tmp_path: Path) -> None:
    lines = [
        json.dumps({"text": "plain document", "id": 1}),
        "",
        json.dumps({"body": "other field", "text": "second"}),
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "Hi?"},
                    {"role": "assistant", "content": "Hello!"},
                ]
            }
        ),
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    docs, _ = read_all(tmp_path / "d.jsonl")
    assert [d.text for d in docs] == ["plain document", "second", "Hi?\n\nHello!"]
    assert docs[2].messages == [
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello!"},
    ]
    assert docs[1].source.endswith("d.jsonl:3")
    docs, _ = read_all(tmp_path / "d.jsonl", text_field="body", on_error="skip")
    assert [d.text for d in docs] == ["other field", "Hi?\n\nHello!"]


def test_malformed_json_line_names_file_and_line_or_is_skipped_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok one"}\n{"text": broken\n{"text": "ok two"}\n', encoding="utf-8")
    with pytest.raises(LmforgeError, match=r"bad\.jsonl:2: malformed JSON .*--on-error skip"):
        read_all(path)
    docs, tally = read_all(path, on_error="skip")
    assert [d.text for d in docs] == ["ok one", "ok two"]
    assert tally.errors == {"malformed_json": 1}
    assert "bad.jsonl:2" in tally.first_errors[0]


def test_missing_field_and_wrong_type_are_named(tmp_path: Path) -> None:
    path = tmp_path / "f.jsonl"
    path.write_text('{"title": "x"}\n', encoding="utf-8")
    with pytest.raises(LmforgeError, match=r"f\.jsonl:1: no field 'text' .*fields: title"):
        read_all(path)
    path.write_text('{"text": 5}\n', encoding="utf-8")
    with pytest.raises(LmforgeError, match="is int, not a string"):
        read_all(path)
    path.write_text('{"messages": [{"role": "wizard", "content": "x"}]}\n', encoding="utf-8")
    with pytest.raises(LmforgeError, match="wizard"):
        read_all(path)


def test_json_array_of_records_and_strings(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"text": "one"}, "two"]), encoding="utf-8")
    docs, _ = read_all(path)
    assert [d.text for d in docs] == ["one", "two"]
    path.write_text("[1, 2", encoding="utf-8")
    with pytest.raises(LmforgeError, match=r"a\.json: malformed JSON"):
        read_all(path)


def test_csv_and_tsv_columns(tmp_path: Path) -> None:
    (tmp_path / "r.csv").write_text(
        'id,review\n1,"Great, really\nmultiline"\n2,bad\n', encoding="utf-8"
    )
    docs, _ = read_all(tmp_path / "r.csv", text_field="review")
    assert [d.text for d in docs] == ["Great, really\nmultiline", "bad"]
    (tmp_path / "r.tsv").write_text("sentence\tlabel\nit works\t1\n", encoding="utf-8")
    docs, _ = read_all(tmp_path / "r.tsv", text_field="sentence")
    assert [d.text for d in docs] == ["it works"]
    with pytest.raises(
        LmforgeError, match=r"r\.tsv: no column 'text' \(columns: sentence, label\)"
    ):
        read_all(tmp_path / "r.tsv")


def test_parquet_column_and_missing_column(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"content": ["alpha doc", "beta doc"], "n": [1, 2]}), path)
    docs, tally = read_all(path, text_field="content")
    assert [d.text for d in docs] == ["alpha doc", "beta doc"]
    assert tally.bytes_read == path.stat().st_size
    with pytest.raises(LmforgeError, match=r"no column 'text' .*content, n"):
        read_all(path)


@pytest.mark.parametrize("suffix", [".gz", ".zst"])
def test_compressed_files_are_read_transparently(tmp_path: Path, suffix: str) -> None:
    payload = "".join(json.dumps({"text": f"doc {i} ünïcode"}) + "\n" for i in range(100)).encode()
    path = tmp_path / f"c.jsonl{suffix}"
    data = (
        gzip.compress(payload) if suffix == ".gz" else zstandard.ZstdCompressor().compress(payload)
    )
    path.write_bytes(data)
    docs, tally = read_all(path)
    assert [d.text for d in docs] == [f"doc {i} ünïcode" for i in range(100)]
    assert tally.bytes_read == len(data)


def test_corrupt_compressed_file_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.txt.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00garbage-garbage")
    with pytest.raises(LmforgeError, match=r"broken\.txt\.gz"):
        read_all(path)
    path = tmp_path / "broken.jsonl.zst"
    path.write_bytes(b"\xff" * 40)
    with pytest.raises(LmforgeError, match=r"broken\.jsonl\.zst: not a valid zstd file"):
        read_all(path)


def test_undecodable_bytes_name_the_offset(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"fine text then caf\xe9 au lait\n")
    with pytest.raises(LmforgeError, match=r"latin1\.txt: not valid UTF-8 at byte 18"):
        read_all(path)
    docs, tally = read_all(path, on_error="skip")
    assert docs == [] and tally.errors == {"undecodable": 1}
    jl = tmp_path / "l.jsonl"
    jl.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(LmforgeError, match=r"l\.jsonl:2: not valid UTF-8"):
        read_all(jl)


def test_expand_folders_globs_and_files_in_stable_order_without_repeats(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    for name in ("b.txt", "a.jsonl", "sub/c.md", "sub/ignored.bin", "z.csv.gz"):
        (tmp_path / name).write_bytes(b"x")
    found = expand_sources([tmp_path, str(tmp_path / "*.txt")])
    rel = [p.relative_to(tmp_path).as_posix() for p in found]
    assert rel == ["a.jsonl", "b.txt", "sub/c.md", "z.csv.gz"]


def test_bad_source_specs_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(LmforgeError, match=r"nope\.txt: no such file"):
        expand_sources([str(tmp_path / "nope.txt")])
    (tmp_path / "x.bin").write_bytes(b"1")
    with pytest.raises(LmforgeError, match="unsupported file type"):
        expand_sources([tmp_path / "x.bin"])
    with pytest.raises(LmforgeError, match="pattern matches no"):
        expand_sources([str(tmp_path / "*.jsonl")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(LmforgeError, match="folder has no"):
        expand_sources([tmp_path / "empty"])


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read anything")
def test_unreadable_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "secret.txt"
    path.write_text("hidden text", encoding="utf-8")
    path.chmod(0)
    try:
        with pytest.raises(LmforgeError, match="permission denied"):
            expand_sources([path])
    finally:
        path.chmod(0o644)


def test_file_sha256_matches_hashlib(tmp_path: Path) -> None:
    import hashlib

    path = tmp_path / "h.txt"
    data = os.urandom(3 << 20)
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()
