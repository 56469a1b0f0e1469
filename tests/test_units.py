"""Budget parsing and byte formatting: exact arithmetic, one-line errors, never a crash."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from planner.core.errors import PlannerError
from planner.core.units import format_bytes, parse_size, relative_difference


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512MB", 512_000_000),
        ("512 MB", 512_000_000),
        ("512mb", 512_000_000),
        ("2GiB", 2 * 1024**3),
        ("1.5GB", 1_500_000_000),
        ("1000", 1000),
        ("1000B", 1000),
        ("64KiB", 65536),
        ("3kB", 3000),
        ("0.5MiB", 524288),
        ("1TB", 10**12),
    ],
)
def test_parse_size_exact(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["-5MB", "0", "0MB", "12XB", "5 M B", "1e400GB", "", "MB", "1,5GB", "nan", "inf",
                                  "0.0000001B", "2000000000000EB", "99999999999999TB", "1  GB"])
def test_parse_size_rejects_with_one_line(text: str) -> None:
    with pytest.raises(PlannerError) as error:
        parse_size(text)
    message = str(error.value)
    assert "\n" not in message
    assert repr(text) in message or text.strip() == "" or "size" in message


@given(st.text(max_size=30))
def test_parse_size_never_crashes(text: str) -> None:
    try:
        size = parse_size(text)
    except PlannerError as error:
        assert "\n" not in str(error)
    else:
        assert isinstance(size, int) and size > 0


@given(st.integers(min_value=1, max_value=10**12), st.sampled_from(["B", "kB", "MB", "GB", "KiB", "MiB", "GiB"]))
def test_parse_size_round_trips_integers(number: int, unit: str) -> None:
    factor = {"B": 1, "kB": 1000, "MB": 10**6, "GB": 10**9, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}[unit]
    if number * factor > 10**18:
        with pytest.raises(PlannerError):
            parse_size(f"{number}{unit}")
    else:
        assert parse_size(f"{number}{unit}") == number * factor


def test_format_bytes() -> None:
    assert format_bytes(None) == "-"
    assert format_bytes(999) == "999 B"
    assert format_bytes(22_240) == "22.2 kB"
    assert format_bytes(2_147_483_648) == "2.1 GB"


def test_relative_difference() -> None:
    assert relative_difference(110, 100) == pytest.approx(0.1)
    assert relative_difference(None, 100) is None
    assert relative_difference(5, 0) is None


def test_format_bytes_treats_nan_as_missing() -> None:
    assert format_bytes(float("nan")) == "-"
