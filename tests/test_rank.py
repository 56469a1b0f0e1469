"""Ranking: fitting rows by quality then size, the pick, and the closest when nothing fits."""

import math

from hypothesis import given
from hypothesis import strategies as st

from planner.core import rank


def row(name: str, runtime: int | None, sqnr: float | None, status: str = "verified", disk: int = 1) -> dict:
    return {"recipe": name, "status": status, "verified_runtime_bytes": runtime, "verified_disk_bytes": disk,
            "sqnr_db": sqnr}


def test_fitting_rows_first_by_quality_then_size() -> None:
    rows = [row("int4", 300, 20.0), row("fp32", 2000, math.inf), row("int8", 600, 40.0), row("bf16", 450, 40.0),
            row("broken", None, None, status="failed"), row("prune", 320, 5.0)]
    ranked = rank.rank_rows(rows, budget_bytes=500, budget_on="runtime")
    assert [r["recipe"] for r in ranked] == ["bf16", "int4", "prune", "int8", "fp32", "broken"]
    assert [r["fits"] for r in ranked] == [True, True, True, False, False, False]
    assert [r["rank"] for r in ranked] == [1, 2, 3, 4, 5, 6]
    assert rank.pick(ranked) == "bf16"


def test_equal_quality_prefers_smaller() -> None:
    ranked = rank.rank_rows([row("a", 400, 30.0), row("b", 300, 30.0)], 500, "runtime")
    assert rank.pick(ranked) == "b"


def test_exact_match_beats_everything_that_fits() -> None:
    ranked = rank.rank_rows([row("fp16", 50, 80.0), row("fp32", 100, math.inf)], 1000, "runtime")
    assert rank.pick(ranked) == "fp32"


def test_nothing_fits_gives_no_pick_and_the_closest() -> None:
    ranked = rank.rank_rows([row("fp32", 2000, math.inf), row("int8", 600, 40.0)], 500, "runtime")
    assert rank.pick(ranked) is None
    assert rank.closest(ranked, "runtime")["recipe"] == "int8"


def test_budget_on_disk_uses_disk_bytes() -> None:
    rows = [row("int8w", 5000, 40.0, disk=400), row("fp32", 800, math.inf, disk=2000)]
    assert rank.pick(rank.rank_rows(rows, 500, "disk")) == "int8w"
    assert rank.pick(rank.rank_rows(rows, 1000, "runtime")) == "fp32"


def test_unverified_rows_never_fit() -> None:
    ranked = rank.rank_rows([row("cuda-only", 1, 99.0, status="unsupported")], 10**9, "runtime")
    assert rank.pick(ranked) is None and ranked[0]["fits"] is False


rows_strategy = st.lists(
    st.builds(row, st.text(min_size=1, max_size=5), st.one_of(st.none(), st.integers(0, 10**10)),
              st.one_of(st.none(), st.floats(allow_nan=True)), st.sampled_from(["verified", "failed", "unsupported"])),
    max_size=12)


@given(rows_strategy, st.integers(1, 10**10), st.sampled_from(rank.BUDGET_TARGETS))
def test_ranking_invariants(rows: list[dict], budget: int, budget_on: str) -> None:
    ranked = rank.rank_rows(rows, budget, budget_on)
    assert len(ranked) == len(rows)
    fits = [r["fits"] for r in ranked]
    assert fits == sorted(fits, reverse=True)  # every fitting row comes before every other
    chosen = rank.pick(ranked)
    if chosen is not None:
        best = ranked[0]
        assert best["fits"] and best["recipe"] == chosen
        assert all(rank.quality(best) >= rank.quality(r) for r in ranked if r["fits"])
    else:
        assert not any(fits)


def test_budget_on_device_adds_the_framework_baseline() -> None:
    # The same model on two runtimes: torch's own baseline is what makes it miss a small device.
    rows = [dict(row("fp32", 50, math.inf), backend="torch", framework_bytes=320),
            dict(row("fp32", 60, math.inf), backend="onnxruntime", framework_bytes=70)]
    assert [r["backend"] for r in rank.rank_rows(rows, 200, "device") if r["fits"]] == ["onnxruntime"]
    assert rank.measured_size(rows[0], "device") == 370
    assert rank.measured_size(dict(rows[0], framework_bytes=None), "device") is None  # unknown never fits
    assert all(r["fits"] for r in rank.rank_rows(rows, 200, "runtime"))


def test_budget_on_device_counts_an_unmeasured_device_runtime_as_the_model_alone() -> None:
    # ExecuTorch: the Python binding was measured (430) but a device loads the C++ runtime, which is not measured
    executorch = dict(row("fp32", 150, math.inf), backend="executorch", framework_bytes=430,
                      device_framework_bytes=None, device_framework_unmeasured=True)
    torch_row = dict(row("fp32", 50, math.inf), backend="torch", framework_bytes=320, device_framework_bytes=320)
    assert rank.measured_size(executorch, "device") == 150
    assert rank.measured_size(dict(executorch, device_framework_unmeasured=False), "device") is None
    assert [r["backend"] for r in rank.rank_rows([executorch, torch_row], 200, "device") if r["fits"]] == \
        ["executorch"]
    assert rank.DEFAULT_BUDGET_ON == "device"


