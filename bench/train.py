"""Training speed and quality of lmforge vs nanoGPT on nanoGPT's published CPU configuration.

    .venv/bin/python bench/train.py                 # or: make bench-train (about 10 minutes)
    .venv/bin/python bench/train.py --steps 300 --large-steps 8 --variants eager   # a look

The anchor is nanoGPT itself (github.com/karpathy/nanoGPT; `--nanogpt PATH`, a checkout or a
git mirror of one), exported to a temporary folder, its `data/shakespeare_char/prepare.py` run
on ../shared/data/tinyshakespeare/input.txt (copied in, so nothing is downloaded), and its
`train.py` run unchanged as a subprocess with the README's CPU command:

    python train.py config/train_shakespeare_char.py --device=cpu --compile=False
        --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4
        --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0

that is: characters, the last 10% for validation, 4 layers, 4 heads, 128 dims, context 64,
batch 12, lr 1e-3 → 1e-4 cosine, warmup 100, beta2 0.99, weight decay 0.1, clip 1.0, fp32.
lmforge trains the same thing through its library: `lmforge.data.prepare` with the options of
`lmforge data prepare --tokenizer char --split tail --val-fraction 0.1` (the bench checks that
its token stream equals nanoGPT's), the `nanogpt-shakespeare-cpu` preset, and
`lmforge.train.loop.train` with the same schedule, evaluating 40 batches of 12×64 every 250
steps as nanoGPT does (it evaluates 20 train + 20 val batches). `--variants` runs it eager in
fp32 (the headline: the issue's configuration is fp32), with `compile=True` (torch.compile of
the model, fp32), and eager with `dtype="bf16"` (autocast; not the issue's configuration,
shown for what the same model does in bf16; by default only on a CPU with native bf16, AVX512_BF16
or AMX — elsewhere torch emulates it at ~1 GFLOP/s). The models differ in two details of nanoGPT's
defaults: lmforge's gpt2 family has biases and the tanh GELU (GPT-2's), nanoGPT has neither.

Measured, per side:

- iterations/s: 1 / the median wall time between consecutive iterations' ends, leaving out
  the iterations that evaluated (every 250th: nanoGPT's own "iter N: … time …ms" lines, whose
  time includes its evaluation; lmforge's `on_step` callbacks, same rule); tokens/s is
  iterations/s × 12 × 64;
- MFU: model FLOPs per iteration — nanoGPT's `estimate_mfu`, (6·N + 12·L·H·(C/H)·T) per token
  with N the parameters less the position embedding — × iterations/s, over this machine's
  fp32 matmul peak measured here (best of square matmuls 512…4096, same threads, before and
  after the runs; about 3 s per size, a sweep ending at the first size whose one product takes
  longer);
- wall time: of the training loop (evaluations included) and of the whole process;
- val loss: nanoGPT's "step 2000: … val loss" line (20 random batches) and lmforge's last
  evaluation (its first 40 batches of the split); and, for both, the loss over the whole
  validation split in consecutive 64-token windows (nanoGPT's from its last checkpoint, which
  it writes when the validation loss improves, evaluated with its own model code).

nanoGPT makes 2,001 optimizer steps (iterations 0…2000), lmforge 2,000.

Then a larger configuration, lmforge only (nanoGPT has no bf16 path on CPU): the `small` preset
(6 layers, 6 heads, d_model 384, context 256) at batch --large-batch with bf16 autocast (fp32
where the CPU has no native bf16) for --large-steps steps; MFU against the measured peak, from
the median step (the first two and the last, which writes a checkpoint, left out).

Everything runs with --threads threads (torch.set_num_threads and OMP_NUM_THREADS), each side
in its own process. The machines here are shared and noise only ever slows a run down, so
`--rounds` > 1 alternates the sides and reports each side's median round (never the fastest).

Prints a table with the ratios; writes bench/results/train.json. Targets (the issue): val loss
≤ 1.88 (nanoGPT's published figure), ≥ 1.5× nanoGPT's iterations/s, and ≥ 40% bf16 MFU for the
larger configuration.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
NANOGPT_MIRROR = Path("/work/.mirror/karpathy+nanoGPT/repo")

# nanoGPT README, "I only have a macbook" (the CPU command), plus where to write.
NANOGPT_ARGS = [
    "config/train_shakespeare_char.py",
    "--device=cpu",
    "--compile=False",
    "--eval_iters=20",
    "--log_interval=1",
    "--block_size=64",
    "--batch_size=12",
    "--n_layer=4",
    "--n_head=4",
    "--n_embd=128",
    "--max_iters={steps}",
    "--lr_decay_iters={steps}",
    "--dropout=0.0",
    "--out_dir=out",
]
BATCH, BLOCK, EVAL_EVERY = 12, 64, 250
PEAK_BUDGET_S = 3.0
VARIANTS = {"eager": "lmforge", "compile": "lmforge_compile", "bf16": "lmforge_bf16"}
ITER_RE = re.compile(r"^iter (\d+): loss ([\d.]+), time ([\d.]+)ms")
EVAL_RE = re.compile(r"^step (\d+): train loss ([\d.]+), val loss ([\d.]+)")
VOCAB_RE = re.compile(r"^found vocab_size = (\d+)")

# Run inside the nanoGPT folder: its model, its last checkpoint, the whole val.bin in
# consecutive windows (the windows lmforge's `eval_batches` walks).
NANOGPT_FULL_VAL = """
import json, sys
import numpy as np, torch
from model import GPT, GPTConfig
torch.set_num_threads(int(sys.argv[1]))
ck = torch.load("out/ckpt.pt", map_location="cpu", weights_only=True)
model = GPT(GPTConfig(**ck["model_args"]))
model.load_state_dict(ck["model"])
model.eval()
val = np.fromfile("data/shakespeare_char/val.bin", dtype=np.uint16)
data = torch.from_numpy(val.astype(np.int64))
T, B = ck["model_args"]["block_size"], 12
starts = list(range(0, len(data) - T, T))
total, count = 0.0, 0
with torch.no_grad():
    for i in range(0, len(starts), B):
        x = torch.stack([data[s : s + T] for s in starts[i : i + B]])
        y = torch.stack([data[s + 1 : s + 1 + T] for s in starts[i : i + B]])
        _, loss = model(x, y)
        total += loss.item() * y.numel()
        count += y.numel()
