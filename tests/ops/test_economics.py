"""`lmforge economics`: the arithmetic against a hand computation, the measured throughput on a
tiny model, the ledger's revenue, the chart, and bad input."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import pytest

from conftest import assert_one_line_error, lmforge, tiny_config
from lmforge.cli.main import main
from lmforge.errors import LmforgeError
from lmforge.ops.economics import economics, measure_throughput, write_chart
from lmforge.registry import ledger, repo
from lmforge.registry.db import connect

PNG = b"\x89PNG\r\n\x1a\n"
COSTS = [13_200, 7_001, 250_000]  # nano-USD of eco@2's three requests
COMPLETIONS = [30, 11, 959]


def save_tiny(tokenizer, directory: Path, lineage: dict) -> Path:  # type: ignore[no-untyped-def]
    from lmforge.model.formats import save_model
    from lmforge.model.transformer import Transformer

    return save_model(Transformer(tiny_config("llama")), tokenizer, directory, lineage=lineage)


@pytest.fixture
def eco(tiny_tokenizer, tmp_path: Path, lmforge_home: Path) -> str:  # type: ignore[no-untyped-def]
    """eco@2, trained here 120 s × 2 processes from eco-base@1 (60 s × 1), itself trained from
    the built-in model; a price; ledger rows of eco@2 and of others (eco@1 among them, served
    under the same name) that must not count."""
    base = save_tiny(
        tiny_tokenizer, tmp_path / "base",
        {"run_id": "r-base", "wall_seconds": 60.0, "world_size": 1,
         "parent": "smollm2-135m-instruct"},
    )  # fmt: skip
    top = save_tiny(
        tiny_tokenizer, tmp_path / "top",
        {"run_id": "r-top", "wall_seconds": 120.0, "world_size": 2, "parent": "eco-base@1"},
    )  # fmt: skip
    engine = connect(home=lmforge_home)
    with engine.begin() as conn:
        repo.register_model(conn, name="eco-base", path=base, sha256="1" * 64)
        repo.register_model(conn, name="eco", path=base, sha256="2" * 64)  # eco@1: not counted
        repo.register_model(conn, name="eco", path=top, sha256="3" * 64)
        ledger.set_price(conn, model="eco", input_musd=1, output_musd=2)
        ledger.set_price(conn, model="eco", input_musd=100_000, output_musd=400_000)
        rows = [("eco", "eco@2", c, n) for c, n in zip(COSTS, COMPLETIONS, strict=True)]
        rows += [("eco", "eco@1", 999_999, 5), ("other", "other@1", 55_555, 7)]
        for i, (model, version, cost, completion) in enumerate(rows):
            ledger.record_usage(
                conn, request_id=f"req-{i:032x}", key_id=None, endpoint="/v1/completions",
                model=model, model_version=version, prompt_tokens=10 + i,
                completion_tokens=completion, ttft_ms=None, latency_ms=1.0, status="ok",
                http_status=200, cost_nusd=cost, price_input=100_000, price_output=400_000,
            )  # fmt: skip
    engine.dispose()
    return "eco"


def test_the_arithmetic_by_hand(eco: str, lmforge_home: Path) -> None:
    r = economics(eco, hourly_usd="0.10", margin=0.5, tokens_per_second=100.0)
    assert (r.model, r.model_version, r.measured) == ("eco@2", "eco@2", False)
    hourly = Fraction(1, 10)  # dollars
    # Training: (120 s × 2 + 60 s × 1) at $0.10 per hour, in nano-USD, rounded up.
    assert r.training_seconds == 300.0
    assert r.training_cost_nusd == math.ceil(300 * hourly / 3600 * 10**9) == 8_333_334
    assert [(t.model, t.run_id) for t in r.training] == [
        ("eco@2", "r-top"), ("eco-base@1", "r-base"), ("smollm2-135m-instruct", None),
    ]  # fmt: skip
    assert r.not_trained_here == "smollm2-135m-instruct"
    # Serving: $0.10/h / 3600 / 100 tok/s × 1e6 tokens; price for 50 % margin = cost / 0.5.
    per_mtok = hourly / 3600 / 100 * 10**6
    assert r.serving_cost_per_mtok_nusd == math.ceil(per_mtok * 10**9) == 277_777_778
    assert r.suggested_price_musd == math.ceil(Fraction(277_777_778, 1000) / Fraction(1, 2))
    assert r.suggested_price_musd == 555_556
    assert (r.price_input_musd, r.price_output_musd) == (100_000, 400_000)  # the newest price
    # The ledger: eco@2's rows only.
    assert r.requests == 3 and r.completion_tokens == sum(COMPLETIONS)
    assert r.revenue_nusd == sum(COSTS)
    engine = connect(home=lmforge_home)
    with engine.connect() as conn:
        (totals,) = ledger.usage_totals(conn, model="eco")  # eco@1's row included
        mine = [u for u in ledger.list_usage(conn) if u.model_version == "eco@2"]
    engine.dispose()
    assert r.revenue_nusd == sum(u.cost_nusd for u in mine) == totals.cost_nusd - 999_999
    assert r.prompt_tokens == sum(u.prompt_tokens for u in mine) == 10 + 11 + 12
    serving = math.ceil(sum(COMPLETIONS) * hourly / 3600 / 100 * 10**9)
    assert r.serving_cost_nusd == serving == 277_778
    assert r.gross_margin == pytest.approx((sum(COSTS) - serving) / sum(COSTS))

    r2 = economics(eco, hourly_usd="2", margin=0.0, tokens_per_second=2500.0)
    assert r2.serving_cost_per_mtok_nusd == math.ceil(Fraction(2, 3600) / 2500 * 10**15)
    assert r2.suggested_price_musd == math.ceil(Fraction(r2.serving_cost_per_mtok_nusd, 1000))

    chart = write_chart(r, lmforge_home / "c" / "eco.png")
    assert chart.read_bytes().startswith(PNG) and not list(chart.parent.glob(".*.tmp"))


def test_builtin_was_not_trained_here(lmforge_home: Path) -> None:
    r = economics("smollm2-135m-instruct", hourly_usd="0.10", margin=0.5, tokens_per_second=50)
    assert r.training_cost_nusd is None and r.not_trained_here == "smollm2-135m-instruct"
    assert r.requests == 0 and r.revenue_nusd == 0 and r.gross_margin is None
    assert r.price_output_musd is None


def test_measured_throughput_on_a_tiny_model(tiny_tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = save_tiny(tiny_tokenizer, tmp_path / "m", {"name": "m"})
    tps = measure_throughput(path, seconds=0.2, requests=4, max_tokens=8)
    assert 1 < tps < 1e7
    r = economics(str(path), hourly_usd="3.6", margin=0.25, measure_seconds=0.2)
    assert r.measured and r.tokens_per_second > 1
    # $3.60 per hour = $0.001 per second: a million tokens cost 1e6 / tps × $0.001.
    expected = 10**6 / r.tokens_per_second * 10**6  # nano-USD, rounded up
    assert r.serving_cost_per_mtok_nusd == pytest.approx(expected, abs=1)
    assert r.training_cost_nusd is None and r.not_trained_here == str(path)
    assert r.model_version.startswith("m@sha256:")


def test_cli_table_json_and_chart(
    eco: str, lmforge_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert main(["economics", eco, "--tokens-per-second", "100", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["revenue_nusd"] == sum(COSTS) and data["suggested_price_musd"] == 555_556
    chart = lmforge_home / "reports" / "economics-eco@2.png"
    assert data["chart"] == str(chart) and chart.read_bytes().startswith(PNG)
    chart.unlink()

    other = lmforge_home / "mine.png"
    assert main(["economics", eco, "--tokens-per-second", "100", "--chart", str(other)]) == 0
    text = capsys.readouterr().out
    assert "$0.555556 per Mtok out" in text and "$0.277778 per Mtok" in text
    assert "$0.008333 for 300.0 compute s" in text and str(other) in text.replace("\n", "")
    assert other.read_bytes().startswith(PNG) and not chart.exists()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--margin", "1"], "--margin must be in [0, 1)"),
        (["--margin", "-0.1"], "--margin must be in [0, 1)"),
        (["--hourly-usd", "-1"], "--hourly-usd"),
        (["--tokens-per-second", "0"], "--tokens-per-second must be > 0"),
    ],
)
def test_bad_input_is_one_line(
    eco: str, args: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert main(["economics", eco, *args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err


def test_unknown_model(lmforge_home: Path) -> None:
    with pytest.raises(LmforgeError, match="unknown model 'nope'"):
        economics("nope", hourly_usd="0.1", margin=0.5, tokens_per_second=1)
    proc = lmforge("economics", "nope", "--tokens-per-second", "5", home=lmforge_home)
    assert_one_line_error(proc, "unknown model 'nope'")
    proc = lmforge("economics", "--help", home=lmforge_home)
    assert proc.returncode == 0 and "Examples" in proc.stdout
