"""Ranking rows against the budget and choosing the pick. Pure functions over plain dicts."""

from __future__ import annotations

import math
from typing import Any

# runtime: what the model adds to a running process; disk: the artifact; device (the default): runtime plus what a
# device holds for the runtime itself. For torch and ONNX Runtime that is the measured Python process baseline
# (interpreter, library, allocator): the device runs that same stack. ExecuTorch's device runtime is its C++
# library, not the Python binding measured here; its cost is not measured, so its rows count the model alone and
# say so (device_framework_bytes None with device_framework_unmeasured).
BUDGET_TARGETS = ("runtime", "disk", "device")
DEFAULT_BUDGET_ON = "device"


def measured_size(row: dict[str, Any], budget_on: str) -> int | None:
    """The figure the budget applies to: verified for a verified row, analytic for an `estimated` row
    (planner plan --analytic-only), None otherwise."""
    status = row.get("status")
    if status not in ("verified", "estimated"):
        return None
    prefix = "verified" if status == "verified" else "analytic"
    if budget_on == "disk":
        return row.get(f"{prefix}_disk_bytes")
    runtime = row.get(f"{prefix}_runtime_bytes")
    if budget_on == "runtime" or runtime is None:
        return runtime
    framework = row["device_framework_bytes"] if "device_framework_bytes" in row else row.get("framework_bytes")
    if framework is None:
        return runtime if row.get("device_framework_unmeasured") else None
    return runtime + framework


def analytic_size(row: dict[str, Any], budget_on: str) -> int | None:
    """The analytic figure the budget would apply to (measured_size of the row's estimate)."""
    return measured_size(dict(row, status="estimated"), budget_on)


# --verify needed (the default) measures a row only if its analytic figure is within VERIFY_MARGIN over the budget,
# plus VERIFY_SLACK_BYTES where the budget is on memory. Analytic figures over-state verified ones only by a few MB:
# on every committed plan by at most 8.4 MB (3%: ComplexNet's prune50-int4-g128 on torch, 329.7 against 321.3 MB);
# at most 9.6 MB anywhere measured, ExecuTorch's first-use cost, which a small convolution net does not pay again in
# full (MobileNetV2 8da4w, 31.4 against 23.0 MB: +37% of a small figure). Disk is within 2% everywhere, and torch's
# runtime sits below its verified figure (docs/memory-model.md, "How far to trust an estimate"). A row estimated
# further over cannot fit once measured, so it stays `estimated` and --verify all measures it. (The 40% margin
# before verified ComplexNet's two torch int4 rows, 23% over analytic and 24-26% measured: 41 s of jobs for nothing.)
VERIFY_MARGIN = 0.10
VERIFY_SLACK_BYTES = 16_000_000
# A lower bound (the file, for a runtime whose memory is not modelled) errs only by the analytic file size's error,
# within 0.2% of the verified file in every committed result: a row whose bound is over the budget by more than this
# cannot fit. (With the 40% margin, ComplexNet's two ONNX int8 rows, 590 MB at least, took 3 minutes of builds.)
LOWER_BOUND_MARGIN = 0.05
VERIFY_MODES = ("needed", "all")


def lower_bound_size(row: dict[str, Any], budget_on: str) -> int | None:
    """The analytic figure the budget would apply to or, for a runtime whose memory is not modelled (ONNX
    Runtime), a lower bound of it: a runtime holds at least its file's bytes (verified ONNX Runtime rows held
    1.45x their file, TinyLlama float32, to 36x, a tiny ConvNet); None when neither is known."""
    size = analytic_size(row, budget_on)
    disk = row.get("analytic_disk_bytes")
    if size is None and budget_on != "disk" and row.get("analytic_runtime_bytes") is None and disk is not None:
        size = analytic_size(dict(row, analytic_runtime_bytes=disk), budget_on)
    return size


def could_fit(row: dict[str, Any], budget_bytes: int, budget_on: str) -> bool:
    """Whether a row's analytic figure (within VERIFY_MARGIN and, on memory, VERIFY_SLACK_BYTES) or its lower
    bound (within LOWER_BOUND_MARGIN) leaves room to fit the budget once verified; a row without either could fit
    (nothing rules it out)."""
    size = lower_bound_size(row, budget_on)
    if size is None:
        return True
    if analytic_size(row, budget_on) is None:
        return size <= budget_bytes * (1 + LOWER_BOUND_MARGIN)
    slack = VERIFY_SLACK_BYTES if budget_on != "disk" else 0  # the few MB are memory's (first-use costs)
    return size <= budget_bytes * (1 + VERIFY_MARGIN) + slack


def ruled_out_note(row: dict[str, Any], budget_bytes: int, budget_on: str) -> str:
    """The note of a row --verify needed did not measure."""
    size = lower_bound_size(row, budget_on) or 0
    what = "analytic" if analytic_size(row, budget_on) is not None else "at least its analytic file size"
    return (f"not verified: exceeds the budget by {size / budget_bytes - 1:.0%} ({what}, {size / 1e6:.1f} MB on "
            f"{budget_on}); --verify all measures it")


# Within this share of the budget a verified figure is flagged: resident memory moves by a few percent between
# identical fresh processes (glibc's arenas, the page cache), so such a row may fit on one run and not the next.
NEAR_MISS_SHARE = 0.02