print(json.dumps({"val_loss_full": total / count, "checkpoint_iter": int(ck["iter_num"])}))
"""


# ---------------------------------------------------------------------------------------------
# Workers (each in its own process)


def worker_peak(args: argparse.Namespace) -> dict[str, Any]:
    """Best matmul GFLOP/s over square sizes, fp32 and bf16, about PEAK_BUDGET_S per size.

    A size whose single product takes longer than the budget ends that dtype's sweep: on a CPU
    without native bf16 (no AVX512_BF16/AMX) a 4096² bf16 product takes minutes.
    """
    import torch

    torch.set_num_threads(args.threads)
    peaks: dict[str, Any] = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        best, by_size = 0.0, {}
        for n in (64, 128) if args.smoke else (512, 1024, 2048, 4096):
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            out = torch.empty(n, n, dtype=dtype)
            first = _timed(lambda a=a, b=b, out=out: torch.mm(a, b, out=out))  # warm-up
            if first > PEAK_BUDGET_S:  # too slow to repeat: its one product, then stop
                by_size[n] = 2 * n**3 / first / 1e9
                best = max(best, by_size[n])
                break
            reps = 3 if args.smoke else max(3, min(200, int(PEAK_BUDGET_S / max(first, 1e-6))))
            fastest = min(
                _timed(lambda a=a, b=b, out=out: torch.mm(a, b, out=out)) for _ in range(reps)
            )
            by_size[n] = 2 * n**3 / fastest / 1e9
            best = max(best, by_size[n])
        peaks[name] = {"gflops": best, "by_size": by_size}
    return peaks


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512_BF16 or AMX); Linux flags only."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _timed(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def model_flops_per_token(model: Any, block: int) -> tuple[int, float]:
    """(N, FLOPs per token) by nanoGPT's `estimate_mfu`: 6·N + 12·L·H·(C/H)·T."""
    cfg = model.config
    seen: set[int] = set()
    n = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    pos = getattr(model.model, "embed_positions", None)
    if pos is not None:
        n -= pos.weight.numel()
    return n, 6 * n + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * block


