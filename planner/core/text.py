"""Short text for one-line messages and notes. Pure functions, no torch."""

from __future__ import annotations


def first_names(items: list[str], shown: int = 3) -> str:
    """'a, b, c (and 4 more)': enough to act on without flooding one line."""
    head = ", ".join(items[:shown])
    return head + (f" (and {len(items) - shown} more)" if len(items) > shown else "")