def budget_verdict_note(row: dict[str, Any], budget_bytes: int, budget_on: str) -> str | None:
    """A verified row whose estimate and measurement disagree about fitting, or that lands within
    NEAR_MISS_SHARE of the budget, says so; None otherwise."""
    if row.get("status") != "verified":
        return None
    verified, analytic = measured_size(row, budget_on), analytic_size(row, budget_on)
    if verified is None:
        return None
    if analytic is not None and (analytic <= budget_bytes) != (verified <= budget_bytes):
        said = "fits" if analytic <= budget_bytes else "does not fit"
        found = "misses it" if verified > budget_bytes else "fits"
        return (f"the estimate said it {said} the budget ({analytic / 1e6:.1f} MB); verified, it {found} "
                f"({verified / 1e6:.1f} MB against {budget_bytes / 1e6:.1f} MB)")
    if abs(verified - budget_bytes) <= NEAR_MISS_SHARE * budget_bytes:
        return (f"near the budget: verified {verified / 1e6:.1f} MB against {budget_bytes / 1e6:.1f} MB, within "
                f"{NEAR_MISS_SHARE:.0%}; identical processes differ by a few percent")
    return None


def fits(row: dict[str, Any], budget_bytes: int, budget_on: str) -> bool:
    size = measured_size(row, budget_on)
    return size is not None and size <= budget_bytes


def prior_quality(row: dict[str, Any]) -> tuple[float, float]:
    """For rows whose quality was not measured (estimated): less pruned, then more weight bytes kept (less
    compression) first; a rule of thumb, which is why only verified rows carry SQNR."""
    return (float(row.get("pruned_share") or 0.0), -float(row.get("analytic_weight_bytes") or 0))


def quality(row: dict[str, Any]) -> float:
    """Higher is better: SQNR in dB (inf for an exact match); unknown quality sorts last."""
    sqnr = row.get("sqnr_db")
    if sqnr is None or (isinstance(sqnr, float) and math.isnan(sqnr)):
        return -math.inf
    return float(sqnr)


def rank_rows(rows: list[dict[str, Any]], budget_bytes: int, budget_on: str) -> list[dict[str, Any]]:
    """Fitting rows first by least quality loss then size (estimated rows, whose quality is unknown, by
    prior_quality); then the rest, closest to the budget first; rows without a figure last. Each returned
    row carries `fits` and `rank`."""
    if budget_on not in BUDGET_TARGETS:
        raise ValueError(f"budget_on must be one of {BUDGET_TARGETS}")

    def key(row: dict[str, Any]) -> tuple[int, float, float, float, str, str]:
        size = measured_size(row, budget_on)
        name, backend = row["recipe"], row.get("backend", "torch")
        if size is None:
            return (3, 0.0, 0.0, 0.0, name, backend)
        if size <= budget_bytes:
            if row.get("status") == "estimated":
                return (1, *prior_quality(row), float(size), name, backend)
            return (0, -quality(row), float(size), 0.0, name, backend)
        return (2, float(size), -quality(row), 0.0, name, backend)

    ranked = sorted(rows, key=key)
    return [dict(row, fits=fits(row, budget_bytes, budget_on), rank=index + 1) for index, row in enumerate(ranked)]


# Below this output SQNR (about 30% relative RMS error) a pick is flagged: its outputs are far from the float32
# model's on the example input, whatever the budget says (BERT-base's int4 pick measured 2.7 dB).
LOW_SQNR_DB = 10.0


def low_quality_warning(row: dict[str, Any]) -> str | None:
    """A warning for a verified pick whose outputs are far from float32; None otherwise."""
    sqnr = row.get("sqnr_db")
    if row.get("status") != "verified" or not isinstance(sqnr, int | float) or not math.isfinite(sqnr):
        return None
    if sqnr >= LOW_SQNR_DB:
        return None
    return (f"the pick's outputs are far from float32's (SQNR {sqnr:.1f} dB on the example input, below "
            f"{LOW_SQNR_DB:.0f} dB): judge it with your own metric (--eval module:fn) before deploying it")


def meets_quality(row: dict[str, Any], min_sqnr_db: float | None) -> bool:
    """A row meets --min-sqnr when none is given, or when its output SQNR was measured at or above it."""
    return min_sqnr_db is None or (row.get("status") == "verified" and quality(row) >= min_sqnr_db)


def quality_floor_note(row: dict[str, Any], min_sqnr_db: float | None) -> str | None:
    """The note of a row that fits the budget but not --min-sqnr (it is not picked); None otherwise."""
    if min_sqnr_db is None or not row.get("fits") or meets_quality(row, min_sqnr_db):
        return None
    sqnr = row.get("sqnr_db")
    measured = f"SQNR {sqnr:.1f} dB" if isinstance(sqnr, int | float) else "quality not measured"
    return f"fits, but not picked: {measured}, below --min-sqnr {min_sqnr_db:g} dB"


def pick_row(ranked: list[dict[str, Any]], min_sqnr_db: float | None = None) -> dict[str, Any] | None:
    """The first fitting row of a ranked list that meets the quality floor, or None."""
    return next((row for row in ranked if row.get("fits") and meets_quality(row, min_sqnr_db)), None)


def pick(ranked: list[dict[str, Any]]) -> str | None:
    """The recipe name of the pick, or None."""
    row = pick_row(ranked)
    return row["recipe"] if row else None


def closest(ranked: list[dict[str, Any]], budget_on: str) -> dict[str, Any] | None:
    """The smallest verified (or estimated) row, shown when nothing fits."""
    verified = [row for row in ranked if measured_size(row, budget_on) is not None]
    return min(verified, key=lambda row: measured_size(row, budget_on) or 0, default=None)
