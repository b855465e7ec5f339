"""lm-evaluation-harness against `lmforge serve`: loglikelihood accuracy equals in-process scoring.

    .venv/bin/pip install 'lm-eval[api]'          # once, for this bench only (tested: 0.4.13)
    .venv/bin/python bench/lm_eval_server.py      # 100 SST-2 items, about a minute on 2 cores
    .venv/bin/python bench/lm_eval_server.py --items 20 --tokenizer-backend huggingface

The task is built from local data, so no hub access is needed: the first --items phrases of
`../shared/data/sst2/dev.tsv` (GLUE SST-2, `sentence<TAB>label`) with at least --min-words
words, written as JSON lines next to a task YAML in a temporary directory (`dataset_path: json`
with `data_files`): `output_type: multiple_choice`, prompt "Review: {sentence}\\nSentiment:",
choices "negative" / "positive" after lm-eval's default `target_delimiter` " ", metrics `acc`
and `acc_norm`.

Part 1, the server: `lmforge serve MODEL --port P` runs as a subprocess on a free port; once
`/ready` answers 200, `lm_eval.simple_evaluate(model="local-completions", ...)` scores the task
with `log_samples=True`. lm-eval tokenizes each (context, continuation) pair itself
(`TemplateLM._encode_pair`: trailing spaces of the context move to the continuation, the pair
is encoded whole and the context alone, the continuation is the whole's tokens after the
context's) and sends the token ids to `/v1/completions` with `echo: true, max_tokens: 1,
logprobs: 1, temperature: 0`; the continuation's loglikelihood is the sum of the echoed prompt
`token_logprobs[ctxlen:-1]`. model_args: `base_url=http://127.0.0.1:P/v1/completions`,
`model=<served name>`, `tokenizer_backend=remote` (the default here: lm-eval's RemoteTokenizer,
which uses the server's `/tokenizer_info`, `/tokenize` and `/detokenize`; fully offline) or
`huggingface` with `tokenizer=<the built-in model's HF-layout directory under
$LMFORGE_HOME/builtin/>` (transformers' tokenizer, also offline), `tokenized_requests=True`,
`batch_size` --batch-size prompts per request and `num_concurrent` --concurrent requests in
flight (so up to batch × concurrent sequences share the continuous-batching engine), and
`max_retries=1` so that a failed request fails the run instead of being retried quietly.

Part 2, in-process: after the server stops, `lmforge.load(MODEL)` scores the same pairs
directly: the same `_encode_pair` logic with `llm.tokenizer.encode(text,
add_special_tokens=False)`, one `llm.logits(ids)` forward pass per pair, the sum over the
continuation tokens of `log_softmax(logits[t - 1])[ids[t]]`; argmax over the choices → acc,
argmax of loglikelihood / len(choice) (characters, as lm-eval) → acc_norm.

Printed: both accuracies (lm-eval's reported metrics and in-process), per-item agreement
(items where both pick the same choice, plain and normalized), agreement of lm-eval's
`is_greedy` with the in-process greedy check, the max absolute difference of the per-choice
loglikelihoods, and the time of each part. Exits 1 when acc or acc_norm differ or any
loglikelihood differs by more than --tolerance (1e-3); 2 when the data is missing.

Measured (lm-eval 0.4.13, 2 shared CPU cores, defaults: 100 items, remote tokenizer, batch 4 ×
4 concurrent): acc 0.80 and acc_norm 0.80 both ways, 100/100 items pick the same choice,
200/200 is_greedy agree, max |Δ loglikelihood| 2.4e-06; server start 3.5 s, lm-eval 32 s,
in-process 24 s, 60 s in all. The huggingface tokenizer backend gives the same scores.
(`lm-eval[api]`: plain `lm-eval` lacks `tenacity`, which local-completions needs.)

`--smoke` (for make test) serves a tiny random Llama (byte-level tokenizer, saved to a temporary
directory; --model, if given, instead), sends four generated items' pairs the way lm-eval does
without lm-eval, and checks the echoed loglikelihoods against in-process scoring.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from _shared import create_key, free_port, lmforge_command, smoke_model

MODEL = "smollm2-135m-instruct"
TASK = "lmforge_sst2_local"
CHOICES = ["negative", "positive"]
TARGET_DELIMITER = " "
DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "sst2" / "dev.tsv"


def doc_to_text(sentence: str) -> str:
    return f"Review: {sentence}\nSentiment:"


# ---------------------------------------------------------------------------------------------
# The task


def load_items(path: Path, n: int, min_words: int) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as f:
        next(f)  # header: sentence<TAB>label
        for line in f:
            sentence, label = line.rstrip("\n").split("\t")
            sentence = sentence.strip()
            if len(sentence.split()) < min_words:
                continue
            items.append({"sentence": sentence, "label": int(label)})
            if len(items) == n:
                break
    return items


def write_task(folder: Path, items: list[dict[str, Any]]) -> None:
    import yaml

    data = folder / f"{TASK}.jsonl"
    with data.open("w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item) + "\n")
    config = {
        "task": TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "Review: {{sentence}}\nSentiment:",
        "doc_to_target": "label",
        "doc_to_choice": CHOICES,
        "target_delimiter": TARGET_DELIMITER,
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0},
    }
    (folder / f"{TASK}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


# ---------------------------------------------------------------------------------------------
# The server


def wait_ready(base: str, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> str:
    """Wait for /ready to answer 200; return the served model's id from /v1/models."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"error: the server exited ({proc.returncode}):\n{log.read_text()}")
        if time.monotonic() > deadline:
            raise SystemExit(f"error: the server was not ready in {timeout:.0f} s")
        try:
            with urllib.request.urlopen(f"{base}/ready", timeout=5) as r:
                if r.status == 200:
                    models = urllib.request.Request(
                        f"{base}/v1/models",
                        headers={"Authorization": f"Bearer {os.environ['OPENAI_API_KEY']}"},
                    )
                    with urllib.request.urlopen(models, timeout=5) as m:
                        return str(json.load(m)["data"][0]["id"])
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_lm_eval(args: argparse.Namespace, folder: Path, base: str, model: str) -> dict[str, Any]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    model_args: dict[str, Any] = {
        "model": model,
        "base_url": f"{base}/v1/completions",
        "tokenizer_backend": args.tokenizer_backend,
        "tokenized_requests": True,
        "num_concurrent": args.concurrent,
        "max_retries": 1,
        "max_length": args.max_length,
    }
    if args.tokenizer_backend == "huggingface":
        model_args["tokenizer"] = str(args.hf_tokenizer)
    print(f"lm-eval {getattr(lm_eval, '__version__', '?')}")
    print(f"model_args: {model_args}, batch_size={args.batch_size}")
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    out = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=model_args,
        tasks=[TASK],
        batch_size=args.batch_size,
        task_manager=manager,
        log_samples=True,
        bootstrap_iters=0,
        verbosity="WARNING",
    )
    if out is None:
        raise SystemExit("error: lm_eval.simple_evaluate returned nothing")
    return dict(out)


