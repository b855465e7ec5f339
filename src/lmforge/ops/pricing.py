"""Money arithmetic, exactly: dollar amounts as integers, never floats.

Prices are micro-USD (1e-6 $) per million tokens, so a price given with up to 6 decimals is
exact. A request's cost is nano-USD (1e-9 $): (prompt × input price + completion × output
price) / 1000, rounded up — so a cost is never under the true amount by more than a nano-dollar,
and the cost of fewer tokens is never more than the cost of more (what makes a reservation of
prompt + max_tokens an upper bound of the settled cost). Sums of nano-USD are exact; invoices
round only their printed totals, to the cent, half up.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal, InvalidOperation

from lmforge.errors import LmforgeError

MICRO = 10**6
NANO = 10**9


def parse_usd(text: str | float, *, what: str, scale: int) -> int:
    """TEXT dollars ("0.15", "$2") as an integer number of 1/SCALE dollars; exact or refused."""
    raw = str(text).strip().removeprefix("$")
    try:
        value = Decimal(raw)
    except InvalidOperation:
        raise LmforgeError(f"{what}: {text!r} is not an amount of dollars") from None
    if not value.is_finite() or value < 0:
        raise LmforgeError(f"{what}: {text!r} must be a finite amount >= 0")
    scaled = value * scale
    if scaled != scaled.to_integral_value():
        places = len(str(scale)) - 1
        raise LmforgeError(f"{what}: {text!r} has more than {places} decimal places")
    if scaled > 2**62:
        raise LmforgeError(f"{what}: {text!r} is too large")
    return int(scaled)


def cost_nusd(prompt_tokens: int, completion_tokens: int, input_musd: int, output_musd: int) -> int:
    """The cost in nano-USD of a request at the given prices (micro-USD per million tokens)."""
    micro_total = prompt_tokens * input_musd + completion_tokens * output_musd  # 1e-12 $
    return -(-micro_total // 1000)


def usd(nano: int) -> Decimal:
    """NANO nano-USD as exact dollars."""
    return Decimal(nano) / NANO


def cents(nano: int) -> Decimal:
    """NANO nano-USD rounded to the cent (half up), as dollars with two places."""
    return usd(nano).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


def format_usd(nano: int, *, places: int = 6) -> str:
    """ "$1.234568": NANO nano-USD rounded half up to PLACES decimals."""
    step = Decimal(1).scaleb(-places)
    return f"${usd(nano).quantize(step, rounding=ROUND_HALF_UP)}"


def format_price(musd: int) -> str:
    """A price per million tokens as dollars, without trailing zeros beyond the cents."""
    value = Decimal(musd) / MICRO
    text = f"{value:.6f}".rstrip("0")
    whole, _, frac = text.partition(".")
    return f"${whole}.{frac.ljust(2, '0')}"
