"""Economics of one model: what it cost to train, what a token costs to serve, what to charge.

    result = economics("words@2", hourly_usd=0.10, margin=0.5)  # measures throughput
    write_chart(result, "economics.png")

- Training: the compute seconds recorded in `lmforge.json` (wall seconds × world size) of the
  model and of each ancestor trained here, × the hourly rate. A model whose weights came from
  elsewhere (the built-in model, an import) was "not trained here": its share is unknown.
- Serving: output tokens per second of the inference engine on this machine, measured by a
  short in-process run (16 requests of 64 tokens at max_batch 16, EOS ignored) or given. Then
  cost per million tokens = hourly rate / 3600 / tokens per second × 1e6, and the price that
  keeps MARGIN of it = cost / (1 - MARGIN).
- The ledger: this model version's requests, tokens and revenue (the sum of their billed
  costs), the serving cost of their completion tokens at that throughput, and the gross margin.
  Prompt tokens are charged no serving cost: the measured throughput already includes the
  prefill of short prompts, and prefill is far cheaper per token than decode.

Money is integers as in `ops.pricing`: costs in nano-USD, prices in micro-USD per million tokens,
each estimate rounded up. torch is imported only to measure throughput.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from decimal import ROUND_CEILING, Decimal
from pathlib import Path
from typing import Any

from lmforge.atomic import write_with
from lmforge.builtin import BUILTINS
from lmforge.errors import LmforgeError
from lmforge.home import lmforge_home
from lmforge.ops.lineage import ModelFacts, find_model, model_chain
from lmforge.ops.pricing import NANO, format_price, format_usd, parse_usd
from lmforge.registry import ledger
from lmforge.registry.db import read_existing

log = logging.getLogger(__name__)

MEASURE_REQUESTS = 16
MEASURE_TOKENS = 64
MEASURE_PROMPT_TOKENS = 16


@dataclass(frozen=True)
class TrainingShare:
    """One model in the chain and the compute its training recorded."""

    model: str
    run_id: str | None  # None: not trained here
    compute_seconds: float  # wall seconds × world size


@dataclass(frozen=True)
class Economics:
    model: str  # "name@3", built-in name or directory
    model_version: str  # as the ledger records it
    hourly_nusd: int  # the machine's price per hour
    margin: float  # target gross margin in [0, 1)
    training: list[TrainingShare] = field(default_factory=list)  # the model first
    training_seconds: float = 0.0  # compute seconds of the runs done here
    training_cost_nusd: int | None = None  # None: nothing in the chain was trained here
    not_trained_here: str | None = None  # the ancestor whose training is unknown, if any
    tokens_per_second: float = 0.0  # output tokens per second when serving
    measured: bool = False  # measured here (True) or given
    serving_cost_per_mtok_nusd: int = 0
    suggested_price_musd: int = 0  # per million output tokens, for MARGIN
    price_input_musd: int | None = None  # the price in force; None: unpriced (free)
    price_output_musd: int | None = None
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    revenue_nusd: int = 0
    serving_cost_nusd: int = 0  # of the ledger's completion tokens
    gross_margin: float | None = None  # (revenue - serving cost) / revenue; None: no revenue

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def economics(
    spec: str,
    *,
    hourly_usd: float | str,
    margin: float,
    tokens_per_second: float | None = None,
    measure_seconds: float = 10.0,
    home: Path | None = None,
) -> Economics:
    """Training cost, serving cost, suggested price and the ledger's totals for model SPEC."""
    home = home or lmforge_home()
    hourly_nusd = parse_usd(str(hourly_usd), what="--hourly-usd", scale=NANO)
    if not (isinstance(margin, (int, float)) and 0 <= margin < 1):
        raise LmforgeError(f"--margin must be in [0, 1), got {margin}")
    if tokens_per_second is not None and not (
        math.isfinite(tokens_per_second) and tokens_per_second > 0
    ):
        raise LmforgeError(f"--tokens-per-second must be > 0, got {tokens_per_second}")
    if not (math.isfinite(measure_seconds) and measure_seconds > 0):
        raise LmforgeError(f"--measure-seconds must be > 0, got {measure_seconds}")
    facts = find_model(spec, home=home)
    if facts.missing is not None:
        raise LmforgeError(f"model {facts.label}: {facts.missing}")

    training, not_here = training_shares(facts, home=home)
    seconds = sum(t.compute_seconds for t in training)
    trained = any(t.run_id for t in training)
    measured = tokens_per_second is None
    tps = tokens_per_second or measure_throughput(_model_path(facts, home), seconds=measure_seconds)
    per_mtok = serving_cost_nusd(10**6, tokens_per_second=tps, hourly_nusd=hourly_nusd)

    with read_existing(home=home) as conn:
        price = ledger.get_price(conn, model=facts.name) if conn is not None else None
        rows = _ledger_rows(conn, facts) if conn is not None else []
    revenue = sum(r.cost_nusd for r in rows)
    completion = sum(r.completion_tokens for r in rows)
    serving = serving_cost_nusd(completion, tokens_per_second=tps, hourly_nusd=hourly_nusd)
    return Economics(
        model=facts.label,
        model_version=facts.version,
        hourly_nusd=hourly_nusd,
        margin=float(margin),
        training=training,
        training_seconds=seconds,
        training_cost_nusd=_ceil(Decimal(seconds) * hourly_nusd / 3600) if trained else None,
        not_trained_here=not_here,
        tokens_per_second=tps,
        measured=measured,
        serving_cost_per_mtok_nusd=per_mtok,
        suggested_price_musd=suggested_price_musd(per_mtok, margin),
        price_input_musd=price.input_musd if price else None,
        price_output_musd=price.output_musd if price else None,
        requests=len(rows),
        prompt_tokens=sum(r.prompt_tokens for r in rows),
        completion_tokens=completion,
        revenue_nusd=revenue,
        serving_cost_nusd=serving,
        gross_margin=(revenue - serving) / revenue if revenue else None,
    )


