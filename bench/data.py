"""Throughput and memory of `lmforge data prepare` on a generated corpus, and MinHash vs datasketch.

    .venv/bin/python bench/data.py                 # 200 MB corpus, 2 workers
    .venv/bin/python bench/data.py --mb 50         # quicker

1. A corpus of --mb megabytes is generated once (seeded) into bench/results/corpus-<mb>mb/ as
   zstd-compressed JSON-lines shards: English-like prose over a Zipf vocabulary, 10% Chinese
   documents, planted exact and near duplicates, sprinkled PII, boilerplate lines and spam.
2. The whole prepare — read, clean, PII scrub, exact + MinHash dedup, BPE training (vocab 8192)
   and tokenization — runs as the real CLI in a subprocess with --workers 2; its process tree's
   RSS is sampled every 0.1 s. Reported: MB/s of input text (uncompressed) and the peak RSS,
   against the 1.5 GB limit.
3. The MinHash stage alone, same documents (a --minhash-mb sample), one core: lmforge's
   vectorized signatures + LSH against the straightforward datasketch loop
   (`MinHash(num_perm=128)`, `update()` per shingle, `MinHashLSH.insert`). Both must flag about
   the same documents; the ratio is printed.

Writes bench/results/data.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from _shared import lmforge_command

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

BOILERPLATE = [
    "Privacy Policy | Terms of Use | Cookie Policy",
    "This website uses cookies to improve your experience.",
    "Copyright 2024 Example Corp. All rights reserved.",
]


def _vocabulary(rng: np.random.Generator, n: int = 30_000) -> list[str]:
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    weights = np.array(
        [
            12,
            9,
            8,
            7.5,
            7,
            6.7,
            6.3,
            6,
            5.9,
            4.3,
            4,
            2.8,
            2.8,
            2.4,
            2.4,
            2.2,
            2,
            2,
            1.9,
            1.5,
            1,
            0.8,
            0.2,
            0.2,
            0.1,
            0.1,
        ]
    )
    weights = weights / weights.sum()
    lengths = np.clip(rng.poisson(4.5, n), 1, 14)
    return ["".join(rng.choice(letters, size=k, p=weights)) for k in lengths]


class CorpusWriter:
    """Seeded generator of realistic-looking documents."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.vocab = np.array(_vocabulary(self.rng))
        ranks = np.arange(1, len(self.vocab) + 1)
        self.p = (1 / ranks**1.1) / (1 / ranks**1.1).sum()
        # Chinese: 20k "words" of 1-4 characters over 4000 Zipf-distributed characters, themselves
        # drawn with Zipf frequencies, like real text (the common characters and words repeat).
        chars = np.array([chr(c) for c in range(0x4E00, 0x4E00 + 4000)])
        char_p = 1 / np.arange(1, 4001)
        char_p /= char_p.sum()
        sizes = self.rng.choice([1, 2, 3, 4], size=20_000, p=[0.3, 0.55, 0.1, 0.05])
        self.cjk = np.array(["".join(self.rng.choice(chars, size=k, p=char_p)) for k in sizes])
        self.kept: list[str] = []  # recent documents, to plant duplicates of

    def prose(self, n_words: int) -> str:
        words = self.rng.choice(self.vocab, size=n_words, p=self.p)
        out, i = [], 0
        while i < n_words:
            k = int(self.rng.integers(6, 22))
            sentence = " ".join(words[i : i + k])
            out.append(sentence[:1].upper() + sentence[1:] + ".")
            i += k
        paragraphs, j = [], 0
        while j < len(out):
            k = int(self.rng.integers(3, 8))
            paragraphs.append(" ".join(out[j : j + k]))
            j += k
        return "\n\n".join(paragraphs)

    def chinese(self, n_chars: int) -> str:
        words = self.rng.choice(
            self.cjk, size=n_chars // 2, p=self.p[: len(self.cjk)] / self.p[: len(self.cjk)].sum()
        )
        parts, i = [], 0
        while i < len(words):
            k = int(self.rng.integers(4, 15))
            parts.append("".join(words[i : i + k]) + self.rng.choice(["，", "。", "。", "；"]))
            i += k
        return "".join(parts)

    def pii(self) -> str:
        r = self.rng.integers(0, 4)
        n = int(self.rng.integers(1000, 9999))
        return [
            f"Contact me at user{n}@example.com for details.",
            f"Call +1-415-555-{n:04d} after 5pm.",
            f"The server is at 10.{n % 256}.{n // 40 % 256}.7 today.",
            f"请联系138{n:04d}{n:04d}。",
        ][r]

    def document(self) -> str:
        u = self.rng.random()
        if u < 0.04 and self.kept:  # exact duplicate
            return self.kept[int(self.rng.integers(len(self.kept)))]
        if u < 0.08 and self.kept:  # near duplicate: a few words changed
            words = self.kept[int(self.rng.integers(len(self.kept)))].split(" ")
            for i in self.rng.integers(0, len(words), max(1, len(words) // 50)):
                words[i] = str(self.rng.choice(self.vocab))
            return " ".join(words)
        if u < 0.10:  # spam: one line repeated
            line = self.prose(12).split("\n")[0]
            return "\n".join([line] * int(self.rng.integers(10, 40)))
        if u < 0.20:
            doc = self.chinese(int(self.rng.integers(200, 2000)))
        else:
            doc = self.prose(int(self.rng.lognormal(5.6, 0.8)) + 20)
        if self.rng.random() < 0.1:
            doc += "\n\n" + self.pii()
        if self.rng.random() < 0.1:
            doc += "\n" + BOILERPLATE[int(self.rng.integers(len(BOILERPLATE)))]
        if len(self.kept) < 2000:
            self.kept.append(doc)
        else:
            self.kept[int(self.rng.integers(2000))] = doc
        return doc


def make_corpus(mb: float, seed: int = 0, where: Path = RESULTS) -> tuple[Path, int]:
    """Generate (once) a corpus of MB megabytes of text; return its folder and text bytes."""
    import zstandard

    folder = where / f"corpus-v2-{mb:g}mb-seed{seed}"
    done = folder / "DONE"
    if done.is_file():
        return folder, int(done.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    writer = CorpusWriter(seed)
    total, shard = 0, 0
    target = int(mb * 1_000_000)
    started = time.perf_counter()
    while total < target:
        lines, size = [], 0
        while size < 20_000_000 and total + size < target:
            text = writer.document()
            lines.append(json.dumps({"text": text}, ensure_ascii=False))
            size += len(text.encode("utf-8"))
        data = ("\n".join(lines) + "\n").encode("utf-8")
        (folder / f"part-{shard:03d}.jsonl.zst").write_bytes(
            zstandard.ZstdCompressor(level=3).compress(data)
        )
        total += size
        shard += 1
        print(
            f"  corpus: {total / 1e6:.0f} / {mb} MB ({time.perf_counter() - started:.0f} s)",
            file=sys.stderr,
        )
    done.write_text(str(total))
    return folder, total


def tree_rss(pid: int) -> int:
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total


def run_prepare(corpus: Path, text_bytes: int, workers: int, vocab_size: int = 8192) -> dict:
    home = Path(tempfile.mkdtemp(prefix="lmforge-bench-"))
    cmd = [
        *lmforge_command(),
        "data",
        "prepare",
        str(corpus),
        "--name",
        "bench",
        "--tokenizer",
        "bpe",
        "--vocab-size",
        str(vocab_size),
        "--dedup",
        "minhash",
        "--pii",
        "scrub",
        "--workers",
        str(workers),
        "--quiet",
    ]
    env = {**os.environ, "LMFORGE_HOME": str(home)}
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, tree_rss(proc.pid))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    seconds = time.perf_counter() - started
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"prepare failed ({proc.returncode}): {stderr.strip()[-2000:]}")
    manifest = json.loads((home / "datasets" / "bench" / "manifest.json").read_text())
    shutil.rmtree(home)
    return {
        "seconds": seconds,
        "mb_per_s": text_bytes / 1e6 / seconds,
        "peak_rss_mb": peak / 2**20,
        "workers": workers,
        "funnel": manifest["funnel"],
        "removed": manifest["removed"],
        "pii": manifest["pii"]["found"],
        "tokens": sum(s["tokens"] for s in manifest["splits"].values()),
        "stage_seconds": manifest["timing"]["stages"],
        "stdout": stdout.strip(),
    }


def sample_documents(corpus: Path, mb: float) -> list[str]:
    import zstandard

    docs, size = [], 0
    for part in sorted(corpus.glob("*.jsonl.zst")):
        data = zstandard.ZstdDecompressor().decompress(part.read_bytes(), max_output_size=1 << 31)
        for line in data.decode("utf-8").splitlines():
            text = json.loads(line)["text"]
            docs.append(text)
            size += len(text.encode("utf-8"))
            if size >= mb * 1e6:
                return docs
    return docs


def minhash_stage(docs: list[str]) -> dict:
    from datasketch import MinHash, MinHashLSH

    from lmforge.data import dedup

    params = dedup.MinHashParams()
    text_mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6

    started = time.perf_counter()
    index = dedup.NearDuplicateIndex(params)
    ours = sum(index.add(i, dedup.minhash_signature(d, params)) for i, d in enumerate(docs))
    ours_s = time.perf_counter() - started

    started = time.perf_counter()
    lsh = MinHashLSH(threshold=params.threshold, num_perm=params.num_perm)
    naive = 0
    for i, d in enumerate(docs):
        m = MinHash(num_perm=params.num_perm)
        for shingle in dedup.shingles(d, params.ngram):
            m.update(" ".join(shingle).encode("utf-8"))
        if lsh.query(m):
            naive += 1
        else:
            lsh.insert(i, m)
    naive_s = time.perf_counter() - started
    return {
        "documents": len(docs),
        "mb": text_mb,
        "lmforge_s": ours_s,
        "datasketch_s": naive_s,
        "lmforge_mb_per_s": text_mb / ours_s,
        "datasketch_mb_per_s": text_mb / naive_s,
        "speedup": naive_s / ours_s,
        "lmforge_near_duplicates": ours,
        "datasketch_near_duplicates": naive,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mb", type=float, default=200, help="corpus size in MB of text")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--minhash-mb", type=float, default=20.0, help="sample for the MinHash comparison"
    )
    parser.add_argument("--skip-prepare", action="store_true")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="seconds, for make test: a 0.3 MB corpus in a temp folder, vocabulary 512, "
        "a 0.1 MB MinHash sample; writes no results",
    )
    args = parser.parse_args()
    vocab_size = 8192
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        if args.smoke:
            args.mb, args.minhash_mb, vocab_size, where = 0.3, 0.1, 512, Path(tmp)
        else:
            RESULTS.mkdir(parents=True, exist_ok=True)
            where = RESULTS
        result = measure(args, vocab_size, where, save=not args.smoke)
    report(result)


