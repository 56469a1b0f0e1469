"""The measured twin of planner.analysis.training: real training steps in a fresh process, and the row of
`planner inspect --mode train` that sets them beside the analytic figures (training_row).

The parent starts `python -m planner.analysis.train_verify JOB.json RESULT.json` once per (batch, dtype, optimizer),
with the
same malloc settings as the torch worker (freed blocks go straight back to the OS). The process:

1. imports torch, warms the framework up with two tiny training steps of the same optimizer and a tiny backward
   through convolution, attention and LSTM (thread pools, oneDNN initialisation, autograd engine: first-use
   costs of the framework, which the torch worker also keeps in the baseline), and builds the example input;
2. builds the model with real (random or given) weights and constructs the optimizer (no state yet: torch creates
   it in the first step): resident parameters = RSS growth;
3. runs one forward without autograd and takes the baseline RSS. What that forward leaves resident is the model's
   own lazy initialisation (transformers imports code on its first forward, kernels pick implementations): like
   the torch worker, it is kept out of the steps and reported (first_forward_kept_bytes);
4. runs TRACED_STEPS training steps (planner.analysis.training.train_step, the very function the analytic trace runs),
   each from a reset high-water mark (/proc/self/clear_refs): step k's peak = parameters + VmHWM - baseline.

Step 1 includes the creation of the optimizer state; step 2 starts with it resident (the steady state).
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from planner.analysis.training import not_trainable_reason, training_footprint
from planner.core.errors import PlannerError
from planner.core.units import format_bytes, relative_difference
from planner.measure.isolation import Limits, run_worker
from planner.measure.library import MEASUREMENT_ENV, proc_status_bytes, release_freed_memory, reset_peak
from planner.measure.worker import worker_main
from planner.recipes.recipe import Recipe

LAZY_INIT_NOTE_BYTES = 1000**2  # a model's first-forward initialisation above this is said in the note


def _warm_up(optimizer_name: str, dtype: Any) -> None:
    import torch

    from planner.analysis.scratch import warm_up_kernels
    from planner.analysis.training import make_optimizer, train_step

    warm_up_kernels()
    layer = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).to(dtype)
    x = torch.randn(4, 64, dtype=dtype)
    optimizer = make_optimizer(optimizer_name, list(layer.parameters()))
    for _ in range(2):
        train_step(lambda: layer(x), optimizer)


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    from planner.analysis.footprint import cast_inputs
    from planner.analysis.training import make_optimizer, train_step
    from planner.models.sources import ModelSource
    from planner.recipes.recipe import DTYPES

    dtype = DTYPES[job["dtype"]]
    torch.manual_seed(0)
    release_freed_memory()
    before_warm_up = proc_status_bytes("VmRSS")
    _warm_up(job["optimizer"], dtype)
    release_freed_memory()
    warm_up_bytes = proc_status_bytes("VmRSS") - before_warm_up
    source = ModelSource.from_json(job["source"])
    inputs = cast_inputs(source.example_inputs(), dtype)
    release_freed_memory()
    before_model = proc_status_bytes("VmRSS")
    model = source.build("cpu").to(dtype).train()
    optimizer = make_optimizer(job["optimizer"], [p for p in model.parameters() if p.requires_grad])
    release_freed_memory()
    loaded = proc_status_bytes("VmRSS")
    params_resident = loaded - before_model
    with torch.no_grad():
        model(*inputs)
    release_freed_memory()
    baseline = proc_status_bytes("VmRSS")
    steps = []
    exact = True
    for _ in range(job["steps"]):
        release_freed_memory()
        exact = reset_peak() and exact
        start = proc_status_bytes("VmRSS")
        started = time.perf_counter()
        train_step(lambda: model(*inputs), optimizer)
        seconds = time.perf_counter() - started
        peak = proc_status_bytes("VmHWM")
        steps.append({"peak_bytes": params_resident + peak - baseline,
                      "start_bytes": params_resident + start - baseline, "seconds": seconds})
    return {"param_resident_bytes": params_resident, "baseline_rss_bytes": baseline, "steps": steps,
            "framework_warm_up_bytes": warm_up_bytes, "first_forward_kept_bytes": baseline - loaded,
            "peak_is_exact": exact}


@dataclass
class MeasuredTraining:
    step_peaks: list[int] | None  # parameters resident + peak growth of each step over the baseline
    param_resident_bytes: int | None
    failure: str | None = None
    first_forward_kept_bytes: int = 0  # lazy initialisation of the model's first forward (not in the steps)


def measure_training(source_json: dict[str, Any], dtype: str, optimizer: str, steps: int, *,
                     timeout_s: float = 900.0, memory_cap_bytes: int | None = None) -> MeasuredTraining:
    """Run the worker isolated (planner.measure.isolation.run_worker) and return its step peaks or why it failed."""
    options = Limits(timeout_s) if memory_cap_bytes is None else Limits(timeout_s, memory_cap_bytes)
    job = {"source": source_json, "dtype": dtype, "optimizer": optimizer, "steps": steps}
    with tempfile.TemporaryDirectory(prefix="planner-train-") as workdir:
        result = run_worker(job, Path(workdir), "train", options, worker="planner.analysis.train_verify",
                            allocator_env=MEASUREMENT_ENV)
    if result.get("status") != "verified":
        return MeasuredTraining(None, None, result.get("note", "measurement failed"))
    return MeasuredTraining([step["peak_bytes"] for step in result["steps"]], result["param_resident_bytes"],
                            first_forward_kept_bytes=result["first_forward_kept_bytes"])


def training_row(source: Any, recipe: Recipe, batch: int, optimizer: str, verify: bool,
                 timeout_s: float = 900.0) -> dict[str, Any]:
    """One row of `planner inspect --mode train`: the analytic figures and, with verify, the measured steps.

    `source` is a planner.models.sources.ModelSource whose batch size is already `batch`.
    """
    row: dict[str, Any] = {"batch": batch, "recipe": recipe.name, "optimizer": optimizer}
    reason = not_trainable_reason(recipe)
    if reason:
        return dict(row, note=reason)
    try:
        report = training_footprint(source.build("meta"), source.example_inputs(), optimizer, recipe.torch_dtype)
    except PlannerError:
        raise
    except Exception as error:  # a model whose training step cannot be traced weightless still gets a row
        return dict(row, note=f"not traced ({type(error).__name__}: {str(error)[:160]})")
    notes = []
    if report.scratch_applied or report.kept_scratch_bytes:
        parts = [f"{op} up to {format_bytes(nbytes)}" for op, nbytes in sorted(report.scratch_applied.items())]
        if report.kept_scratch_bytes:
            parts.append(f"kept after first use {format_bytes(report.kept_scratch_bytes)}")
        notes.append("measured kernel scratch added (cached per machine): " + ", ".join(parts))
    if report.scratch_failure:
        notes.append(f"kernel scratch not measured: {report.scratch_failure}")
    if report.fused_ops:
        notes.append(f"fused kernels hide workspace (not counted): {', '.join(report.fused_ops)}")
    row.update({
        "params": report.param_bytes, "grads": report.grad_bytes, "optimizer state": report.optimizer_state_bytes,
        "saved activations": report.saved_activation_bytes,
        **{f"step {i + 1} peak": peak for i, peak in enumerate(report.step_peaks)},
        "peak in": report.peak_phase,
    })
    if verify:
        measured = measure_training(source.to_json(), recipe.dtype, optimizer, len(report.step_peaks),
                                    timeout_s=timeout_s)
        if measured.step_peaks is None:
            notes.append(f"measurement failed: {measured.failure}")
        elif measured.first_forward_kept_bytes > LAZY_INIT_NOTE_BYTES:
            notes.append(f"the model's first forward left {format_bytes(measured.first_forward_kept_bytes)} resident "
                         "(lazy initialisation): in the measured baseline, not in the steps")
        for i, peak in enumerate(measured.step_peaks or []):
            row[f"measured step {i + 1}"] = peak
            row[f"diff step {i + 1}"] = relative_difference(report.step_peaks[i], peak)
    row["note"] = "; ".join(notes)
    return row


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:], run_job))