def economics_rows(r: Economics) -> list[tuple[str, str]]:
    """R as (field, value) lines of plain text, for `lmforge economics` and pipeline reports."""
    rows = [("machine", f"{format_usd(r.hourly_nusd, places=4)} per hour")]
    if r.training_cost_nusd is None:
        rows.append(("training", f"not trained here ({r.not_trained_here or r.model})"))
    else:
        runs = ", ".join(f"{t.model} {t.compute_seconds:,.1f} s" for t in r.training if t.run_id)
        base = f"; {r.not_trained_here} not trained here" if r.not_trained_here else ""
        rows.append(
            (
                "training",
                f"{format_usd(r.training_cost_nusd)} for {r.training_seconds:,.1f} compute s "
                f"({runs}{base})",
            )
        )
    how = "measured" if r.measured else "given"
    rows.append(("throughput", f"{r.tokens_per_second:,.1f} output tokens/s ({how})"))
    rows.append(("serving cost", f"{format_usd(r.serving_cost_per_mtok_nusd)} per Mtok"))
    rows.append(
        ("suggested price", f"{format_price(r.suggested_price_musd)} per Mtok out ({r.margin:.0%})")
    )
    if r.price_output_musd is None or r.price_input_musd is None:
        rows.append(("price in force", "none (free)"))
    else:
        rows.append(
            (
                "price in force",
                f"{format_price(r.price_input_musd)} in / {format_price(r.price_output_musd)} out "
                "per Mtok",
            )
        )
    rows.append(
        (
            "ledger",
            f"{r.requests:,} requests, {r.prompt_tokens:,} prompt + {r.completion_tokens:,} "
            "completion tokens",
        )
    )
    rows.append(("revenue", format_usd(r.revenue_nusd)))
    rows.append(("serving cost (ledger)", format_usd(r.serving_cost_nusd)))
    rows.append(("gross margin", "-" if r.gross_margin is None else f"{r.gross_margin:.1%}"))
    return rows


def serving_cost_nusd(tokens: int, *, tokens_per_second: float, hourly_nusd: int) -> int:
    """Nano-USD to generate TOKENS at TOKENS_PER_SECOND on a machine of HOURLY_NUSD per hour."""
    return _ceil(Decimal(tokens) * hourly_nusd / (3600 * Decimal(repr(tokens_per_second))))


def suggested_price_musd(cost_per_mtok_nusd: int, margin: float) -> int:
    """Micro-USD per million tokens that keeps MARGIN of the price: cost / (1 - margin)."""
    return _ceil(Decimal(cost_per_mtok_nusd) / 1000 / (1 - Decimal(repr(margin))))


def training_shares(
    facts: ModelFacts, *, home: Path | None = None
) -> tuple[list[TrainingShare], str | None]:
    """The compute each model in FACTS' chain recorded, and the first one not trained here."""
    shares, not_here = [], None
    for model in model_chain(facts, home=home):
        rec = model.record
        if "run_id" in rec:
            world = int(rec.get("world_size") or 1)
            seconds = float(rec.get("wall_seconds") or 0) * world
            shares.append(TrainingShare(model.label, str(rec["run_id"]), seconds))
        else:
            shares.append(TrainingShare(model.label, None, 0.0))
            not_here = not_here or model.label
    return shares, not_here


