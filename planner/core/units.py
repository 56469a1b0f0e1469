"""Byte sizes: parsing budgets exactly and printing them readably. Pure functions, no torch."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from planner.core.errors import PlannerError

# Decimal units are powers of 1000, binary units powers of 1024, as in IEC 80000-13.
UNITS: dict[str, int] = {
    "b": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
# A budget above this is a typo rather than a device (1 EB).
MAX_BUDGET_BYTES = 10**18

_SIZE = re.compile(r"^(?P<number>[0-9]+(?:\.[0-9]+)?)\s?(?P<unit>[a-z]*)$")


def parse_size(text: str) -> int:
    """Parse '512MB', '2GiB', '1.5 GB' or '1000' (bytes) into a whole number of bytes.

    Units are case-insensitive; a single space between number and unit is allowed. Fractional
    bytes round down. Anything else raises PlannerError naming the accepted forms.
    """
    cleaned = text.strip().lower()
    match = _SIZE.match(cleaned)
    hint = ("use a positive number with B, kB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB "
            "(powers of 1024), e.g. 512MB")
    if not match:
        raise PlannerError(f"cannot read the size {text!r}: {hint}")
    unit = match["unit"] or "b"
    if unit not in UNITS:
        raise PlannerError(f"unknown unit {match['unit']!r} in {text!r}: {hint}")
    try:
        value = Decimal(match["number"]) * UNITS[unit]
    except InvalidOperation as error:
        raise PlannerError(f"cannot read the size {text!r}: {hint}") from error
    size = int(value)
    if size <= 0:
        raise PlannerError(f"the size {text!r} is not positive: {hint}")
    if size > MAX_BUDGET_BYTES:
        raise PlannerError(f"the size {text!r} is larger than 1 EB, which no device has: {hint}")
    return size


def format_bytes(size: float | int | None) -> str:
    """Human-readable decimal size ('537.2 MB'); '-' for a missing value (None or NaN, as pandas gives it)."""
    if size is None or size != size:
        return "-"
    size = float(size)
    sign = "-" if size < 0 else ""
    size = abs(size)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{sign}{size:.0f} {unit}" if unit == "B" else f"{sign}{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def relative_difference(analytic: int | float | None, verified: int | float | None) -> float | None:
    """(analytic - verified) / verified; None when either side is missing or verified is zero."""
    if analytic is None or verified is None or verified == 0:
        return None
    return (analytic - verified) / verified