def worker_lmforge(args: argparse.Namespace) -> dict[str, Any]:
    import dataclasses

    import torch

    from lmforge.data.loader import TokenSplit
    from lmforge.model.presets import model_config
    from lmforge.model.transformer import Transformer
    from lmforge.train.loop import LoopConfig, evaluate, train
    from lmforge.train.tasks import TokenWindows

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    train_split = TokenSplit.open(args.dataset, "train")
    val_split = TokenSplit.open(args.dataset, "val")
    torch.manual_seed(1337)
    model = Transformer(model_config("nanogpt-shakespeare-cpu", train_split.vocab_size))
    options: dict[str, Any] = {}
    if args.compile:
        if "compile" not in {f.name for f in dataclasses.fields(LoopConfig)}:
            return {"skipped": "LoopConfig has no compile field"}
        options["compile"] = True
    config = LoopConfig(
        max_steps=args.steps,
        batch_size=BATCH,
        block_size=BLOCK,
        lr=1e-3,
        min_lr=1e-4,
        warmup=100,
        weight_decay=0.1,
        beta1=0.9,
        beta2=0.99,
        grad_clip=1.0,
        eval_every=min(EVAL_EVERY, args.steps),
        eval_batches=40,  # nanoGPT: 20 train + 20 val batches per evaluation
        ckpt_every=min(EVAL_EVERY, args.steps),
        dtype=args.small_dtype,
        **options,
    )
    ends: list[float] = []
    evaluated: list[bool] = []

    def on_step(record: dict[str, Any]) -> None:
        ends.append(time.perf_counter())
        evaluated.append("val_loss" in record)

    t = time.perf_counter()
    data = TokenWindows(train_split, val_split)
    result = train(model, data, config, Path(args.run_dir), on_step=on_step)
    loop_s = time.perf_counter() - t
    # Same rule as nanoGPT's lines: iteration i's time runs from the end of i-1 to the end of i;
    # the first has no start, and those that evaluated (and wrote a checkpoint) are left out.
    times = [
        ends[i] - ends[i - 1]
        for i in range(1, len(ends))
        if not evaluated[i] and (i + 1) % EVAL_EVERY
    ]
    whole = dataclasses.replace(config, eval_batches=10**9)
    val_full = evaluate(model, data, whole, None)
    n_params, per_token = model_flops_per_token(model, BLOCK)
    return {
        "iter_ms_median": statistics.median(times) * 1e3,
        "iter_ms_p10": _quantile(times, 0.1) * 1e3,
        "iter_ms_p90": _quantile(times, 0.9) * 1e3,
        "iters_timed": len(times),
        "steps": result.step,
        "train_loss": result.train_loss,
        "val_loss": result.val_loss,
        "val_loss_full": val_full,
        "loop_s": loop_s,
        "process_s": time.perf_counter() - started,
        "n_params": n_params,
        "flops_per_iter": per_token * BATCH * BLOCK,
        "dtype": args.small_dtype,
    }


def worker_large(args: argparse.Namespace) -> dict[str, Any]:

    import torch

    from lmforge.data.loader import TokenSplit
    from lmforge.model.presets import model_config
    from lmforge.model.transformer import Transformer
    from lmforge.train.loop import LoopConfig, train
    from lmforge.train.tasks import TokenWindows

    torch.set_num_threads(args.threads)
    train_split = TokenSplit.open(args.dataset, "train")
    torch.manual_seed(1337)
    config_overrides = {"n_layer": 1, "max_seq_len": 64} if args.smoke else {}
    model = Transformer(model_config("small", train_split.vocab_size, config_overrides))
    block = model.config.max_seq_len
    config = LoopConfig(
        max_steps=args.large_steps,
        batch_size=args.large_batch,
        block_size=block,
        warmup=0,
        eval_every=0,
        ckpt_every=0,
        dtype=args.large_dtype,
    )
    ends: list[float] = []
    t = time.perf_counter()
    result = train(
        model,
        TokenWindows(train_split, None),
        config,
        Path(args.run_dir),
        on_step=lambda _: ends.append(time.perf_counter()),
    )
    loop_s = time.perf_counter() - t
    times = [ends[i] - ends[i - 1] for i in range(2, len(ends) - 1)] or [loop_s / len(ends)]
    n_params, per_token = model_flops_per_token(model, block)
    return {
        "step_s_median": statistics.median(times),
        "steps_timed": len(times),
        "train_loss": result.train_loss,
        "loop_s": loop_s,
        "n_params": n_params,
        "flops_per_iter": per_token * args.large_batch * block,
        "preset": "small (1 layer, context 64: --smoke)" if args.smoke else "small",
        "batch": args.large_batch,
        "block": block,
    }


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


