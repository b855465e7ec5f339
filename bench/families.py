"""The second built-in family, Gemma 3 (`gemma3-270m`), in lmforge next to llama.cpp on one GGUF.

    .venv/bin/python bench/families.py --llama-bin DIR     # DIR holds llama-perplexity, llama-bench
    make bench-families LLAMA_BIN=DIR                      # (../shared/bench/build-llama-cpp.sh)
    .venv/bin/python bench/families.py --chunks 8 --repeats 3 --llama-bin DIR   # a quicker look

Both sides read the same file: the Gemma 3 270M Q4_K_M GGUF that `gemma3-270m` is assembled from
(lmforge dequantizes it to fp32 once; llama.cpp runs the Q4_K_M blocks). In one run, 2 threads
each (--threads):

- perplexity on the last 10% of ../shared/data/tinyshakespeare, computed the way
  `llama-perplexity -c 512` does, on both sides: the text tokenized with BOS (lmforge's ids
  equal llama.cpp's for this file, tests/tokenizer), cut into 512-token chunks whose first token
  is replaced by BOS, and each chunk scoring its second half (tokens 257…512 from their
  prefix). Target (issue 22): lmforge within 1% of llama.cpp;
- batch-1 prefill of a 512-token prompt and decode of 128 tokens, tokens/s: llama.cpp's
  `llama-bench -p 512 -n 128 -r R` (its R samples), lmforge's prefill to the first logits and
  `LLM.complete` decode (greedy, EOS ignored), R times; the median and the range of the R.

Prints a table with the ratios and writes bench/results/families.json. `--smoke` (for make test)
runs the lmforge side only, on a tiny random Gemma 3 and a generated text.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"
RESULTS = Path(__file__).resolve().parent / "results"
LLAMA_BIN = Path("/root/.cache/llama-cpp-bench/0.3.36/src/vendor/llama.cpp/build/bin")
PROMPT = "The capital of France is"


def held_out_text(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    return text[int(len(text) * 0.9) :]


def chunked_perplexity(model: Any, ids: list[int], bos: int, n_ctx: int, chunks: int) -> dict:
    """llama-perplexity's estimate: chunk i is ids[i·n_ctx : (i+1)·n_ctx] with its first token
    replaced by BOS; positions n_ctx/2 … n_ctx−2 score the token after them."""
    import torch
    import torch.nn.functional as F

    n_chunk = min(len(ids) // n_ctx, chunks) if chunks else len(ids) // n_ctx
    first = n_ctx // 2
    nll, count = 0.0, 0
    with torch.inference_mode():
        for i in range(n_chunk):
            window = ids[i * n_ctx : (i + 1) * n_ctx]
            window[0] = bos
            hidden = model.hidden_states(torch.tensor([window]))[0, first : n_ctx - 1]
            logits = model.logits(hidden).float()
            targets = torch.tensor(window[first + 1 :])
            nll += float(F.cross_entropy(logits, targets, reduction="sum"))
            count += len(targets)
    return {"perplexity": math.exp(nll / count), "chunks": n_chunk, "scored_tokens": count}


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def lmforge_side(llm: Any, ids: list[int], args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from lmforge.model.kv_cache import KVCache
    from lmforge.model.transformer import prefill

    torch.set_num_threads(args.threads)
    model = llm.model
    ppl = chunked_perplexity(model, list(ids), llm.tokenizer.bos_id, args.ctx, args.chunks)
    prompt = torch.tensor([ids[1 : args.prompt_tokens + 1]])
    rates = []
    for rep in range(args.repeats + 1):  # the first is a warm-up
        cache = KVCache.allocate(model.config, 1, args.prompt_tokens, dtype=torch.float32)
        t = time.perf_counter()
        prefill(model, prompt, cache)
        if rep:
            rates.append(args.prompt_tokens / (time.perf_counter() - t))
    short = llm.tokenizer.encode(PROMPT)
    llm.complete(short, max_tokens=8, ignore_eos=True)  # warm-up
    decode = []
    for _ in range(args.repeats):
        done = llm.complete(short, max_tokens=args.decode_tokens, ignore_eos=True, temperature=0)
        decode.append(done.decode_tokens_per_s)
    return {**ppl, "prefill_tokens_per_s": summary(rates), "decode_tokens_per_s": summary(decode)}


def llama_side(gguf: Path, text: Path, args: argparse.Namespace) -> dict[str, Any]:
    env = {**os.environ, "LD_LIBRARY_PATH": str(args.llama_bin)}
    cmd = [str(args.llama_bin / "llama-perplexity"), "-m", str(gguf), "-f", str(text)]
    cmd += ["-c", str(args.ctx), "-b", str(args.ctx), "-t", str(args.threads)]
    if args.chunks:
        cmd += ["--chunks", str(args.chunks)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    final = [line for line in out.stderr.splitlines() + out.stdout.splitlines() if "PPL =" in line]
    if out.returncode or not final:
        sys.exit(f"llama-perplexity failed:\n{out.stderr[-3000:]}")
    ppl = float(final[-1].split("PPL =")[1].split()[0])
    bench = [str(args.llama_bin / "llama-bench"), "-m", str(gguf), "-t", str(args.threads)]
    bench += ["-p", str(args.prompt_tokens), "-n", str(args.decode_tokens)]
    bench += ["-r", str(args.repeats), "-o", "json"]
    run = subprocess.run(bench, capture_output=True, text=True, env=env, check=False)
    if run.returncode:
        sys.exit(f"llama-bench failed:\n{run.stderr[-3000:]}")
    rows = json.loads(run.stdout)
    prefill = next(r for r in rows if r["n_prompt"] and not r["n_gen"])
    decode = next(r for r in rows if r["n_gen"] and not r["n_prompt"])
    return {
        "perplexity": ppl,
        "prefill_tokens_per_s": summary([float(x) for x in prefill["samples_ts"]]),
        "decode_tokens_per_s": summary([float(x) for x in decode["samples_ts"]]),
        "build_commit": rows[0].get("build_commit"),
    }


def smoke_gemma3(work: Path) -> Any:
    """A tiny random Gemma 3 with the built-in's features, saved and loaded as a user would."""
    import torch

    import lmforge
    from lmforge.model.config import ModelConfig
    from lmforge.model.formats import save_model
    from lmforge.model.transformer import Transformer
    from lmforge.tokenizer.bpe import byte_tokenizer

    torch.manual_seed(0)
    config = ModelConfig(
        arch="gemma3", vocab_size=300, d_model=64, n_layer=6, n_head=4, n_kv_head=1,
        head_dim=16, max_seq_len=256, sliding_window=32,
    )  # fmt: skip
    save_model(Transformer(config), byte_tokenizer(), work / "tiny-gemma3")
    return lmforge.load(str(work / "tiny-gemma3"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--llama-bin", type=Path, default=Path(os.environ.get("LLAMA_BIN", LLAMA_BIN)))
    p.add_argument("--data", type=Path, default=DATA, help="tinyshakespeare input.txt")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ctx", type=int, default=512, help="perplexity chunk size (llama's -c)")
    p.add_argument("--chunks", type=int, default=0, help="at most this many chunks (0: all)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--out", type=Path, default=RESULTS / "families.json")
    p.add_argument("--smoke", action="store_true", help="lmforge only, a tiny random Gemma 3")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-families-") as tmp:
        work = Path(tmp)
        if args.smoke:
            args.ctx, args.chunks, args.repeats = 64, 2, 1
            args.prompt_tokens, args.decode_tokens = 32, 8
            llm = smoke_gemma3(work)
            text = " ".join(f"word{i % 97} and more" for i in range(400))
            ids = llm.tokenizer.encode(text)
            ours = lmforge_side(llm, ids, args)
            print(f"lmforge tiny gemma3: perplexity {ours['perplexity']:.2f} over "
                  f"{ours['chunks']} chunks; prefill "
                  f"{ours['prefill_tokens_per_s']['median']:.0f} tok/s")  # fmt: skip
            return
        import lmforge
        from lmforge.builtin import BUILTINS

        if not args.data.is_file():
            sys.exit(f"{args.data} is missing (see ../shared/data/README.md)")
        for tool in ("llama-perplexity", "llama-bench"):
            if not (args.llama_bin / tool).exists():
                sys.exit(
                    f"--llama-bin {args.llama_bin}: no {tool} (../shared/bench/build-llama-cpp.sh)"
                )
        llm = lmforge.load("gemma3-270m")
        gguf = BUILTINS["gemma3-270m"].gguf_path()
        assert gguf is not None
        text = work / "tail.txt"
        text.write_text(held_out_text(args.data), encoding="utf-8")
        ids = llm.tokenizer.encode(text.read_text(encoding="utf-8"))
        print("llama.cpp …", file=sys.stderr, flush=True)
        theirs = llama_side(gguf, text, args)
        print("lmforge …", file=sys.stderr, flush=True)
        ours = lmforge_side(llm, ids, args)
    report = {"args": {k: str(v) for k, v in vars(args).items()}, "lmforge": ours,
              "llama.cpp": theirs}  # fmt: skip
    print_report(report, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


def print_report(report: dict[str, Any], args: argparse.Namespace) -> None:
    ours, theirs = report["lmforge"], report["llama.cpp"]

    def rate(side: dict[str, Any], key: str) -> str:
        s = side[key]
        return f"{s['median']:8.1f} ({s['min']:.1f}–{s['max']:.1f})"

    print(
        f"\ngemma3-270m (Gemma 3 270M, Q4_K_M GGUF), {args.threads} threads, perplexity over "
        f"{ours['chunks']} chunks of {args.ctx} on tinyshakespeare's last 10%, "
        f"{args.repeats} repeats (median, range):\n"
    )
    print(f"{'':22s}{'perplexity':>12s}{'prefill tok/s':>26s}{'decode tok/s':>26s}")
    for label, side in (("lmforge (fp32)", ours), ("llama.cpp (Q4_K_M)", theirs)):
        prefill, decode = rate(side, "prefill_tokens_per_s"), rate(side, "decode_tokens_per_s")
        print(f"{label:22s}{side['perplexity']:12.4f}{prefill:>26s}{decode:>26s}")
    gap = ours["perplexity"] / theirs["perplexity"] - 1
    pre = ours["prefill_tokens_per_s"]["median"] / theirs["prefill_tokens_per_s"]["median"]
    dec = ours["decode_tokens_per_s"]["median"] / theirs["decode_tokens_per_s"]["median"]
    print(f"\nlmforge / llama.cpp: perplexity {gap:+.2%} (target within ±1%), prefill {pre:.2f}×, "
          f"decode {dec:.2f}×")  # fmt: skip


if __name__ == "__main__":
    main()