# ---------------------------------------------------------------------------------------------
# In-process scoring


def encode_pair(tok: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's `TemplateLM._encode_pair` for a causal model."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tok.encode(context + continuation, add_special_tokens=False)
    context_enc = tok.encode(context, add_special_tokens=False)
    return context_enc, whole[len(context_enc) :]


def score_in_process(
    args: argparse.Namespace, items: list[dict[str, Any]]
) -> list[list[tuple[float, bool]]]:
    import torch

    import lmforge

    llm = lmforge.load(args.model, threads=args.threads)
    scores: list[list[tuple[float, bool]]] = []
    with torch.inference_mode():
        for item in items:
            context = doc_to_text(item["sentence"])
            row = []
            for choice in CHOICES:
                ctx, cont = encode_pair(llm.tokenizer, context, TARGET_DELIMITER + choice)
                ids = ctx + cont
                logprobs = torch.log_softmax(llm.logits(ids).float(), dim=-1)
                positions = range(len(ctx), len(ids))
                ll = sum(float(logprobs[t - 1, ids[t]]) for t in positions)
                greedy = all(int(logprobs[t - 1].argmax()) == ids[t] for t in positions)
                row.append((ll, greedy))
            scores.append(row)
    return scores


def score_via_server(
    base: str, model: str, spec: str, items: list[dict[str, Any]]
) -> list[list[float]]:
    """What lm-eval's local-completions sends, without lm-eval (--smoke): the pair's token ids
    (SPEC's tokenizer, SPEC as given to `lmforge serve`) to /v1/completions for the served
    MODEL with echo, logprobs 1, max_tokens 1; the continuation's loglikelihood is the sum of
    its echoed `token_logprobs`."""
    import httpx

    from lmforge.resolve import resolve
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.load(resolve(spec).path)
    auth = {"Authorization": f"Bearer {os.environ['OPENAI_API_KEY']}"}
    scores = []
    with httpx.Client(base_url=base, headers=auth, timeout=300) as http:
        for item in items:
            row = []
            for choice in CHOICES:
                ctx, cont = encode_pair(
                    tok, doc_to_text(item["sentence"]), TARGET_DELIMITER + choice
                )
                body = {"model": model, "prompt": ctx + cont, "echo": True, "max_tokens": 1}
                body |= {"logprobs": 1, "temperature": 0}
                r = http.post("/v1/completions", json=body)
                r.raise_for_status()
                logprobs = r.json()["choices"][0]["logprobs"]["token_logprobs"]
                row.append(sum(logprobs[len(ctx) : len(ctx) + len(cont)]))
            scores.append(row)
    return scores


def smoke(args: argparse.Namespace) -> int:
    """The server's loglikelihoods against in-process scoring on four generated items, the
    way lm-eval asks for them; lm-eval itself (the anchor) is skipped."""
    print("--smoke: 4 generated items; lm-eval is skipped (its requests are sent directly)")
    with tempfile.TemporaryDirectory(prefix="lmforge-lm-eval-") as tmp:
        if args.model == MODEL:
            args.model = str(smoke_model(Path(tmp)))
            print("model: a tiny random Llama")
        return smoke_run(args, Path(tmp))


def smoke_run(args: argparse.Namespace, folder: Path) -> int:
    items = [
        {"sentence": "a warm , funny and moving film", "label": 1},
        {"sentence": "a dull , lifeless and tedious mess", "label": 0},
        {"sentence": "wonderful acting from start to end", "label": 1},
        {"sentence": "the worst script of the year", "label": 0},
    ]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    os.environ["OPENAI_API_KEY"] = create_key("bench-lm-eval")
    log = folder / "server.log"
    cmd = [*lmforge_command(), "serve", args.model, "--port", str(port)]
    cmd += ["--threads", str(args.threads), *args.serve_args.split()]
    with log.open("wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    try:
        served = wait_ready(base, proc, log, args.ready_timeout)
        theirs = score_via_server(base, served, args.model, items)
    finally:
        stop(proc)
    mine = score_in_process(args, items)
    diff = max(abs(t - m[0]) for tr, mr in zip(theirs, mine, strict=True)
               for t, m in zip(tr, mr, strict=True))  # fmt: skip
    picks = [argmax([ll for ll, _ in m]) for m in mine]
    acc = sum(pick == it["label"] for pick, it in zip(picks, items, strict=True)) / 4
    same = sum(argmax(t) == pick for t, pick in zip(theirs, picks, strict=True))
    print(f"acc (in-process): {acc:.2f}; agreement: {same}/4 items pick the same choice")
    print(f"max |Δ loglikelihood| server vs in-process: {diff:.3g}")
    ok = diff <= args.tolerance and same == 4
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


def argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


# ---------------------------------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=MODEL, help="model to serve and load (default: built-in)")
    p.add_argument("--data", type=Path, default=DATA, help="SST-2 dev.tsv")
    p.add_argument("--items", type=int, default=100, help="items in the task")
    p.add_argument("--min-words", type=int, default=6, help="skip shorter SST-2 phrases")
    p.add_argument("--tokenizer-backend", choices=["remote", "huggingface"], default="remote")
    p.add_argument(
        "--hf-tokenizer",
        type=Path,
        default=None,
        help="HF tokenizer directory (huggingface backend; default: the built-in model's)",
    )
    p.add_argument("--batch-size", type=int, default=4, help="lm-eval prompts per request")
    p.add_argument("--concurrent", type=int, default=4, help="lm-eval requests in flight")
    p.add_argument("--max-length", type=int, default=2048, help="lm-eval max_length")
    p.add_argument("--threads", type=int, default=2, help="torch threads (server, in-process)")
    p.add_argument("--ready-timeout", type=float, default=300.0)
    p.add_argument("--tolerance", type=float, default=1e-3, help="max loglikelihood difference")
    p.add_argument("--serve-args", default="", help="more `lmforge serve` options")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (task, server log)")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="seconds, for make test: a tiny random Llama (unless --model is given), four "
        "generated items, the server's echoed loglikelihoods (as lm-eval requests them) against "
        "in-process scoring; lm-eval itself is skipped",
    )
    args = p.parse_args()
    if args.smoke:
        return smoke(args)

    data = args.data.resolve()
    if not data.exists():
        print(f"error: {data} not found: this bench needs ../shared/data/sst2 (see its README)")
        return 2
    items = load_items(data, args.items, args.min_words)
    labels = [it["label"] for it in items]
    print(f"task: {len(items)} SST-2 items from {data} ({labels.count(1)} positive)")

    folder = Path(tempfile.mkdtemp(prefix="lmforge-lm-eval-"))
    # Offline: datasets' packaged `json` builder needs no hub; keep its cache in the temp dir.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ["HF_DATASETS_CACHE"] = str(folder / "hf-datasets")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.tokenizer_backend == "huggingface" and args.hf_tokenizer is None:
        from lmforge.home import lmforge_home

        args.hf_tokenizer = lmforge_home() / "builtin" / args.model
    try:
        write_task(folder, items)
        t_start = time.perf_counter()

        port = free_port()
        base = f"http://127.0.0.1:{port}"
        os.environ["OPENAI_API_KEY"] = create_key("bench-lm-eval")  # lm-eval's local-completions
        log = folder / "server.log"
        cmd = [*lmforge_command(), "serve", args.model, "--port", str(port)]
        cmd += ["--threads", str(args.threads), *args.serve_args.split()]
        print("server:", " ".join(cmd))
        with log.open("wb") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        try:
            served = wait_ready(base, proc, log, args.ready_timeout)
            startup_s = time.perf_counter() - t_start
            t0 = time.perf_counter()
            out = run_lm_eval(args, folder, base, served)
            lm_eval_s = time.perf_counter() - t0
        finally:
            stop(proc)

        t0 = time.perf_counter()
        mine = score_in_process(args, items)
        in_process_s = time.perf_counter() - t0
        total_s = time.perf_counter() - t_start

        metrics = out["results"][TASK]
        samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
        if len(samples) != len(items):
            print(f"error: lm-eval logged {len(samples)} samples for {len(items)} items")
            return 1

        max_diff, worst = -1.0, (-1, "")
        same, same_norm, same_greedy, bad_args = 0, 0, 0, 0
        acc = acc_norm = 0.0
        for s in samples:
            i = s["doc_id"]
            expected = [[doc_to_text(items[i]["sentence"]), TARGET_DELIMITER + c] for c in CHOICES]
            if [list(a[:2]) for a in s["arguments"]] != expected:
                bad_args += 1
            theirs = [(float(r[0]), bool(r[1])) for r in s["filtered_resps"]]
            ours = mine[i]
            for c, ((lt, gt), (lo, go)) in enumerate(zip(theirs, ours, strict=True)):
                if abs(lt - lo) > max_diff:
                    max_diff, worst = abs(lt - lo), (i, CHOICES[c])
                same_greedy += gt == go
            lt_ = [x for x, _ in theirs]
            lo_ = [x for x, _ in ours]
            norm = [float(len(c)) for c in CHOICES]
            same += argmax(lt_) == argmax(lo_)
            same_norm += argmax([a / b for a, b in zip(lt_, norm, strict=True)]) == argmax(
                [a / b for a, b in zip(lo_, norm, strict=True)]
            )
            acc += argmax(lo_) == items[i]["label"]
            acc_norm += argmax([a / b for a, b in zip(lo_, norm, strict=True)]) == items[i]["label"]
        n = len(items)
        acc, acc_norm = acc / n, acc_norm / n
        their_acc, their_norm = float(metrics["acc,none"]), float(metrics["acc_norm,none"])

        print()
        print(f"{'':12}{'lm-eval (server)':>18}{'in-process':>12}")
        print(f"{'acc':12}{their_acc:>18.4f}{acc:>12.4f}")
        print(f"{'acc_norm':12}{their_norm:>18.4f}{acc_norm:>12.4f}")
        print(f"agreement:  {same}/{n} items pick the same choice ({same_norm}/{n} normalized)")
        print(f"is_greedy:  {same_greedy}/{2 * n} loglikelihoods agree")
        first = samples[0]
        print(
            f"item 0 loglikelihoods {CHOICES}: lm-eval "
            f"{[round(float(r[0]), 6) for r in first['filtered_resps']]}, "
            f"in-process {[round(ll, 6) for ll, _ in mine[0]]}"
        )
        print(f"max |Δ loglikelihood|: {max_diff:.3g} (item {worst[0]}, {worst[1]!r})")
        if bad_args:
            print(f"warning: {bad_args} items had other (context, continuation) pairs than ours")
        print(
            f"time: server start {startup_s:.1f} s, lm-eval {lm_eval_s:.1f} s "
            f"({2 * n / lm_eval_s:.1f} pairs/s), in-process {in_process_s:.1f} s, "
            f"total {total_s:.1f} s"
        )
        ok = their_acc == acc and their_norm == acc_norm and max_diff <= args.tolerance
        ok = ok and not bad_args
        print("OK" if ok else "MISMATCH")
        return 0 if ok else 1
    finally:
        if args.keep:
            print(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
