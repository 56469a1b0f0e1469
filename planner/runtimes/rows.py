"""A plan's row, the same shape for every runtime: the analytic figures beside their verified twins, the note
that explains them, and whether the row fits the budget (planner.core.rank).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from planner.analysis.generation import GenerationSpec
from planner.core import rank
from planner.core.units import format_bytes, relative_difference
from planner.measure.isolation import default_memory_cap

REFERENCE = "fp32"
# Below this, a runtime difference is allocator and framework noise rather than a modelling error.
RESOLUTION_BYTES = 2 * 1000**2
# A float32 output this small (random-init models with tiny weights) makes SQNR meaningless.
TINY_OUTPUT = 1e-4
# A recipe this many times slower than float32 deserves a word in the note.
SLOW_FACTOR = 5


@dataclass
class PlanOptions:
    budget_bytes: int
    budget_on: str = rank.DEFAULT_BUDGET_ON
    timeout_s: float = 900.0
    memory_cap_bytes: int | None = field(default_factory=default_memory_cap)
    backends: tuple[str, ...] = ("torch",)
    keep_all_artifacts: bool = False  # otherwise only those that fit the budget survive verification
    framework_bytes: dict[str, int | None] = field(default_factory=dict)  # per backend, set by run_plan
    # What a device holds for each runtime besides the model (Runtime.device_framework_bytes), set by run_plan;
    # the runtimes whose device cost is not measured here are listed in device_framework_unmeasured.
    device_framework_bytes: dict[str, int | None] = field(default_factory=dict)
    device_framework_unmeasured: tuple[str, ...] = ()
    mixed_budgets: tuple[str, ...] = ()  # a verified mixed:<budget> row for each (planner.plan.mixed_plan)
    calibration: str | None = None  # real inputs for the mixed-precision sensitivity pass
    mixed_dtype: str = "auto"  # the mixed recipes' float layers and activations: float32, bfloat16 or auto (both)
    eval_spec: str | None = None  # --eval module:fn, the user's quality function (planner.analysis.evalhook)
    analytic_only: bool = False  # rank the analytic figures alone: nothing is materialized or verified
    min_sqnr_db: float | None = None  # --min-sqnr: the pick must have at least this output SQNR
    verify: str = "needed"  # --verify: needed (rows whose estimate could fit the budget) or all (rank.VERIFY_MODES)
    generation: GenerationSpec | None = None  # --context/--generate: plan generate() at that context, not a forward

    def to_fields(self) -> dict[str, Any]:
        """Plain data for a job (planner.plan.jobs): from_fields is its inverse."""
        return dataclasses.asdict(self)

    @staticmethod
    def from_fields(fields: dict[str, Any]) -> PlanOptions:
        generation = fields.get("generation")
        return PlanOptions(**dict(fields, generation=GenerationSpec.from_json(generation) if generation else None))


def explain(row: dict[str, Any], analytic_notes: list[str], source_kind: str, reference: dict[str, Any],
            has_convolutions: bool = False) -> str:
    """The note column: what the recipe did, and why analytic and verified figures differ where they do."""
    notes = [row.pop("note", "")] if row.get("note") else []
    notes.append(row.pop("eval_error", ""))
    if row.get("status") == "unsupported":  # say why it did not run, not what it would have done
        notes += [note for note in analytic_notes if "left in" in note]
        return "; ".join(note for note in notes if note)
    notes += analytic_notes
    if row.get("status") == "verified":
        if (reference.get("reference_max_abs") or 0.0) < TINY_OUTPUT:
            notes.append(f"the float32 output is nearly zero (max |y| {reference.get('reference_max_abs', 0):.1e}): "
                         "SQNR and top-1 say little; check the model's initialisation or example input")
        slowdown = (row.get("latency_ms") or 0) / (reference.get("latency_ms") or math.inf)
        if slowdown >= SLOW_FACTOR:
            notes.append(f"{slowdown:.0f}× slower than float32 on this machine")
    diff = row.get("runtime_diff")
    if diff is not None and abs(diff) > 0.05:
        gap = abs((row.get("analytic_runtime_bytes") or 0) - (row.get("verified_runtime_bytes") or 0))
        if gap < RESOLUTION_BYTES:
            notes.append(f"runtime gap {format_bytes(gap)} is below the {format_bytes(RESOLUTION_BYTES)} "
                         "resolution of resident-memory measurement (allocator and kernel workspaces)")
        elif source_kind == "torchscript":
            notes.append(f"runtime differs by {format_bytes(gap)}: TorchScript's interpreter keeps graph executor "
                         "state the trace does not model")
        elif has_convolutions and diff < 0:
            # measured on MobileNetV2: oneDNN reorders a convolution's input or output into its own layout
            notes.append(f"runtime differs by {format_bytes(gap)}: likely convolution scratch (oneDNN layout "
                         "reorders, about one feature map per convolution) that the trace does not see")
        else:
            notes.append(f"runtime differs by {format_bytes(gap)}: not explained by the model (see README caveats)")
    return "; ".join(note for note in notes if note)


def keep_or_drop(row: dict[str, Any], files: list[Path], options: PlanOptions, keep_anyway: bool = False
                  ) -> dict[str, Any]:
    """Decide fits, and delete the artifact unless it may be exported (it can be gigabytes)."""
    row["framework_bytes"] = options.framework_bytes.get(row["backend"])
    row["device_framework_bytes"] = options.device_framework_bytes.get(row["backend"], row["framework_bytes"])
    if row["backend"] in options.device_framework_unmeasured:
        row["device_framework_unmeasured"] = True
    row["fits"] = rank.fits(row, options.budget_bytes, options.budget_on)
    verdict = rank.budget_verdict_note(row, options.budget_bytes, options.budget_on)
    row["note"] = "; ".join(filter(None, [row.get("note"), verdict]))
    row["artifact"] = None
    if row["status"] == "verified" and files and files[0].exists():
        if keep_anyway or options.keep_all_artifacts or row["fits"]:
            row["artifact"] = str(files[0])
        else:
            for path in files:
                path.unlink(missing_ok=True)
    return row


def set_figures(row: dict[str, Any], analytic: dict[str, Any], verified_disk: int | None) -> None:
    """Analytic figures beside their verified twins and the relative differences; a row that was not
    verified keeps no measurement (one shape for the torch and the ONNX Runtime rows)."""
    verified = row.get("status") == "verified"
    row.update(analytic)
    row["verified_disk_bytes"] = verified_disk if verified else None
    row["verified_runtime_bytes"] = row.get("verified_runtime_bytes") if verified else None
    row["disk_diff"] = relative_difference(row.get("analytic_disk_bytes"), row["verified_disk_bytes"])
    row["runtime_diff"] = relative_difference(row.get("analytic_runtime_bytes"), row["verified_runtime_bytes"])
    if not verified:
        for key in ("sqnr_db", "max_abs_error", "top1_agreement", "latency_ms"):
            row[key] = None
    elif row.get("sqnr_db") is not None and math.isnan(row["sqnr_db"]):
        row["sqnr_db"] = None
