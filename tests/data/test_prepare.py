"""`prepare` end to end on generated corpora: nanoGPT parity, splits, funnel, idempotence."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import run_env
from lmforge.data.loader import TokenSplit, random_batches
from lmforge.data.prepare import PrepareConfig, prepare
from lmforge.data.shards import read_manifest, verify_shards
from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer

_WORD_LIST = """the of and to in is was for on that with as by at from his her they this which have
king queen lord lady sword crown river stone night morning bright dark gentle noble speak answer
honour country battle letter garden winter summer friend enemy heart"""
WORDS = _WORD_LIST.split()


def sentence(rng: random.Random, n: int = 12) -> str:
    words = [rng.choice(WORDS) for _ in range(n)]
    return " ".join(words).capitalize() + "."


def prose(rng: random.Random, sentences: int = 8) -> str:
    return " ".join(sentence(rng, rng.randint(8, 16)) for _ in range(sentences))


def play(rng: random.Random, lines: int = 2000) -> str:
    """Shakespeare-like text: speakers, verse lines, blank lines, trailing spaces."""
    out = []
    for i in range(lines):
        if i % 7 == 0:
            out.append(f"\n{rng.choice(['KING', 'QUEEN', 'First Lord', 'ROMEO'])}:")
        out.append(sentence(rng, rng.randint(4, 9)) + (" " if i % 97 == 0 else ""))
    return "\n".join(out).lstrip("\n") + "\n"


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), "utf-8")
    return path


def run(tmp_path: Path, *sources: Path, name: str = "ds", **options: object):  # type: ignore[no-untyped-def]
    options.setdefault("workers", 1)
    config = PrepareConfig(sources=tuple(str(s) for s in sources), **options)  # type: ignore[arg-type]
    return prepare(config, tmp_path / "datasets" / name)


def split_ids(path: Path, split: str) -> list[int]:
    return TokenSplit.open(path, split).read(0, len(TokenSplit.open(path, split))).tolist()


def test_char_tail_split_matches_nanogpt_shakespeare_char(tmp_path: Path) -> None:
    text = play(random.Random(0))
    (tmp_path / "input.txt").write_text(text, encoding="utf-8")
    result = run(tmp_path, tmp_path / "input.txt", tokenizer="char", split="tail", val_fraction=0.1)
    # nanoGPT data/shakespeare_char/prepare.py, restated:
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    n = len(text)
    train, val = text[: int(n * 0.9)], text[int(n * 0.9) :]
    tokenizer = Tokenizer.load(result.path)
    assert tokenizer.vocab_size == len(chars)
    assert split_ids(result.path, "train") == [stoi[c] for c in train]
    assert split_ids(result.path, "val") == [stoi[c] for c in val]
    assert result.manifest["dtype"] == "uint16"
    verify_shards(result.path, result.manifest)


def test_random_split_is_document_level_exact_and_seeded(tmp_path: Path) -> None:
    rng = random.Random(1)
    docs = [f"Document {i}. " + prose(rng, 4) for i in range(200)]
    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in docs])
    common = {"tokenizer": "bpe", "vocab_size": 400, "val_fraction": 0.1, "test_fraction": 0.05}
    a = run(tmp_path, src, name="a", seed=7, **common)
    tok = Tokenizer.load(a.path)
    eos = tok.eos_id
    assert eos is not None

    def documents(path: Path, split: str) -> list[str]:
        ids = split_ids(path, split)
        pieces, cur = [], []
        for t in ids:
            if t == eos:
                pieces.append(tok.decode(cur))
                cur = []
            else:
                cur.append(t)
        assert cur == []  # every document ends with EOS
        return pieces

    got = {s: documents(a.path, s) for s in ("train", "val", "test")}
    assert [len(got[s]) for s in ("train", "val", "test")] == [170, 20, 10]
    assert sorted(got["train"] + got["val"] + got["test"]) == sorted(docs)
    assert [d for d in docs if d in set(got["train"])] == got["train"]  # corpus order kept
    same = run(tmp_path, src, name="b", seed=7, **common)
    other = run(tmp_path, src, name="c", seed=8, **common)
    assert same.manifest["shards"] == a.manifest["shards"]
    assert documents(other.path, "val") != got["val"]


def test_funnel_counts_filters_pii_and_duplicates(tmp_path: Path) -> None:
    rng = random.Random(2)
    base = [prose(rng, 6) for _ in range(30)]
    near = base[0].split(" ")
    near[5] = "replaced"
    records = [{"text": d} for d in base]
    records += [
        {"text": base[1]},  # exact duplicate
        {"text": "  " + base[2].upper() + "\n"},  # exact after case/space normalization
        {"text": " ".join(near)},  # near duplicate
        {"text": "too short"},
        {"text": "Lorem ipsum dolor sit amet. " + prose(rng, 3)},
        {"text": prose(rng, 5) + " Write to jane.doe@example.com or call +1-415-555-0132."},
        {"text": "\n".join(["Buy cheap watches now"] * 20)},
    ]
    src = write_jsonl(tmp_path / "c.jsonl", records)
    result = run(tmp_path, src, tokenizer="byte", save_removed=True)
    m = result.manifest
    removed = {reason: r["documents"] for reason, r in m["removed"].items()}
    assert removed["exact_duplicate"] == 2
    assert removed["near_duplicate"] == 1
    assert removed["min_chars"] == 1
    assert removed["lorem_ipsum"] == 1
    assert sum(removed.values()) == 6  # and the spam page, by a repetition rule
    steps = {s["step"]: s for s in m["funnel"]}
    assert steps["read"]["documents"] == len(records)
    assert steps["near_dedup"]["documents"] == len(records) - 6 == m["funnel"][-1]["documents"]
    assert m["pii"]["found"]["email"] == 1 and m["pii"]["found"]["phone"] == 1
    text = Tokenizer.load(result.path).decode(
        split_ids(result.path, "train") + split_ids(result.path, "val")
    )
    assert "<EMAIL>" in text and "<PHONE>" in text and "jane.doe" not in text
    import gzip

    with gzip.open(result.path / "removed.jsonl.gz", "rt", encoding="utf-8") as f:
        side = [json.loads(line) for line in f]
    assert sorted(r["reason"] for r in side) == sorted(
        r for r, n in removed.items() for _ in range(n)
    )
    assert m["sources"][0]["documents_read"] == len(records)


def test_pii_drop_and_keep(tmp_path: Path) -> None:
    rng = random.Random(3)
    records = [{"text": prose(rng)} for _ in range(10)]
    records.append({"text": prose(rng) + " My card is 4111 1111 1111 1111."})
    src = write_jsonl(tmp_path / "p.jsonl", records)
    dropped = run(tmp_path, src, name="drop", tokenizer="byte", pii="drop")
    assert dropped.manifest["removed"]["pii"]["documents"] == 1
    assert dropped.manifest["pii"]["found"] == {"credit_card": 1}
    kept = run(tmp_path, src, name="keep", tokenizer="byte", pii="keep")
    text = Tokenizer.load(kept.path).decode(
        split_ids(kept.path, "train") + split_ids(kept.path, "val")
    )
    assert "4111 1111 1111 1111" in text


def test_chinese_corpus_is_kept_deduplicated_and_scrubbed(tmp_path: Path) -> None:
    rng = random.Random(4)
    hanzi = [chr(c) for c in range(0x4E00, 0x4E00 + 800)]

    def article() -> str:
        return "".join(
            "".join(rng.choice(hanzi) for _ in range(rng.randint(10, 25))) + "。" for _ in range(12)
        )

    docs = [article() for _ in range(20)]
    variant = list(docs[0])
    variant[40] = "变"
    records = [{"text": d} for d in docs] + [
        {"text": "".join(variant)},
        {"text": article() + "请联系13812345678，身份证号11010519491231002X。"},
    ]
    src = write_jsonl(tmp_path / "zh.jsonl", records)
    result = run(tmp_path, src, tokenizer="bpe", vocab_size=600)
    m = result.manifest
    assert m["removed"] == {"near_duplicate": {"documents": 1, "chars": len(variant)}}
    assert m["pii"]["found"] == {"phone": 1, "id_number": 1}
    tok = Tokenizer.load(result.path)
    text = tok.decode(split_ids(result.path, "train") + split_ids(result.path, "val"))
    assert docs[5] in text and "13812345678" not in text and "<PHONE>" in text


def test_chat_records_are_rendered_with_the_chat_template(tmp_path: Path) -> None:
    rng = random.Random(5)
    records = [
        {
            "messages": [
                {"role": "user", "content": prose(rng, 2)},
                {"role": "assistant", "content": prose(rng, 3)},
            ]
        }
        for _ in range(20)
    ]
    src = write_jsonl(tmp_path / "chat.jsonl", records)
    result = run(tmp_path, src, tokenizer="bpe", vocab_size=500, val_fraction=0.0)
    tok = Tokenizer.load(result.path)
    ids = split_ids(result.path, "train")
    first = [*tok.encode_chat(records[0]["messages"], add_generation_prompt=False), tok.eos_id]
    assert ids[: len(first)] == first
    assert tok.decode(ids, skip_special_tokens=False).count("<|im_start|>assistant") == 20


def test_given_tokenizer_is_used_as_is(tmp_path: Path, tiny_tokenizer: Tokenizer) -> None:
    tiny_tokenizer.save(tmp_path / "tok")
    rng = random.Random(6)
    docs = [prose(rng) for _ in range(12)]
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in docs])
    result = run(tmp_path, src, tokenizer=str(tmp_path / "tok"), split="tail", val_fraction=0.0)
    want: list[int] = []
    for d in docs:
        want += [*tiny_tokenizer.encode(d, add_special_tokens=False), tiny_tokenizer.eos_id]
    assert split_ids(result.path, "train") == want
    assert result.manifest["tokenizer"]["kind"] == "given"


def test_workers_do_not_change_the_result(tmp_path: Path) -> None:
    rng = random.Random(7)
    records = [{"text": prose(rng, rng.randint(2, 10))} for _ in range(1500)]
    records += records[:50]
    src = write_jsonl(tmp_path / "w.jsonl", records)
    one = run(tmp_path, src, name="one", tokenizer="bpe", vocab_size=300, workers=1)
    two = run(tmp_path, src, name="two", tokenizer="bpe", vocab_size=300, workers=2)
    assert one.manifest["content_key"] == two.manifest["content_key"]
    assert one.manifest["shards"] == two.manifest["shards"]
    assert one.manifest["funnel"] == two.manifest["funnel"]
    assert two.manifest["removed"]["exact_duplicate"]["documents"] == 50


def test_rerun_is_a_no_op_and_other_options_need_overwrite(tmp_path: Path) -> None:
    rng = random.Random(8)
    src = write_jsonl(tmp_path / "r.jsonl", [{"text": prose(rng)} for _ in range(20)])
    first = run(tmp_path, src, tokenizer="byte")
    stamp = (first.path / "manifest.json").stat().st_mtime_ns
    again = run(tmp_path, src, tokenizer="byte", workers=2)  # workers do not change the data
    assert again.unchanged and (first.path / "manifest.json").stat().st_mtime_ns == stamp
    with pytest.raises(LmforgeError, match=r"already exists .*--overwrite"):
        run(tmp_path, src, tokenizer="byte", min_chars=50)
    config = PrepareConfig(sources=(str(src),), tokenizer="byte", min_chars=50, workers=1)
    replaced = prepare(config, first.path, overwrite=True)
    assert (
        not replaced.unchanged and replaced.manifest["content_key"] != first.manifest["content_key"]
    )
    assert sorted(p.name for p in first.path.parent.iterdir()) == ["ds"]


def test_failure_midway_leaves_nothing(tmp_path: Path) -> None:
    rng = random.Random(9)
    lines = [json.dumps({"text": prose(rng)}) for _ in range(3000)] + ["{broken"]
    src = tmp_path / "late-error.jsonl"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(LmforgeError, match=r"late-error\.jsonl:3001: malformed JSON"):
        run(tmp_path, src, tokenizer="byte")
    assert list((tmp_path / "datasets").iterdir()) == []
    skipped = run(tmp_path, src, tokenizer="byte", on_error="skip")
    assert skipped.manifest["read_errors"] == {"malformed_json": 1}


def test_kill_9_leaves_no_data_set_and_the_next_run_cleans_up(tmp_path: Path) -> None:
    rng = random.Random(10)
    src = write_jsonl(tmp_path / "k.jsonl", [{"text": prose(rng, 20)} for _ in range(6000)])
    home = tmp_path / "home"
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from lmforge.data.prepare import PrepareConfig, prepare
        prepare(PrepareConfig(sources=({str(src)!r},), tokenizer="bpe", vocab_size=2000,
                workers=1), Path({str(home / "datasets" / "k")!r}))
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], env=run_env(home))
    deadline = time.monotonic() + 60
    while (
        not list((home / "datasets").glob(".k.*.tmp/_kept.jsonl")) and time.monotonic() < deadline
    ):
        time.sleep(0.02)  # killed while the first pass writes
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (home / "datasets" / "k").exists()
    assert list((home / "datasets").glob(".k.*.tmp"))  # the abandoned build
    # The next run (of a small source: what it builds does not matter here) removes it.
    small = write_jsonl(tmp_path / "small.jsonl", [{"text": prose(rng, 20)} for _ in range(50)])
    config = PrepareConfig(sources=(str(small),), tokenizer="byte", workers=1)
    prepare(config, home / "datasets" / "k")
    assert sorted(p.name for p in (home / "datasets").iterdir()) == ["k"]
    verify_shards(home / "datasets" / "k", read_manifest(home / "datasets" / "k"))


def test_empty_after_filtering_and_tiny_vocab_are_clear_errors(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "short.jsonl", [{"text": "hi"}, {"text": "ok"}])
    with pytest.raises(
        LmforgeError, match="no documents left after filtering: read 2, removed min_chars 2"
    ):
        run(tmp_path, src, tokenizer="byte")
    rng = random.Random(11)
    src = write_jsonl(tmp_path / "ok.jsonl", [{"text": prose(rng)} for _ in range(5)])
    with pytest.raises(LmforgeError, match="--vocab-size 100 is too small"):
        run(tmp_path, src, tokenizer="bpe", vocab_size=100)
    assert list((tmp_path / "datasets").iterdir()) == []


def test_options_are_validated_with_their_flag_names() -> None:
    for options, flag in (
        ({"val_fraction": 1.5}, "--val-fraction"),
        ({"val_fraction": 0.6, "test_fraction": 0.5}, "--test-fraction"),
        ({"dedup": "fuzzy"}, "--dedup"),
        ({"pii": "redact"}, "--pii"),
        ({"split": "head"}, "--split"),
        ({"tokenizer": "wordpiece"}, "--tokenizer"),
        ({"minhash_threshold": 1.2}, "--minhash-threshold"),
        ({"on_error": "ignore"}, "--on-error"),
    ):
        with pytest.raises(LmforgeError, match=flag):
            PrepareConfig(sources=("x.txt",), **options)  # type: ignore[arg-type]


def test_loader_reads_a_prepared_data_set(tmp_path: Path) -> None:
    import torch

    text = play(random.Random(12), 500)
    (tmp_path / "p.txt").write_text(text, encoding="utf-8")
    result = run(tmp_path, tmp_path / "p.txt", tokenizer="char", split="tail")
    split = TokenSplit.open(result.path, "train")
    x, y = next(random_batches(split, 4, 16, generator=torch.Generator().manual_seed(0)))
    tok = Tokenizer.load(result.path)
    for row_x, row_y in zip(x.tolist(), y.tolist(), strict=True):
        piece = tok.decode(row_x)
        assert piece in text and tok.decode(row_y)[:-1] == piece[1:]
    assert np.asarray(split.shards[0]).dtype == np.uint16


def test_tail_split_with_a_test_fraction_cuts_the_character_stream_in_three(tmp_path: Path) -> None:
    rng = random.Random(13)
    parts = [play(rng, 300) for _ in range(3)]
    for i, part in enumerate(parts):
        (tmp_path / f"{i}.txt").write_text(part, encoding="utf-8")
    files = [tmp_path / f"{i}.txt" for i in range(3)]
    result = run(
        tmp_path, *files, tokenizer="char", split="tail", val_fraction=0.1, test_fraction=0.2
    )
    text = "".join(parts)  # no separator: the char tokenizer has no EOS
    n = len(text)
    a, b = int(n * (1 - 0.3)), int(n * (1 - 0.2))
    tok = Tokenizer.load(result.path)
    assert tok.decode(split_ids(result.path, "train")) == text[:a]
    assert tok.decode(split_ids(result.path, "val")) == text[a:b]
    assert tok.decode(split_ids(result.path, "test")) == text[b:]
    assert [result.manifest["splits"][s]["chars"] for s in ("train", "val", "test")] == [
        a,
        b - a,
        n - b,
    ]


def test_bpe_learns_nothing_from_held_out_text(tmp_path: Path) -> None:
    rng = random.Random(14)
    greek = "αβγδεζηθικλμνξοπρστυφχψω"
    words = ["".join(rng.choice(greek) for _ in range(rng.randint(3, 8))) for _ in range(40)]
    held_out = " ".join(rng.choice(words) for _ in range(150)) + "."
    english = [prose(rng, 12) for _ in range(30)]
    src = write_jsonl(tmp_path / "g.jsonl", [{"text": d} for d in [*english, held_out]])
    assert len(held_out) < 0.1 * sum(len(d) for d in [*english, held_out])
    result = run(tmp_path, src, tokenizer="bpe", vocab_size=600, split="tail", val_fraction=0.1)
    tok = Tokenizer.load(result.path)
    # Never trained on Greek: no merges for it, one token per UTF-8 byte.
    assert len(tok.encode(held_out)) == len(held_out.encode("utf-8"))
    trained_on_it = run(
        tmp_path, src, name="all", tokenizer="bpe", vocab_size=600, split="tail", val_fraction=0.0
    )
    assert (
        len(Tokenizer.load(trained_on_it.path).encode(held_out))
        < len(held_out.encode("utf-8")) // 2
    )