def test_estimated_rows_rank_by_size_figures_and_least_compression() -> None:
    rows = [
        {"recipe": "int4", "status": "estimated", "analytic_runtime_bytes": 100, "analytic_weight_bytes": 50},
        {"recipe": "prune50", "status": "estimated", "analytic_runtime_bytes": 300, "analytic_weight_bytes": 200,
         "pruned_share": 0.5},
        {"recipe": "bf16", "status": "estimated", "analytic_runtime_bytes": 300, "analytic_weight_bytes": 200},
        {"recipe": "fp32", "status": "estimated", "analytic_runtime_bytes": 900, "analytic_weight_bytes": 400},
        {"recipe": "fp8-dynamic", "status": "unsupported", "analytic_runtime_bytes": 80},
    ]
    ranked = rank.rank_rows(rows, 500, "runtime")
    assert [r["recipe"] for r in ranked] == ["bf16", "int4", "prune50", "fp32", "fp8-dynamic"]
    assert [r["fits"] for r in ranked] == [True, True, True, False, False]
    assert rank.pick(ranked) == "bf16"
    # A verified row that fits outranks an estimate; the budget reads the verified figure there.
    verified = {"recipe": "int8", "status": "verified", "verified_runtime_bytes": 200, "analytic_runtime_bytes": 999,
                "sqnr_db": 30.0}
    assert rank.pick(rank.rank_rows([*rows, verified], 500, "runtime")) == "int8"


def test_a_verified_row_says_when_its_estimate_was_wrong_about_fitting() -> None:
    row = {"recipe": "int4", "status": "verified", "analytic_runtime_bytes": 99_000_000,
           "verified_runtime_bytes": 100_400_000}
    note = rank.budget_verdict_note(row, 100_000_000, "runtime")
    assert note is not None and "the estimate said it fits" in note and "misses it" in note
    note = rank.budget_verdict_note(dict(row, analytic_runtime_bytes=101_000_000, verified_runtime_bytes=99_000_000),
                                    100_000_000, "runtime")
    assert note is not None and "does not fit" in note and "verified, it fits" in note


def test_a_verified_row_near_the_budget_is_flagged_and_a_clear_one_is_not() -> None:
    row = {"recipe": "int4", "status": "verified", "analytic_runtime_bytes": 90_000_000,
           "verified_runtime_bytes": 99_000_000}
    assert "near the budget" in (rank.budget_verdict_note(row, 100_000_000, "runtime") or "")
    assert rank.budget_verdict_note(dict(row, verified_runtime_bytes=80_000_000), 100_000_000, "runtime") is None
    assert rank.budget_verdict_note(dict(row, status="estimated"), 100_000_000, "runtime") is None
    # On disk the disk figures decide.
    disk = {"recipe": "int8", "status": "verified", "analytic_disk_bytes": 99_500_000,
            "verified_disk_bytes": 100_500_000}
    assert "misses it" in (rank.budget_verdict_note(disk, 100_000_000, "disk") or "")


def test_a_pick_far_from_float32_is_warned_about() -> None:
    row = {"recipe": "int4", "status": "verified", "sqnr_db": 2.7}
    assert "SQNR 2.7 dB" in (rank.low_quality_warning(row) or "")
    assert rank.low_quality_warning(dict(row, sqnr_db=25.0)) is None
    assert rank.low_quality_warning(dict(row, sqnr_db=math.inf)) is None  # exact
    assert rank.low_quality_warning(dict(row, status="estimated", sqnr_db=None)) is None


def test_min_sqnr_keeps_rows_below_it_but_never_picks_them() -> None:
    rows = [dict(row("int4", 10, 8.0), backend="torch"), dict(row("int8", 40, 30.0), backend="torch"),
            dict(row("fp32", 90, math.inf), backend="torch")]
    ranked = rank.rank_rows(rows, 50, "runtime")
    assert rank.pick_row(ranked)["recipe"] == "int8"  # best quality among those that fit
    assert rank.pick_row(ranked, min_sqnr_db=35.0) is None  # int8 and int4 fit, neither is good enough
    assert rank.pick_row(rank.rank_rows(rows, 100, "runtime"), min_sqnr_db=35.0)["recipe"] == "fp32"
    note = rank.quality_floor_note(next(r for r in ranked if r["recipe"] == "int4"), 20.0)
    assert note is not None and "8.0 dB" in note and "--min-sqnr 20 dB" in note
    assert rank.quality_floor_note(next(r for r in ranked if r["recipe"] == "int8"), 20.0) is None
    assert not rank.meets_quality(dict(rows[2], status="estimated"), 0.0)  # an estimate has no measured quality
