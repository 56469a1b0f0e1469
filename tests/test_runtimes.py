"""The Runtime interface and evaluate(recipe, runtime): one row shape whatever the runtime, one logged reason per
refusal, a build failure as a row. A fake runtime stands in for a real one: nothing is built or run."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from planner.analysis.footprint import Footprint
from planner.models.sources import resolve_source
from planner.plan.pipeline import evaluate
from planner.recipes.recipe import Recipe
from planner.runtimes.base import Artifact, BuildFailed, PlanContext, Runtime
from planner.runtimes.registry import RUNTIMES, create
from planner.runtimes.rows import PlanOptions


class FakeRuntime(Runtime):
    name = "fake"

    def __init__(self, refuse: str | None = None, fail: str | None = None) -> None:
        self.refuse, self.fail, self.built = refuse, fail, 0

    def touches(self, recipe: Recipe) -> str:
        return "everything"

    def unsupported(self, recipe: Recipe, source: Any, footprint: Footprint) -> str | None:
        return self.refuse

    def analytic(self, recipe: Recipe, footprint: Footprint) -> dict[str, Any]:
        return {"analytic_disk_bytes": footprint.disk_bytes}

    def build(self, recipe: Recipe, context: PlanContext) -> Artifact:
        self.built += 1
        if self.fail:
            raise BuildFailed("failed", self.fail)
        path = context.workdir / f"{recipe.name}.bin"
        path.write_bytes(b"x" * 1000)
        return Artifact([path], notes=["built"])

    def measure(self, artifact: Artifact, recipe: Recipe, context: PlanContext) -> dict[str, Any]:
        return {"status": "verified", "verified_runtime_bytes": 5000, "sqnr_db": 30.0, "latency_ms": 1.0,
                "note": "; ".join(artifact.notes)}

    def warm_up(self) -> None:
        pass


def _context(tmp_path: Path) -> PlanContext:
    options = PlanOptions(budget_bytes=10_000, framework_bytes={"fake": 100})
    return PlanContext(resolve_source("zoo:simplenet"), options, tmp_path, tmp_path / "fp32.pt",
                       {"latency_ms": 1.0, "reference_max_abs": 1.0})


FOOTPRINT = Footprint(recipe="r", layers=[], weight_bytes=900, disk_bytes=1000, activation_bytes=100)


def test_a_built_artifact_is_measured_and_set_beside_the_analytic_figures(tmp_path: Path) -> None:
    row = evaluate(Recipe("r"), FakeRuntime(), FOOTPRINT, _context(tmp_path))
    assert row["backend"] == "fake" and row["status"] == "verified" and row["note"] == "built"
    assert row["analytic_disk_bytes"] == row["verified_disk_bytes"] == 1000 and row["disk_diff"] == 0
    assert row["fits"] and row["framework_bytes"] == 100 and row["artifact"] == str(tmp_path / "r.bin")


def test_a_refusal_is_one_logged_reason_and_nothing_is_built(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                                             ) -> None:
    runtime = FakeRuntime(refuse="needs a GPU")
    with caplog.at_level(logging.INFO, logger="planner.runtimes"):
        row = evaluate(Recipe("r"), runtime, FOOTPRINT, _context(tmp_path))
    assert runtime.built == 0 and row["status"] == "unsupported" and row["note"] == "needs a GPU"
    assert [record.getMessage() for record in caplog.records] == ["fake refuses r: needs a GPU"]
    assert row["verified_disk_bytes"] is None and row["analytic_disk_bytes"] == 1000 and not row["fits"]


def test_a_build_failure_is_a_row(tmp_path: Path) -> None:
    row = evaluate(Recipe("r"), FakeRuntime(fail="exporter crashed"), FOOTPRINT, _context(tmp_path))
    assert row["status"] == "failed" and row["note"] == "exporter crashed" and row["sqnr_db"] is None


def test_every_registered_runtime_is_a_runtime_under_its_own_name() -> None:
    assert set(RUNTIMES) == {"torch", "onnxruntime", "executorch"}
    for name in RUNTIMES:
        runtime = create(name)
        assert isinstance(runtime, Runtime) and runtime.name == name
        assert create(name) is not runtime  # one per plan: a runtime keeps what its rows share
