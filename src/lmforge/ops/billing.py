"""Invoices from the usage ledger: one period (a calendar month, UTC), all keys or one.

An invoice line is a key's usage of one model at one price; its amount is the exact sum of the
ledger's nano-USD costs of those requests, and the invoice total is the exact sum of its lines —
which `build_invoice` checks against a separate SUM over the ledger before anything is written.
Only printed figures are rounded (to the cent, half up); the JSON carries the exact nano-USD
amounts too. Written as JSON, Markdown and a self-contained HTML page, each atomically.
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Connection

from lmforge.atomic import write_text_atomic
from lmforge.errors import LmforgeError
from lmforge.ops.pricing import cents, format_price
from lmforge.registry.ledger import InvoiceLine, invoice_lines, ledger_total
from lmforge.registry.tables import utc_now

_PERIOD = re.compile(r"(\d{4})-(\d{2})")


def period_bounds(period: str) -> tuple[str, str]:
    """ "2026-11" → the stored-time bounds [2026-11-01, 2026-12-01) in UTC."""
    m = _PERIOD.fullmatch(period.strip())
    if m is None or not 1 <= int(m[2]) <= 12:
        raise LmforgeError(f"period {period!r}: want a month like 2026-11")
    year, month = int(m[1]), int(m[2])
    nxt = (year + 1, 1) if month == 12 else (year, month + 1)
    return f"{year:04d}-{month:02d}-01T00:00:00", f"{nxt[0]:04d}-{nxt[1]:02d}-01T00:00:00"


@dataclass(frozen=True)
class Invoice:
    number: str  # "LMF-2026-11" or "LMF-2026-11-<key>"
    period: str
    key: str | None  # None: every key
    since: str
    until: str
    generated_at: str
    lines: list[InvoiceLine]
    total_nusd: int

    @property
    def total(self) -> str:
        return f"{cents(self.total_nusd)}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "invoice": self.number,
            "period": self.period,
            "key": self.key,
            "from": self.since + "Z",
            "until": self.until + "Z",
            "generated_at": self.generated_at,
            "currency": "USD",
            "lines": [
                {
                    **asdict(line),
                    "price_input_per_million": _price(line.price_input),
                    "price_output_per_million": _price(line.price_output),
                    "amount": f"{cents(line.cost_nusd)}",
                    "amount_nanousd": line.cost_nusd,
                }
                for line in self.lines
            ],
            "total": self.total,
            "total_nanousd": self.total_nusd,
        }


def _price(musd: int | None) -> str:
    return "free" if musd is None else format_price(musd)


def build_invoice(conn: Connection, *, period: str, key: str | None = None) -> Invoice:
    """The invoice for PERIOD (all keys, or KEY's), checked against the ledger to the nano-USD."""
    since, until = period_bounds(period)
    lines = invoice_lines(conn, since=since, until=until, key=key)
    total = sum(line.cost_nusd for line in lines)
    # Rows without a key (a --no-auth server) are not anyone's to bill.
    ledger = ledger_total(conn, since=since, until=until, key=key, keyed=True)
    if total != ledger:  # cannot happen unless the queries disagree; never print a wrong bill
        raise LmforgeError(f"invoice lines sum to {total} nano-USD but the ledger says {ledger}")
    number = f"LMF-{period}" + (f"-{key}" if key else "")
    return Invoice(number, period, key, since, until, utc_now(), lines, total)


def to_markdown(invoice: Invoice) -> str:
    who = f"key `{invoice.key}`" if invoice.key else "all keys"
    out = [
        f"# Invoice {invoice.number}",
        "",
        f"Period {invoice.period} (UTC), {who}. Generated {invoice.generated_at}.",
        "",
        "| key | model | requests | prompt tokens | completion tokens | input $/M | output $/M "
        "| amount (USD) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for line in invoice.lines:
        out.append(
            f"| {_md(line.key)} | {_md(line.model)} | {line.requests} | {line.prompt_tokens} | "
            f"{line.completion_tokens} | {_price(line.price_input)} | "
            f"{_price(line.price_output)} | {cents(line.cost_nusd)} |"
        )
    out += ["", f"**Total: ${invoice.total}** ({invoice.total_nusd} nano-USD exactly)", ""]
    return "\n".join(out)


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def to_html(invoice: Invoice) -> str:
    e = html.escape
    who = f"key {e(invoice.key)}" if invoice.key else "all keys"
    rows = "".join(
        "<tr>"
        + "".join(
            f"<td>{e(str(v))}</td>"
            for v in (
                line.key,
                line.model,
                line.requests,
                line.prompt_tokens,
                line.completion_tokens,
                _price(line.price_input),
                _price(line.price_output),
                cents(line.cost_nusd),
            )
        )
        + "</tr>"
        for line in invoice.lines
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Invoice {e(invoice.number)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; color: #222; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: .3rem .6rem; }}
td:nth-child(n+3) {{ text-align: right; }} .total {{ font-size: 1.3rem; margin-top: 1rem; }}
</style></head><body>
<h1>Invoice {e(invoice.number)}</h1>
<p>Period {e(invoice.period)} (UTC), {who}. Generated {e(invoice.generated_at)}.</p>
<table><thead><tr><th>key</th><th>model</th><th>requests</th><th>prompt tokens</th>
<th>completion tokens</th><th>input $/M</th><th>output $/M</th><th>amount (USD)</th></tr></thead>
<tbody>{rows}</tbody></table>
<p class="total">Total: <strong>${e(invoice.total)}</strong>
({invoice.total_nusd} nano-USD exactly)</p>
</body></html>
"""


def write_invoice(invoice: Invoice, directory: Path) -> list[Path]:
    """Write INVOICE as NUMBER.json, .md and .html into DIRECTORY; return the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for suffix, text in (
        (".json", json.dumps(invoice.to_dict(), indent=2) + "\n"),
        (".md", to_markdown(invoice)),
        (".html", to_html(invoice)),
    ):
        path = directory / f"{invoice.number}{suffix}"
        write_text_atomic(path, text)
        paths.append(path)
    return paths