def _ledger_rows(conn: Any, facts: ModelFacts) -> list[ledger.UsageRecord]:
    """The ledger rows this exact model version served (the ledger's `model` is the served
    name, shared by all versions; `model_version` tells them apart)."""
    rows = ledger.list_usage(conn, model=facts.name)
    return [r for r in rows if r.model_version == facts.version]


def _model_path(facts: ModelFacts, home: Path) -> Path:
    if facts.path is not None and (facts.path / "config.json").is_file():
        return facts.path
    if facts.gguf is not None:  # a built-in model, not converted yet
        return facts.gguf
    if facts.kind == "builtin":  # not installed, or chunks not assembled yet
        gguf = BUILTINS[facts.label].gguf_path(home)
        if gguf is None:
            raise LmforgeError(str(BUILTINS[facts.label].unavailable()))
        return gguf
    raise LmforgeError(f"model {facts.label}: no model files at {facts.path}")


def _ceil(value: Decimal) -> int:
    return int(value.to_integral_value(rounding=ROUND_CEILING))


# -- throughput --------------------------------------------------------------------------------


def measure_throughput(
    path: Path,
    *,
    seconds: float = 10.0,
    requests: int = MEASURE_REQUESTS,
    max_tokens: int = MEASURE_TOKENS,
) -> float:
    """Output tokens per second of the engine on the model at PATH: rounds of REQUESTS requests
    of MAX_TOKENS tokens (EOS ignored, greedy), at max_batch REQUESTS, for about SECONDS (at
    least one round), as the server runs it (weights in their inference layout)."""
    from lmforge.infer.engine import Engine, default_max_model_len
    from lmforge.infer.params import SamplingParams
    from lmforge.infer.scheduler import SchedulerConfig
    from lmforge.model.formats import load_model
    from lmforge.model.transformer import Transformer, optimize_weight_layout

    model = load_model(path).model
    if not isinstance(model, Transformer):
        raise LmforgeError(f"{path}: only Transformer models can be served (not an LSTM)")
    optimize_weight_layout(model)
    max_len = default_max_model_len(model)
    prompt_len = max(1, min(MEASURE_PROMPT_TOKENS, max_len // 4))
    budget = max(1, min(max_tokens, max_len - prompt_len - 1))
    params = SamplingParams(max_tokens=budget, ignore_eos=True)
    config = SchedulerConfig(max_batch=requests, max_model_len=max_len)
    engine = Engine(model, config)
    rng = random.Random(0)
    vocab = model.config.vocab_size
    engine.generate([[rng.randrange(vocab) for _ in range(prompt_len)]], SamplingParams(2))  # warm
    generated, started = 0, time.perf_counter()
    while True:
        prompts = [[rng.randrange(vocab) for _ in range(prompt_len)] for _ in range(requests)]
        done = engine.generate(prompts, params)
        generated += sum(len(r.output_ids) for r in done)
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            break
    log.info("throughput of %s: %d tokens in %.2f s", path, generated, elapsed)
    return generated / elapsed


# -- chart -------------------------------------------------------------------------------------


def write_chart(result: Economics, path: str | Path) -> Path:
    """Draw RESULT to PATH (PNG, written atomically): serving cost per million tokens against
    the price in force and the suggested price; the ledger's revenue against its serving cost."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    target = Path(path)
    fig, (prices_ax, ledger_ax) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    unpriced = "\n(none: free)" if result.price_output_musd is None else ""
    labels = [
        "serving cost",
        f"price in force{unpriced}",
        f"suggested\n({result.margin:.0%} margin)",
    ]
    values = [
        result.serving_cost_per_mtok_nusd / NANO,
        (result.price_output_musd or 0) / 10**6,
        result.suggested_price_musd / 10**6,
    ]
    bars = prices_ax.bar(labels, values, color=["#c44e52", "#4c72b0", "#55a868"])
    prices_ax.bar_label(bars, labels=[f"${v:,.4f}" for v in values])
    prices_ax.set_ylabel("USD per million output tokens")
    prices_ax.set_ylim(bottom=0, top=max(values) * 1.15 or 1)
    prices_ax.set_title(f"{result.tokens_per_second:,.0f} tokens/s")
    money = [result.revenue_nusd / NANO, result.serving_cost_nusd / NANO]
    bars = ledger_ax.bar(["revenue", "serving cost"], money, color=["#4c72b0", "#c44e52"])
    ledger_ax.bar_label(bars, labels=[f"${v:,.6f}" for v in money])
    ledger_ax.set_ylabel("USD")
    ledger_ax.set_ylim(bottom=0, top=max(money) * 1.15 or 1)
    ledger_ax.set_title(f"ledger: {result.requests:,} requests")
    fig.suptitle(f"{result.model}: economics at ${result.hourly_nusd / NANO:,.4f}/hour")
    fig.tight_layout()
    try:
        write_with(target, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
    return target