def measure(args: argparse.Namespace, vocab_size: int, where: Path, *, save: bool) -> dict:
    corpus, text_bytes = make_corpus(args.mb, where=where)
    result: dict = {"corpus_mb": text_bytes / 1e6, "cores": os.cpu_count()}
    if not args.skip_prepare:
        print(f"prepare: {text_bytes / 1e6:.1f} MB, {args.workers} workers …", file=sys.stderr)
        result["prepare"] = run_prepare(corpus, text_bytes, args.workers, vocab_size)
        if save:
            (RESULTS / "data.json").write_text(json.dumps(result, indent=2))
    print(f"minhash: {args.minhash_mb:.1f} MB sample …", file=sys.stderr)
    result["minhash"] = minhash_stage(sample_documents(corpus, args.minhash_mb))
    if save:
        (RESULTS / "data.json").write_text(json.dumps(result, indent=2))
    return result


def report(result: dict) -> None:
    print(f"\ncorpus: {result['corpus_mb']:.1f} MB of text (jsonl.zst), {os.cpu_count()} cores")
    if "prepare" in result:
        p = result["prepare"]
        verdict = "OK" if p["peak_rss_mb"] < 1536 else "OVER"
        print(
            f"prepare (clean + PII + MinHash + BPE train + tokenize, {p['workers']} workers): "
            f"{p['seconds']:.1f} s, {p['mb_per_s']:.2f} MB/s, peak RSS {p['peak_rss_mb']:.0f} MB "
            f"(limit 1536 MB: {verdict}), {p['tokens']:,} tokens"
        )
        stages = ", ".join(f"{k} {v:.1f} s" for k, v in p["stage_seconds"].items())
        print(f"  stages: {stages}")
        kept = p["funnel"][-1]["documents"]
        print(
            f"  documents: {p['funnel'][0]['documents']:,} read → {kept:,} kept; "
            f"removed {p['removed']}"
        )
    m = result["minhash"]
    print(
        f"MinHash stage, {m['documents']:,} docs / {m['mb']:.0f} MB, 1 core: lmforge "
        f"{m['lmforge_mb_per_s']:.2f} MB/s vs datasketch loop {m['datasketch_mb_per_s']:.2f} MB/s "
        f"→ {m['speedup']:.1f}× (near duplicates found: {m['lmforge_near_duplicates']:,} vs "
        f"{m['datasketch_near_duplicates']:,})"
    )


if __name__ == "__main__":
    main()