WORKERS = {"peak": worker_peak, "lmforge": worker_lmforge, "large": worker_large}


# ---------------------------------------------------------------------------------------------
# The driver


def run_worker(name: str, args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", name, f"--threads={args.threads}"]
    cmd += ["--smoke"] if args.smoke else []
    for key, value in extra.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            cmd.append(flag)
        elif value not in (None, False):
            cmd.append(f"{flag}={value}")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=thread_env(args), check=False)
    if proc.returncode != 0:
        sys.exit(f"{name} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def thread_env(args: argparse.Namespace) -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))


def export_nanogpt(source: Path, dest: Path) -> str:
    """Copy nanoGPT's files to DEST (from a checkout, or HEAD of a git mirror); its commit."""
    commit = "unknown"
    if (source / "train.py").is_file():
        shutil.copytree(source, dest, ignore=shutil.ignore_patterns(".git", "out*"))
        git_dir = source / ".git"
    else:
        git_dir = source
        dest.mkdir(parents=True)
        archive = subprocess.run(
            ["git", f"--git-dir={source}", "archive", "HEAD"], capture_output=True, check=True
        )
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    rev = subprocess.run(
        ["git", f"--git-dir={git_dir}", "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    if rev.returncode == 0:
        commit = rev.stdout.strip()
    return commit


def prepare_nanogpt(source: Path, work: Path, data: Path) -> tuple[Path, str]:
    """nanoGPT exported into WORK/nanoGPT with its shakespeare_char data prepared."""
    folder = work / "nanoGPT"
    commit = export_nanogpt(source, folder)
    char_dir = folder / "data" / "shakespeare_char"
    shutil.copy(data, char_dir / "input.txt")  # present: prepare.py downloads nothing
    env = dict(os.environ)
    if importlib.util.find_spec("requests") is None:
        # prepare.py imports requests at the top and uses it only to download input.txt.
        stubs = work / "stubs"
        stubs.mkdir(exist_ok=True)
        (stubs / "requests.py").write_text("def get(*args, **kwargs):\n    raise OSError\n")
        env["PYTHONPATH"] = str(stubs)
    subprocess.run(
        [sys.executable, "prepare.py"], cwd=char_dir, env=env, check=True, capture_output=True
    )
    return folder, commit


def run_nanogpt(folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    shutil.rmtree(folder / "out", ignore_errors=True)
    cmd = [sys.executable, "train.py", *(a.format(steps=args.steps) for a in NANOGPT_ARGS)]
    started = time.perf_counter()
    iters: dict[int, float] = {}
    evals: dict[int, tuple[float, float]] = {}
    tail: list[str] = []
    vocab = 0
    with subprocess.Popen(
        cmd,
        cwd=folder,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=thread_env(args),
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail = [*tail[-40:], line]
            if m := ITER_RE.match(line):
                iters[int(m[1])] = float(m[3]) / 1e3
                if int(m[1]) % 500 == 0:
                    print(f"  nanoGPT iter {m[1]}", file=sys.stderr, flush=True)
            elif m := EVAL_RE.match(line):
                evals[int(m[1])] = (float(m[2]), float(m[3]))
            elif m := VOCAB_RE.match(line):
                vocab = int(m[1])
    if proc.returncode != 0 or not iters or not evals:
        sys.exit(f"nanoGPT failed (exit {proc.returncode}):\n{''.join(tail)}")
    process_s = time.perf_counter() - started
    # Iteration 0 includes the start-up and the first evaluation; every 250th its evaluation.
    times = [dt for i, dt in iters.items() if i % EVAL_EVERY]
    last = max(evals)
    full = subprocess.run(
        [sys.executable, "-c", NANOGPT_FULL_VAL, str(args.threads)],
        cwd=folder,
        capture_output=True,
        text=True,
        env=thread_env(args),
        check=False,
    )
    if full.returncode != 0:
        sys.exit(f"evaluating nanoGPT's checkpoint failed:\n{full.stderr[-3000:]}")
    n_params, per_token = nanogpt_flops_per_token(vocab)
    return {
        "iter_ms_median": statistics.median(times) * 1e3,
        "iter_ms_p10": _quantile(times, 0.1) * 1e3,
        "iter_ms_p90": _quantile(times, 0.9) * 1e3,
        "iters_timed": len(times),
        "steps": len(iters),
        "val_loss": evals[last][1],
        "train_loss_eval": evals[last][0],
        "eval_step": last,
        **json.loads(full.stdout.strip().splitlines()[-1]),
        "loop_s": sum(iters.values()),
        "process_s": process_s,
        "n_params": n_params,
        "flops_per_iter": per_token * BATCH * BLOCK,
        "dtype": "fp32",
    }


def nanogpt_flops_per_token(vocab: int) -> tuple[int, int]:
    """nanoGPT's `estimate_mfu` for the CPU configuration (no biases, wte tied to lm_head)."""
    n_layer, n_head, c = 4, 4, 128
    per_layer = 12 * c * c + 2 * c  # c_attn, c_proj, c_fc, mlp.c_proj; two LayerNorm weights
    n = n_layer * per_layer + vocab * c + c  # + wte (tied to lm_head) + ln_f
    return n, 6 * n + 12 * n_layer * n_head * (c // n_head) * BLOCK


def prepare_lmforge(data: Path, work: Path, nanogpt: Path | None) -> tuple[Path, bool | None]:
    """The data set as `lmforge data prepare --tokenizer char --split tail --val-fraction 0.1`
    builds it; and whether its token stream equals nanoGPT's train.bin + val.bin."""
    import numpy as np

    from lmforge.data.prepare import PrepareConfig, prepare

    config = PrepareConfig(sources=(str(data),), tokenizer="char", split="tail", val_fraction=0.1)
    result = prepare(config, work / "shakespeare-char")
    if nanogpt is None:
        return result.path, None
    dtype = np.dtype(result.manifest["dtype"])
    same = True
    for split in ("train", "val"):
        theirs = np.fromfile(nanogpt / "data" / "shakespeare_char" / f"{split}.bin", np.uint16)
        ours = np.concatenate(
            [
                np.fromfile(result.path / s["file"], dtype)
                for s in result.manifest["shards"]
                if s["split"] == split
            ]
        )
        same = same and len(ours) == len(theirs) and bool((ours == theirs).all())
    return result.path, same


def middle(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The median round (the lower one of an even count), every round's iteration time kept."""
    ordered = sorted(rounds, key=lambda r: r["iter_ms_median"])
    return {
        **ordered[(len(ordered) - 1) // 2],
        "rounds_iter_ms": [r["iter_ms_median"] for r in rounds],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--nanogpt", type=Path, default=NANOGPT_MIRROR, help="checkout or git mirror")
    p.add_argument("--data", type=Path, default=SHAKESPEARE, help="tinyshakespeare input.txt")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1, help="runs per side, alternating")
    p.add_argument("--skip-nanogpt", action="store_true")
    p.add_argument(
        "--variants",
        default="auto",
        help="lmforge runs: eager (fp32), compile (fp32, compile=True), bf16 (eager, autocast);\n"
        "auto: all three, bf16 only where the CPU has native bf16 (AVX512_BF16 or AMX)",
    )
    p.add_argument("--large-steps", type=int, default=20, help="0: skip the larger configuration")
    p.add_argument("--large-batch", type=int, default=16)
    p.add_argument(
        "--large-dtype",
        choices=["auto", "bf16", "fp32"],
        default="auto",
        help="auto: bf16 where the CPU has native bf16, else fp32",
    )
    p.add_argument("--out", type=Path, default=RESULTS / "train.json")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="seconds, for make test: a generated corpus, 12 steps eager, a 1-layer larger "
        "configuration, tiny matmuls; nanoGPT skipped; writes nothing unless --out is given",
    )
    # Worker-only arguments.
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--dataset", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    p.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--small-dtype", default="fp32", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return
    if args.smoke:
        apply_smoke(p, args)
    native = native_bf16()
    report_notes: list[str] = []
    if args.variants == "auto":
        args.variants = "eager,compile,bf16" if native else "eager,compile"
        if not native:
            report_notes.append("bf16 run skipped: this CPU has no native bf16 (emulated)")
    if args.large_dtype == "auto":
        args.large_dtype = "bf16" if native else "fp32"
    if not args.smoke and not args.data.is_file():
        sys.exit(f"{args.data} is missing (see ../shared/data/README.md)")
    use_nanogpt = not args.skip_nanogpt
    if use_nanogpt and not args.nanogpt.exists():
        sys.exit(f"--nanogpt {args.nanogpt}: no such checkout or mirror (or --skip-nanogpt)")

    report: dict[str, Any] = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "native_bf16": native,
        "notes": report_notes,
    }
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        work = Path(tmp)
        if args.smoke:
            args.data = smoke_corpus(work)
        print("measuring the matmul peak …", file=sys.stderr, flush=True)
        peaks = [run_worker("peak", args)]
        folder = None
        if use_nanogpt:
            folder, commit = prepare_nanogpt(args.nanogpt, work, args.data)
            report["nanogpt_commit"] = commit
        dataset, same_tokens = prepare_lmforge(args.data, work, folder)
        report["same_tokens_as_nanogpt"] = same_tokens
        sides = ["nanogpt"] if use_nanogpt else []
        variants = args.variants.split(",")
        unknown = set(variants) - set(VARIANTS)
        if unknown:
            sys.exit(
                f"--variants: unknown {', '.join(sorted(unknown))} (known: eager, compile, bf16)"
            )
        sides += [VARIANTS[v] for v in VARIANTS if v in variants]
        runs: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
        # Sides alternate (A B C A B C …) so a change in the machine's load hits all alike.
        for rnd, side in ((r, s) for r in range(args.rounds) for s in sides):
            print(f"round {rnd + 1}/{args.rounds}: {side} …", file=sys.stderr, flush=True)
            if side == "nanogpt":
                assert folder is not None
                runs[side].append(run_nanogpt(folder, args))
            else:
                run_dir = work / f"run-{side}-{rnd}"
                result = run_worker(
                    "lmforge",
                    args,
                    dataset=dataset,
                    steps=args.steps,
                    run_dir=run_dir,
                    compile=side == "lmforge_compile",
                    small_dtype="bf16" if side == "lmforge_bf16" else "fp32",
                )
                if "skipped" in result:
                    print(f"  {side} skipped: {result['skipped']}", file=sys.stderr)
                    continue
                runs[side].append(result)
        if args.large_steps > 0:
            print(f"larger configuration: {args.large_steps} steps …", file=sys.stderr, flush=True)
            report["large"] = run_worker(
                "large",
                args,
                dataset=dataset,
                run_dir=work / "run-large",
                large_steps=args.large_steps,
                large_batch=args.large_batch,
                large_dtype=args.large_dtype,
            )
        if not args.smoke:  # once is enough to see it run
            peaks.append(run_worker("peak", args))
    peak = {d: max(pk[d]["gflops"] for pk in peaks) for d in ("fp32", "bf16")}
    report["peak_gflops"] = peak
    report["peak_runs"] = peaks
    results = {side: middle(rs) for side, rs in runs.items() if rs}
    for r in results.values():
        r["iters_per_s"] = 1e3 / r["iter_ms_median"]
        r["tokens_per_s"] = r["iters_per_s"] * BATCH * BLOCK
        r["mfu"] = r["flops_per_iter"] * r["iters_per_s"] / (peak[r["dtype"]] * 1e9)
    report.update(results)
    report["ratio_iters_per_s"] = {
        side: r["iters_per_s"] / results["nanogpt"]["iters_per_s"]
        for side, r in results.items()
        if side != "nanogpt" and "nanogpt" in results
    }
    if "large" in report:
        large = report["large"]
        large["mfu"] = (
            large["flops_per_iter"] / large["step_s_median"] / (peak[args.large_dtype] * 1e9)
        )
        large["tokens_per_s"] = large["batch"] * large["block"] / large["step_s_median"]
    print_report(report, args)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))


def apply_smoke(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--smoke: tiny sizes, in-repo data only, no nanoGPT (the anchor is skipped)."""
    print("--smoke: tiny sizes; the nanoGPT anchor is skipped", file=sys.stderr)
    args.skip_nanogpt = True
    args.steps, args.rounds, args.variants = 12, 1, "eager"
    args.large_steps, args.large_batch, args.large_dtype = 3, 2, "fp32"
    args.data = Path("-")  # generated in the temp folder
    if args.out == parser.get_default("out"):
        args.out = None


def smoke_corpus(work: Path) -> Path:
    """A seeded ~60 KB character corpus (made-up words) standing in for tinyshakespeare."""
    import random

    rng = random.Random(0)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "de", "po"]
    lines = [
        " ".join("".join(rng.choices(syllables, k=rng.randint(1, 3))) for _ in range(10))
        for _ in range(1200)
    ]
    path = work / "input.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


LABELS = {
    "nanogpt": "nanoGPT",
    "lmforge": "lmforge",
    "lmforge_compile": "lmforge compile",
    "lmforge_bf16": "lmforge bf16*",
}


def print_report(report: dict[str, Any], args: argparse.Namespace) -> None:
    peak = report["peak_gflops"]
    same = {True: "yes", False: "NO", None: "not checked"}[report["same_tokens_as_nanogpt"]]
    print(
        f"\nnanoGPT's shakespeare-char CPU configuration: {args.steps} steps of {BATCH}×{BLOCK} "
        f"tokens, fp32, {args.threads} threads. Measured matmul peak: {peak['fp32']:.0f} GFLOP/s "
        f"fp32, {peak['bf16']:.0f} GFLOP/s bf16. Same tokens as nanoGPT: {same}.\n"
    )
    cols = ("it/s", "tok/s", "ms/it", "p10–p90", "MFU", "loop s", "proc s", "val", "val full")
    print(
        f"{'':17s}"
        + "".join(f"{c:>10s}" for c in cols[:3])
        + f"{cols[3]:>14s}"
        + "".join(f"{c:>10s}" for c in cols[4:])
    )
    sides = [s for s in LABELS if s in report]
    for side in sides:
        r = report[side]
        print(
            f"{LABELS[side]:17s}{r['iters_per_s']:10.2f}{r['tokens_per_s']:10.0f}"
            f"{r['iter_ms_median']:10.2f}"
            f"{r['iter_ms_p10']:8.1f}–{r['iter_ms_p90']:<5.1f}{r['mfu']:10.1%}{r['loop_s']:10.1f}"
            f"{r['process_s']:10.1f}{r['val_loss']:10.4f}{r['val_loss_full']:10.4f}"
        )
    for side, ratio in report["ratio_iters_per_s"].items():
        loop = report["nanogpt"]["loop_s"] / report[side]["loop_s"]
        print(f"{'÷ nanoGPT':>17s}{ratio:9.2f}×{'':44s}{loop:9.2f}×  ({LABELS[side]})")
    print(
        "\nms/it: median time between iterations, those that evaluated left out (p10–p90: their "
        "10th and 90th percentiles). MFU: of the "
        "fp32 peak (bf16 rows: of the bf16 peak)."
    )
    for note in report["notes"]:
        print(f"{note}; measured bf16 peak {peak['bf16']:.1f} GFLOP/s.")
    if "lmforge_bf16" in report:
        print(
            "* bf16 autocast: not the issue's (fp32) configuration, shown for what the same "
            "model does in bf16."
        )
    if "nanogpt" in report:
        ng = report["nanogpt"]
        print(
            f"nanoGPT's val: its 'step {ng['eval_step']}' line (20 random batches); lmforge's: "
            "its last evaluation (40 batches). val full: the whole split in 64-token windows "
            f"(nanoGPT's from its checkpoint of iteration {ng['checkpoint_iter']})."
        )
    if "large" in report:
        large = report["large"]
        print(
            f"\nlarger: lmforge `{large['preset']}` ({large['n_params'] / 1e6:.1f} M parameters), "
            f"batch {large['batch']}×{large['block']}, {args.large_dtype}: "
            f"{large['step_s_median']:.3f} s/step, {large['tokens_per_s']:.0f} tok/s, "
            f"{large['flops_per_iter'] / large['step_s_median'] / 1e9:.0f} GFLOP/s, "
            f"MFU {large['mfu']:.1%} of the {args.large_dtype} peak"
        )
    print("\ntargets (the issue):")
    if "lmforge" in report:
        val = report["lmforge"]["val_loss_full"]
        print(f"  val loss ≤ 1.88 (nanoGPT's published figure): lmforge {val:.3f} (whole split)")
    for side, ratio in report["ratio_iters_per_s"].items():
        print(f"  ≥ 1.50× nanoGPT's iterations/s: {ratio:.2f}× ({LABELS[side]})")
    if "large" in report and args.large_dtype == "bf16":
        print(f"  ≥ 40% bf16 MFU, d_model ≥ 384: {report['large']['mfu']:.1%}")
    elif "large" in report:
        print(
            "  ≥ 40% bf16 MFU, d_model ≥ 384: not measurable here (no native bf16); "
            f"fp32 MFU {report['large']['mfu']:.1%}"
        )


if __name__ == "__main__":
    main()
