"""A row's job: build one recipe on one runtime and verify it, as plain data that can run anywhere the plan's work
directory is visible (a thread of the planner, a Ray task on another machine).

The job holds no model and no runtime object: the recipe and the model source as JSON, the runtime's name and the
state its rows share (Runtime.job_state: ONNX Runtime's float32 export), the plan's options, the work directory,
the float32 reference's path and its verified figures. run_job makes a fresh runtime from them and runs its
build() and measure(), each in isolated processes; the planner then sets the row's figures (pipeline.evaluate).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from planner.models.sources import ModelSource
from planner.recipes.recipe import Recipe
from planner.runtimes.base import BuildFailed, PlanContext, Runtime
from planner.runtimes.registry import create
from planner.runtimes.rows import PlanOptions

# What must be in the work directory before any job runs (the reference's outputs and the example inputs): a task
# that cannot see them is on a machine without the plan's shared storage.
SHARED_FILES = ("inputs.pt", "reference.pt")


@dataclass(frozen=True)
class RowJob:
    label: str  # what the progress bar says while it runs: "applying int8-dynamic"
    recipe: dict[str, Any]  # Recipe.to_json()
    runtime: str
    runtime_state: dict[str, Any]  # Runtime.job_state()
    source: dict[str, Any]  # ModelSource.to_json()
    options: dict[str, Any]  # PlanOptions's fields
    workdir: str
    fp32_path: str
    reference: dict[str, Any]  # the float32 reference's verified row: quality baseline, latency ratio
    predicted_bytes: int  # the job's predicted peak (planner.plan.schedule.predicted_job_bytes)


@dataclass
class RowOutcome:
    """What a job made: the runtime's result (status, verified figures, note), the artifact's files, whether
    other rows share it (kept whatever the budget), and its bytes on disk when verified."""

    result: dict[str, Any]
    files: list[str] = field(default_factory=list)
    shared: bool = False
    disk_bytes: int | None = None


def make_job(recipe: Recipe, runtime: Runtime, context: PlanContext, predicted_bytes: int) -> RowJob:
    assert context.fp32_path is not None
    return RowJob(label=runtime.progress_label(recipe), recipe=recipe.to_json(), runtime=runtime.name,
                  runtime_state=runtime.job_state(), source=context.source.to_json(),
                  options=context.options.to_fields(), workdir=str(context.workdir),
                  fp32_path=str(context.fp32_path), reference=context.reference, predicted_bytes=predicted_bytes)


def build_and_measure(recipe: Recipe, runtime: Runtime, context: PlanContext) -> RowOutcome:
    """The runtime builds the recipe's artifact and measures it, each in isolated processes. The row keeps the
    wall seconds of each (build_s, verify_s): where a plan's time goes, row by row."""
    started = time.perf_counter()
    try:
        artifact = runtime.build(recipe, context)
    except BuildFailed as failure:
        return RowOutcome({"status": failure.status, "note": failure.note,
                           "build_s": round(time.perf_counter() - started, 2)})
    built = time.perf_counter()
    result = runtime.measure(artifact, recipe, context)
    if artifact.measured is None:  # else the float32 reference's own result, with the reference's seconds
        result = {**result, "build_s": round(built - started, 2), "verify_s": round(time.perf_counter() - built, 2)}
    verified = result.get("status") == "verified"
    return RowOutcome(result, [str(path) for path in artifact.files], artifact.shared,
                      runtime.disk_bytes(artifact) if verified else None)


def missing_shared_files(workdir: str) -> list[str]:
    return [name for name in SHARED_FILES if not (Path(workdir) / name).exists()]


def run_job(job: RowJob, progress: Callable[[str], None] = lambda message: None) -> RowOutcome:
    """Run a job where it is: a fresh runtime with the plan's shared state, then build_and_measure."""
    runtime = create(job.runtime)
    runtime.restore_job_state(job.runtime_state)
    context = PlanContext(ModelSource.from_json(job.source), PlanOptions.from_fields(job.options), Path(job.workdir),
                          Path(job.fp32_path), job.reference, progress)
    return build_and_measure(Recipe.from_json(job.recipe), runtime, context)
