"""Errors the user can fix. The CLI prints them as one line and exits 2."""

from __future__ import annotations


class PlannerError(Exception):
    """Bad input: the message names what was wrong and what to do about it."""

    exit_code = 2


class NothingFits(Exception):
    """No verified recipe fits the budget (exit 1, not a user error)."""

    exit_code = 1
