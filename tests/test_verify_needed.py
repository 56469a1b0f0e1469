"""--verify needed (the default): the analytic table first, then only the rows that could fit are verified; the
pick and its figures are those of --verify all."""

import io
import json

import pytest

from planner.cli import commands
from planner.cli.commands import main
from planner.core import rank

FACTORY = """
import torch
from torch import nn

def build():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 512))
    return model, torch.randn(4, 512)
"""
# fp32 8.4 MB, fp16 4.2 MB, int8 2.1 MB, int4 about 1.2 MB on disk: fp16 is 68% over 2.5 MB, past VERIFY_MARGIN.
PLAN = ["--budget", "2.5MB", "--budget-on", "disk", "--backend", "torch",
        "--recipes", "fp32,fp16,int8-dynamic,int4-g128"]


def test_could_fit_allows_the_margin_and_rules_out_beyond_it() -> None:
    row = {"status": "estimated", "analytic_disk_bytes": 1_080_000}
    assert rank.could_fit(row, 1_000_000, "disk")
    assert not rank.could_fit(dict(row, analytic_disk_bytes=1_000_000 * (1 + rank.VERIFY_MARGIN) + 1), 1_000_000,
                              "disk")
    # on memory, a few MB more: first-use costs a small model does not pay again in full
    on_device = {"status": "estimated", "analytic_runtime_bytes": 30_000_000, "device_framework_bytes": 0}
    assert rank.could_fit(on_device, 23_000_000, "device") and not rank.could_fit(on_device, 12_000_000, "device")
    big = dict(on_device, analytic_runtime_bytes=627_600_000)  # ComplexNet int4-g128 on torch, 23% over 512 MB
    assert not rank.could_fit(big, 512_000_000, "device")
    assert rank.could_fit({"status": "estimated", "analytic_disk_bytes": None}, 1_000_000, "disk")  # unknown: verify
    note = rank.ruled_out_note(dict(row, analytic_disk_bytes=2_000_000), 1_000_000, "disk")
    assert "exceeds the budget by 100%" in note and "--verify all" in note
    # a runtime whose memory is not modelled (ONNX Runtime) holds at least its file, plus its framework on device
    unmodelled = {"status": "estimated", "analytic_disk_bytes": 300_000_000, "analytic_runtime_bytes": None,
                  "device_framework_bytes": 60_000_000}
    assert not rank.could_fit(unmodelled, 200_000_000, "device")
    assert rank.could_fit(unmodelled, 360_000_000, "device")
    # a bound is only off by the file size's error: 10% over is ruled out, where an analytic figure is not
    assert not rank.could_fit(unmodelled, 327_000_000, "device")
    assert rank.could_fit(dict(row, analytic_disk_bytes=1_100_000), 1_000_000, "disk")
    assert rank.could_fit(unmodelled, int(360_000_000 / (1 + rank.LOWER_BOUND_MARGIN)) + 1, "device")
    assert "at least its analytic file size, 360.0 MB on device" in rank.ruled_out_note(unmodelled, 200_000_000,
                                                                                         "device")


@pytest.fixture(scope="module")
def plans(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict, str]]:
    root = tmp_path_factory.mktemp("needed")
    (root / "mlp.py").write_text(FACTORY)
    results = {}
    for mode in ("needed", "all"):
        buffer = io.StringIO()
        # Reset to None afterwards, not to the value read now: that is this test's captured stdout (see
        # test_executors), and later tests would print into it.
        commands.console.file = buffer
        try:
            assert main(["plan", f"{root / 'mlp.py'}:build", *PLAN, "--verify", mode, "--out", str(root / mode)]) == 0
        finally:
            commands.console.file = None
        results[mode] = (json.loads((root / mode / "plan.json").read_text()), buffer.getvalue())
    return results


def test_only_rows_that_could_fit_are_verified(plans: dict[str, tuple[dict, str]]) -> None:
    plan, printed = plans["needed"]
    rows = {row["recipe"]: row for row in plan["rows"]}
    assert rows["fp32"]["status"] == "verified"  # the reference: every SQNR is measured against it
    assert rows["int8-dynamic"]["status"] == "verified" and rows["int4-g128"]["status"] == "verified"
    assert rows["fp16"]["status"] == "estimated" and rows["fp16"]["fits"] is False
    assert "not verified: exceeds the budget by" in rows["fp16"]["note"] and "--verify all" in rows["fp16"]["note"]
    assert rows["fp16"]["verified_disk_bytes"] is None and rows["fp16"]["sqnr_db"] is None
    # the analytic table comes first, before the verified one
    words = " ".join(printed.split())  # the tables wrap at the console's width
    assert "analytic estimates against 2.5 MB on disk; verifying 3 of 4" in words
    assert words.index("analytic estimates") < words.index("budget 2.5 MB on disk")


def test_the_pick_is_the_one_verify_all_makes(plans: dict[str, tuple[dict, str]]) -> None:
    needed, _ = plans["needed"]
    everything, _ = plans["all"]
    assert needed["pick"] == everything["pick"] == "int8-dynamic"
    all_rows = {row["recipe"]: row for row in everything["rows"]}
    assert all(row["status"] == "verified" for row in all_rows.values())
    # the row left out could not have fitted: measured, it is over the budget too
    assert all_rows["fp16"]["verified_disk_bytes"] > everything["budget_bytes"]
    for row in needed["rows"]:
        if row["status"] == "verified":
            assert row["verified_disk_bytes"] == all_rows[row["recipe"]]["verified_disk_bytes"]
