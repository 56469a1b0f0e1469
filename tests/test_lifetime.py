"""The verified runtime is the lifetime peak (load, first forward, steady forward), checked against an independent
fresh-process measurement; the arithmetic behind it; and a model whose float32 output is not finite."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from planner.baseline import first_use_extras, layer_families
from planner.footprint import Footprint, lifetime_peak
from planner.verify import MEASUREMENT_ENV, LifetimePeaks, RunMeasurement, compare_outputs, lifetime_peaks

ROOT = Path(__file__).resolve().parents[1]
MEASURER = ROOT / "scripts" / "measure_lifetime.py"


def planner(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "planner.cli", *args], capture_output=True, text=True, timeout=600,
                          cwd=ROOT)


def independent_lifetime(folder: Path, malloc_env: dict[str, str]) -> dict:
    """scripts/measure_lifetime.py in a fresh process: VmHWM over load + two forwards, minus VmRSS before."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_")}
    done = subprocess.run([sys.executable, str(MEASURER), str(folder)], capture_output=True, text=True, timeout=300,
                          env=dict(env, **malloc_env), cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


# ---- against an independent measurement ----


@pytest.fixture(scope="module")
def convnet_plan(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("lifetime")
    out, export = root / "out", root / "export"
    done = planner("plan", "tests/lifetime_models.py:complexnet_64", "--budget", "2GB", "--backend", "torch",
                   "--recipes", "fp32,bf16", "--out", str(out), "--export", str(export), "--export-all")
    assert done.returncode == 0, done.stdout + done.stderr
    return out, export


@pytest.mark.parametrize("malloc_env", [MEASUREMENT_ENV, {}], ids=["planner-malloc", "glibc-defaults"])
def test_verified_runtime_is_an_independent_measurement_of_load_and_two_forwards(
        convnet_plan: tuple[Path, Path], malloc_env: dict[str, str]) -> None:
    out, export = convnet_plan
    rows = {row["recipe"]: row for row in json.loads((out / "plan.json").read_text())["rows"]}
    # glibc's own defaults cache freed blocks (dynamic mmap threshold): checked on one row to keep the test short
    for name in ("fp32", "bf16") if malloc_env else ("fp32",):
        row = rows[name]
        assert row["status"] == "verified", row
        assert row["verified_runtime_bytes"] > 60e6  # well above resident-memory noise
        measured = independent_lifetime(export / name, malloc_env)
        assert row["verified_runtime_bytes"] == pytest.approx(measured["lifetime_peak_bytes"], rel=0.05), (
            name, row, measured)


def test_the_three_phase_peaks_are_reported_and_the_runtime_is_their_largest(convnet_plan: tuple[Path, Path]) -> None:
    out, _ = convnet_plan
    rows = json.loads((out / "plan.json").read_text())["rows"]
    header = (out / "plan.csv").read_text().splitlines()[0].split(",")
    for phase in ("load", "first_forward", "steady"):
        assert f"verified_{phase}_peak_bytes" in header and f"analytic_{phase}_peak_bytes" in header
    for row in rows:
        peaks = [row[f"verified_{phase}_peak_bytes"] for phase in ("load", "first_forward", "steady")]
        assert row["verified_runtime_bytes"] == max(peaks)
        assert row["analytic_runtime_bytes"] == max(row[f"analytic_{phase}_peak_bytes"]
                                                    for phase in ("load", "first_forward", "steady"))
        # The load holds the weights (no transient copy for a plain state dict) and the forwards hold more.
        assert row["verified_load_peak_bytes"] >= 0.95 * row["verified_weight_resident_bytes"]
        assert row["verified_steady_peak_bytes"] > row["verified_load_peak_bytes"]
        # The analytic model targets the same lifetime figure (first-use costs included).
        assert row["analytic_runtime_bytes"] == pytest.approx(row["verified_runtime_bytes"], rel=0.05), row
    assert "first fwd peak" in (out / "plan.md").read_text()


# ---- the arithmetic ----


def run_measurement(first_peak: int, warm_peak: int, warm_growth: int) -> RunMeasurement:
    return RunMeasurement(output=None, first_ms=1.0, first_peak=first_peak, warm_peak=warm_peak,
                          warm_growth=warm_growth, latency_ms=1.0, runs=1)


def test_lifetime_peaks_are_high_water_marks_over_one_baseline() -> None:
    peaks = lifetime_peaks(baseline=1000, load_hwm=1600, measured=run_measurement(1900, 1850, 200))
    assert peaks == LifetimePeaks(load=600, first_forward=900, steady=850)
    assert peaks.lifetime == 900
    assert peaks.fields() == {"verified_runtime_bytes": 900, "verified_load_peak_bytes": 600,
                              "verified_first_forward_peak_bytes": 900, "verified_steady_peak_bytes": 850}
    # A loader whose transient copy outgrows every forward sets the figure.
    assert lifetime_peaks(1000, 3000, run_measurement(1900, 1850, 200)).lifetime == 2000


def test_analytic_runtime_is_the_largest_modelled_phase() -> None:
    footprint = Footprint("r", [], weight_bytes=100, disk_bytes=0, activation_bytes=30, first_forward_extra_bytes=12,
                          steady_extra_bytes=10, load_transient_bytes=5)
    assert (footprint.load_peak_bytes, footprint.first_forward_peak_bytes, footprint.steady_peak_bytes) == \
        (105, 142, 140)
    assert footprint.runtime_bytes == 142
    footprint.load_transient_bytes = 100  # e.g. a sparse artifact densified at load
    assert footprint.runtime_bytes == 200
    assert Footprint("r", [], weight_bytes=100, disk_bytes=0).runtime_bytes is None  # no trace, no lifetime
    assert lifetime_peak(500, None, None) is None and lifetime_peak(None, 3, 4) == 4


def test_first_use_extras_leave_out_the_tiny_models_weights_and_activations() -> None:
    # baseline 1000; the tiny model's weights 10, its warm forward grows 5 over its start; the first forward left
    # 40 resident (code pages, primitive caches) and peaked 3 above that.
    extras = first_use_extras(baseline=1000, first_peak=1000 + 10 + 40 + 5 + 3, warm_peak=1000 + 10 + 40 + 5,
                              warm_growth=5, weights=10)
    assert extras == {"first_forward": 43, "steady": 40}
    assert first_use_extras(1000, 900, 900, 0, 0) == {"first_forward": 0, "steady": 0}  # never negative


def test_kernel_families_come_from_layer_class_names() -> None:
    assert layer_families({"GPT2LMHeadModel", "GPT2Attention", "Conv1D", "LayerNorm", "Embedding", "Dropout"}) == \
        ("attention", "embedding", "linear", "norm")
    assert layer_families({"Conv2d", "MaxPool2d", "Linear", "BatchNorm2d"}) == ("conv", "linear", "norm")
    assert layer_families({"LSTM", "Linear"}) == ("linear", "rnn")


def test_a_non_finite_reference_gives_no_quality_figure() -> None:
    reference = [torch.tensor([[1.0, float("nan")]])]
    figures = compare_outputs(reference, [torch.tensor([[1.0, 2.0]])])
    assert figures["reference_finite"] is False
    assert figures["sqnr_db"] is None and figures["max_abs_error"] is None and figures["top1_agreement"] is None
    assert compare_outputs([torch.ones(2, 3)], [torch.ones(2, 3)])["reference_finite"] is True


# ---- a model whose float32 output is not finite ----


def test_a_non_finite_float32_output_is_a_verdict_not_a_crash(tmp_path: Path) -> None:
    factory = tmp_path / "nan_model.py"
    factory.write_text(
        "import torch\nfrom torch import nn\n\n\ndef build():\n    torch.manual_seed(0)\n"
        "    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))\n"
        "    with torch.no_grad():\n        model[0].weight[0, 0] = float('nan')\n"
        "    return model.eval(), torch.randn(2, 16)\n")
    out = tmp_path / "out"
    done = planner("plan", f"{factory}:build", "--budget", "1GB", "--backend", "torch", "--recipes", "fp32,bf16",
                   "--out", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    rows = json.loads((out / "plan.json").read_text())["rows"]
    assert {row["recipe"] for row in rows} == {"fp32", "bf16"}
    note = "the float32 reference output is not finite (NaN/inf), so no quality figure can be computed"
    for row in rows:
        assert row["status"] == "verified", row
        assert row["sqnr_db"] is None and row["max_abs_error"] is None and row["top1_agreement"] is None
        assert row["verified_runtime_bytes"] > 0 and row["verified_disk_bytes"] > 0 and row["latency_ms"] > 0
        assert math.isfinite(row["latency_ms"]) and note in row["note"]
    after_table = done.stdout.split("runtime terms", 1)[1]
    assert "warning" in after_table and note in " ".join(after_table.split())
