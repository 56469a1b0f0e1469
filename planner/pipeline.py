"""The plan: describe the model → analytic footprint per recipe → apply, save, verify each → rank.

The planner process holds the float32 weights only as a memory-mapped file and one recipe's copy at
a time; every verification (planner.verify, planner.onnx_verify) and every ONNX build runs in a fresh
subprocess under a timeout and a memory cap (planner.isolation).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from planner import rank
from planner.activations import fake_forward
from planner.artifact import load_reference
from planner.baseline import framework_baseline
from planner.errors import PlannerError
from planner.footprint import Footprint
from planner.isolation import default_memory_cap, describe_exit, plan_workdir, report_stage, run_module_isolated
from planner.pages import MappedReference
from planner.pruning import artifact_state, prune_channels, pruning_footprint, resolve_recipe
from planner.recipes import PruneThresholds, Recipe, UnsupportedRecipe, apply_recipe, check_layer_overrides
from planner.safe_io import path_inside
from planner.sources import ModelSource
from planner.units import format_bytes, relative_difference
from planner.verify import MEASUREMENT_ENV, release_freed_memory, return_freed_memory_promptly

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
    budget_on: str = "runtime"
    timeout_s: float = 900.0
    memory_cap_bytes: int | None = field(default_factory=default_memory_cap)
    backends: tuple[str, ...] = ("torch",)
    keep_all_artifacts: bool = False  # otherwise only those that fit the budget survive verification
    framework_bytes: dict[str, int | None] = field(default_factory=dict)  # per backend, set by run_plan
    mixed_budgets: tuple[str, ...] = ()  # a verified mixed:<budget> row for each (planner.mixed_plan)
    calibration: str | None = None  # real inputs for the mixed-precision sensitivity pass
    mixed_dtype: str = "auto"  # the mixed recipes' float layers and activations: float32, bfloat16 or auto (both)
    eval_spec: str | None = None  # --eval module:fn, the user's quality function (planner.evalhook)
    analytic_only: bool = False  # rank the analytic figures alone: nothing is materialized or verified


@dataclass
class PlanResult:
    model: str
    budget_bytes: int
    budget_on: str
    rows: list[dict[str, Any]]  # ranked
    pick: str | None
    footprints: dict[str, Footprint]
    workdir: Path
    input_shapes: list[list[int]]
    input_note: str | None = None
    pick_backend: str | None = None

    def row(self, recipe: str, backend: str = "torch") -> dict[str, Any] | None:
        return next((r for r in self.rows if r["recipe"] == recipe and r.get("backend") == backend), None)

    def artifact(self, recipe: str, backend: str = "torch") -> Path | None:
        row = self.row(recipe, backend)
        path = row and row.get("artifact")
        return Path(path) if path and Path(path).exists() else None

    def cleanup(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


def artifact_format(source: ModelSource) -> str:
    return "torchscript" if source.kind == "torchscript" else "state_dict"


def _reference_recipe(recipes: list[Recipe]) -> Recipe:
    return next((r for r in recipes if r.name == REFERENCE), Recipe(REFERENCE, "float32 reference"))


def why_unsupported(recipe: Recipe, source: ModelSource, footprint: Footprint) -> str | None:
    """A reason the recipe cannot run on this model here, decided before any work."""
    if footprint.unsupported:
        return footprint.unsupported
    if recipe.prune and footprint.pruned_layers == 0:
        return f"no {'/'.join(recipe.prune_layers)} layer to prune: the row would repeat the unpruned model"
    scheme = recipe.scheme
    if scheme is None:
        return None
    missing = scheme.missing_kernel()
    if missing:
        return f"needs CUDA: {missing}; no GPU on this machine"
    if source.kind == "torchscript":
        return "torchao cannot quantize a TorchScript module; give a factory (file.py:build) or a .pt2"
    if footprint.quantized_layers == 0:
        return f"no {'/'.join(recipe.layers)} layer it can quantize"
    return None


def _save(model: torch.nn.Module, path: Path, fmt: str, recipe: Recipe | None = None,
          structure: dict[str, Any] | None = None) -> None:
    temporary = path.with_suffix(path.suffix + ".tmp")
    if fmt == "torchscript":
        torch.jit.save(model, str(temporary))
    else:
        torch.save(artifact_state(model, recipe, structure) if recipe else model.state_dict(), temporary)
    temporary.replace(path)


def run_worker(job: dict[str, Any], workdir: Path, name: str, options: PlanOptions,
                worker: str = "planner.verify") -> dict[str, Any]:
    """Run `python -m WORKER JOB RESULT` isolated; the result with status verified, or failed with the reason."""
    job_path, result_path = path_inside(workdir, f"{name}.job.json"), path_inside(workdir, f"{name}.result.json")
    job_path.write_text(json.dumps(job))
    scratch = workdir / "tmp"  # the worker's temporaries: removed with the work directory
    scratch.mkdir(exist_ok=True)
    outcome = run_module_isolated(worker, [str(job_path), str(result_path)], timeout_s=options.timeout_s,
                                  memory_cap_bytes=options.memory_cap_bytes, env=dict(os.environ, **MEASUREMENT_ENV),
                                  scratch_dir=scratch)
    result = json.loads(result_path.read_text()) if result_path.exists() and not outcome.failure else None
    if result is None or "error" in result or outcome.returncode != 0:
        reason = result["error"] if result and "error" in result else describe_exit(outcome)
        return {"status": "failed", "note": f"verification failed: {reason}"}
    if isinstance(result.get("sqnr_db"), str):
        result["sqnr_db"] = float(result["sqnr_db"])  # "inf" in JSON
    return dict(result, status="verified")


def _with_eval(result: dict[str, Any], job: dict[str, Any], workdir: Path, name: str, options: PlanOptions,
               progress: Callable[[str], None]) -> dict[str, Any]:
    """Add --eval's figure to a verified row. It runs in its own worker (planner.evalhook) after the
    measurement: a function that fails, hangs or exits costs the row only its eval figure, with a note."""
    if options.eval_spec is None or result.get("status") != "verified":
        return result
    from planner.evalhook import eval_job, failure_note

    progress(f"running --eval on {name} in a fresh process")
    evaluated = run_worker(eval_job(job, options.eval_spec), workdir, f"{name}.eval", options,
                           worker="planner.evalhook")
    if evaluated["status"] != "verified":
        return dict(result, eval_score=None, eval_error=failure_note(options.eval_spec, evaluated.get("note", "")))
    return dict(result, **{key: evaluated[key] for key in ("eval_score", "eval_error") if key in evaluated})


def _job(source: ModelSource, recipe: Recipe, artifact: Path, workdir: Path, save_reference: bool
         ) -> dict[str, Any]:
    return {
        "source": source.to_json(),
        "dtype": recipe.dtype,
        "artifact": str(artifact),
        "artifact_format": artifact_format(source),
        "inputs": str(workdir / "inputs.pt"),
        "reference": str(workdir / "reference.pt"),
        "save_reference": save_reference,
        "needs_torchao": recipe.quantizes,
        "recipe": recipe.to_json(),
    }


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


def _forward_error(model: torch.nn.Module, forward: Callable[[], Any]) -> str | None:
    """Run `forward` (a forward of `model`); on failure return 'layer NAME (Type): message' naming the
    innermost running layer."""
    running: list[str] = []
    names = {id(module): name for name, module in model.named_modules()}
    handles = []

    def enter(module: torch.nn.Module, args: Any) -> None:
        running.append(f"{names[id(module)] or '(top)'} ({type(module).__name__})")

    def leave(module: torch.nn.Module, args: Any, output: Any) -> None:
        running.pop()  # a hook that returned a value would replace the module's output

    if not isinstance(model, torch.jit.ScriptModule):
        for module in model.modules():
            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(leave))
    try:
        with torch.no_grad():
            forward()
        return None
    except Exception as error:
        message = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        return f"layer {running[-1]}: {message}" if running else message
    finally:
        for handle in handles:
            handle.remove()


def check_inputs_fit(source: ModelSource, meta_model: torch.nn.Module, inputs: tuple[torch.Tensor, ...],
                     confirm_on_real_weights: bool = True) -> None:
    """Reject an input the model cannot take before any work, naming the layer and the shapes.
    confirm_on_real_weights=False (an analytic-only plan) never builds the model with real weights."""
    on_meta = any(t.device.type == "meta" for t in meta_model.parameters())
    if on_meta:
        # Fake tensors claiming the CPU: no weights, and data-dependent checks (GPT-2's mask code calls
        # .item()) pass where plain meta tensors raise, so a real build is rarely needed.
        problem = _forward_error(meta_model, lambda: fake_forward(meta_model, inputs))
    else:
        problem = _forward_error(meta_model, lambda: meta_model(*inputs))
    if problem is not None and on_meta and confirm_on_real_weights:
        # Some ops have no fake kernel: confirm on real weights before blaming the input.
        model = source.build("cpu")
        problem = _forward_error(model, lambda: model(*inputs))
    if problem is not None:
        shapes = ", ".join(f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}" for t in inputs)
        raise PlannerError(f"the input {shapes} does not fit {source.spec}: {problem}; "
                           "pass --input-shape (and --input-dtype) that the model accepts")


def run_plan(source: ModelSource, recipes: list[Recipe], options: PlanOptions,
             progress: Callable[[str, int, int], None] = lambda message, done, total: None) -> PlanResult:
    """`progress(message, steps_done, steps_total)` is called as the plan goes (for a progress bar)."""
    def stage(message: str, done: int, total: int) -> None:
        report_stage(message)  # the supervisor's --timeout clock and its words for where a crash happened
        progress(message, done, total)

    total = 2 if options.analytic_only else len(recipes) * len(options.backends) + 2
    return_freed_memory_promptly()
    stage("describing the model (weightless)", 0, total)
    meta_model = source.build("meta")
    inputs = source.example_inputs()
    check_inputs_fit(source, meta_model, inputs, confirm_on_real_weights=not options.analytic_only)
    for recipe in recipes:
        check_layer_overrides(meta_model, recipe)
    materialize = not options.analytic_only  # analytic-only never builds real weights, not even to prune
    resolved = [resolve_recipe(meta_model, inputs, recipe, materialize=materialize) for recipe in recipes]
    recipes = [recipe for recipe, _ in resolved]
    footprints = {recipe.name: pruning_footprint(meta_model, inputs, recipe, materialize=materialize)
                  for recipe in recipes}
    for recipe, note in resolved:
        if note:
            footprints[recipe.name].notes.insert(0, note)
    onnx_disk = (_onnx_analytic_disk(meta_model, inputs, recipes, footprints)
                 if "onnxruntime" in options.backends else {})
    del meta_model

    stage("measuring the framework baseline (once per machine, then cached)", 0, total)
    options = dataclasses.replace(options, framework_bytes={b: framework_baseline(b) for b in options.backends})
    if options.budget_on == "device" and None in options.framework_bytes.values():
        raise PlannerError("--budget-on device needs the framework baseline, and measuring it failed here: "
                           "use --budget-on runtime")
    workdir = plan_workdir()
    try:
        if options.analytic_only:
            rows = [_estimated_row(source, recipe, footprints[recipe.name], options) for recipe in recipes]
        else:
            rows = _verify_recipes(source, recipes, footprints, onnx_disk, workdir, options,
                                   lambda message, done: stage(message, done, total))
    except BaseException:  # an error or Ctrl-C: remove the artifacts, keep nothing half-written
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    stage("done", total, total)
    ranked = rank.rank_rows(rows, options.budget_bytes, options.budget_on)
    chosen = rank.pick_row(ranked)
    return PlanResult(model=source.spec, budget_bytes=options.budget_bytes, budget_on=options.budget_on,
                      rows=ranked, pick=chosen["recipe"] if chosen else None, footprints=footprints, workdir=workdir,
                      input_shapes=[list(t.shape) for t in inputs], input_note=source.input_note,
                      pick_backend=chosen.get("backend") if chosen else None)


def _onnx_analytic_disk(meta_model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], recipes: list[Recipe],
                        footprints: dict[str, Footprint]) -> dict[str, int | None]:
    from planner.onnx_backend import analytic_onnx_bytes, onnx_recipe_support
    from planner.pruning import pruned_meta_model

    sizes: dict[str, int | None] = {}
    for recipe in recipes:
        try:
            if onnx_recipe_support(recipe) or footprints[recipe.name].unsupported:
                sizes[recipe.name] = None
                continue
            model = pruned_meta_model(meta_model, inputs, recipe)[0] if recipe.channels else meta_model
            sizes[recipe.name] = analytic_onnx_bytes(model, recipe)
        except Exception:  # an architecture the ONNX size model does not know: verified figures still come
            sizes[recipe.name] = None
    return sizes


def _verify_recipes(source: ModelSource, recipes: list[Recipe], footprints: dict[str, Footprint],
                    onnx_disk: dict[str, int | None], workdir: Path, options: PlanOptions,
                    progress: Callable[[str, int], None]) -> list[dict[str, Any]]:
    """Materialize the fp32 reference, then apply, save and verify each recipe on each backend: a row each."""
    fmt = artifact_format(source)
    suffix = ".ts" if fmt == "torchscript" else ".pt"
    step = 1

    def report(message: str) -> None:
        progress(message, step)

    report("materializing the float32 reference")
    fp32_path = workdir / f"{REFERENCE}{suffix}"
    model = source.build("cpu")
    _save(model, fp32_path, fmt)
    del model
    release_freed_memory()
    # After the real build: a factory's example input made on meta now has its real values.
    torch.save(tuple(source.example_inputs()), workdir / "inputs.pt")

    rows: list[dict[str, Any]] = []
    reference_recipe = _reference_recipe(recipes)
    report(f"verifying {REFERENCE} (reference)")
    reference_job = _job(source, reference_recipe, fp32_path, workdir, True)
    reference = run_worker(reference_job, workdir, REFERENCE, options)
    if reference["status"] != "verified":
        raise PlannerError(f"{source.spec} does not run in float32 in a fresh process, so nothing can be compared: "
                           f"{reference.get('note')}")
    reference = _with_eval(reference, reference_job, workdir, REFERENCE, options, report)

    if "torch" in options.backends:
        prune_thresholds: PruneThresholds = {}  # prune50, prune50-int8-dynamic... search once
        for recipe in recipes:
            step += 1
            report(f"applying {recipe.name}")
            rows.append(_torch_row(source, recipe, footprints[recipe.name], fp32_path, reference, workdir, fmt,
                                   options, report, prune_thresholds))
    if options.mixed_budgets:
        from planner.mixed_plan import mixed_rows

        rows += mixed_rows(source, fp32_path, reference, workdir, fmt, options, footprints, report)
    if "onnxruntime" in options.backends:
        onnx_base: Path | None = None
        for recipe in recipes:
            step += 1
            report(f"onnxruntime: {recipe.name}")
            row, onnx_base = _onnx_row(source, recipe, onnx_disk.get(recipe.name), fp32_path, onnx_base,
                                       reference, workdir, options, footprints[recipe.name].unsupported)
            rows.append(row)
    return rows


def _torch_row(source: ModelSource, recipe: Recipe, footprint: Footprint, fp32_path: Path,
               reference: dict[str, Any], workdir: Path, fmt: str, options: PlanOptions,
               report: Callable[[str], None], prune_thresholds: PruneThresholds | None = None
               ) -> dict[str, Any]:
    row: dict[str, Any] = {"recipe": recipe.name, "backend": "torch", "touches": recipe.touches()}
    artifact = path_inside(workdir, f"{recipe.name}{fp32_path.suffix}")  # a recipe name never leaves the workdir
    if recipe.name == REFERENCE:
        result, artifact = reference, fp32_path
    elif (unsupported := _unsupported_result(recipe, source, footprint)) is not None:
        result = unsupported
    else:
        result = _apply_and_verify(source, recipe, fp32_path, artifact, workdir, fmt, options, report,
                                   prune_thresholds)
    row.update(result)
    _set_figures(row, _analytic_figures(row, footprint), artifact.stat().st_size if artifact.exists() else None)
    has_convolutions = any(layer.type.startswith("Conv") for layer in footprint.layers)
    row["note"] = explain(row, footprint.notes, source.kind, reference, has_convolutions)
    return _keep_or_drop(row, [artifact], options, keep_anyway=artifact == fp32_path)


def _unsupported_result(recipe: Recipe, source: ModelSource, footprint: Footprint) -> dict[str, Any] | None:
    if (reason := why_unsupported(recipe, source, footprint)) is None:
        return None
    # Analytic figures stay as a what-if only where the recipe would change something here.
    what_if = ((recipe.scheme is None or footprint.quantized_layers > 0)
               and (not recipe.prune or footprint.pruned_layers > 0) and not footprint.unsupported)
    return {"status": "unsupported", "note": reason, "analytic_is_what_if": what_if}


def _analytic_figures(row: dict[str, Any], footprint: Footprint) -> dict[str, Any]:
    analytic = {"analytic_disk_bytes": footprint.disk_bytes, "analytic_weight_bytes": footprint.weight_bytes,
                "analytic_activation_bytes": footprint.activation_bytes,
                "analytic_runtime_bytes": footprint.runtime_bytes,
                "analytic_transient_bytes": footprint.transient_bytes, "analytic_input_bytes": footprint.input_bytes,
                "analytic_output_bytes": footprint.output_bytes}
    if row["status"] == "unsupported" and not row.get("analytic_is_what_if", True):
        return dict.fromkeys(analytic)
    return analytic


def _estimated_row(source: ModelSource, recipe: Recipe, footprint: Footprint, options: PlanOptions
                   ) -> dict[str, Any]:
    """A row of `plan --analytic-only`: the analytic figures, ranked as they are; nothing measured."""
    row: dict[str, Any] = {"recipe": recipe.name, "backend": "torch", "touches": recipe.touches(),
                           "pruned_share": max(recipe.prune, recipe.channels, recipe.params)}
    row.update(_unsupported_result(recipe, source, footprint) or {"status": "estimated"})
    _set_figures(row, _analytic_figures(row, footprint), None)
    has_convolutions = any(layer.type.startswith("Conv") for layer in footprint.layers)
    row["note"] = explain(row, footprint.notes, source.kind, {}, has_convolutions)
    return _keep_or_drop(row, [], options)


def _keep_or_drop(row: dict[str, Any], files: list[Path], options: PlanOptions, keep_anyway: bool = False
                  ) -> dict[str, Any]:
    """Decide fits, and delete the artifact unless it may be exported (it can be gigabytes)."""
    row["framework_bytes"] = options.framework_bytes.get(row["backend"])
    row["fits"] = rank.fits(row, options.budget_bytes, options.budget_on)
    row["artifact"] = None
    if row["status"] == "verified" and files and files[0].exists():
        if keep_anyway or options.keep_all_artifacts or row["fits"]:
            row["artifact"] = str(files[0])
        else:
            for path in files:
                path.unlink(missing_ok=True)
    return row


def _onnx_row(source: ModelSource, recipe: Recipe, analytic_disk: int | None, fp32_path: Path,
              onnx_base: Path | None, reference: dict[str, Any], workdir: Path, options: PlanOptions,
              unsupported: str | None = None) -> tuple[dict[str, Any], Path | None]:
    """One recipe on ONNX Runtime: export the float model (once), quantize in ONNX, verify in a fresh process."""
    from planner.onnx_backend import external_data_name, onnx_file_bytes, onnx_recipe_support

    row: dict[str, Any] = {"recipe": recipe.name, "backend": "onnxruntime", "touches": onnx_touches(recipe)}
    reason = onnx_recipe_support(recipe) or unsupported
    if source.kind == "torchscript":
        reason = "the ONNX exporter does not take TorchScript modules; give a factory (file.py:build) or a .pt2"
    notes: list[str] = []
    artifact: Path | None = None
    if reason is not None:
        result: dict[str, Any] = {"status": "unsupported", "note": reason}
    else:
        if onnx_base is None and not recipe.changes_weights:
            onnx_base = _onnx_build(source, Recipe(REFERENCE, dtype="float32"), fp32_path, None, workdir, options,
                                    notes)
        if recipe.name == REFERENCE and onnx_base is not None:
            artifact = onnx_base
        else:
            artifact = _onnx_build(source, recipe, fp32_path, onnx_base, workdir, options, notes)
        if artifact is None:
            result = {"status": "failed", "note": "; ".join(notes)}
        else:
            job = {"artifact": str(artifact), "inputs": str(workdir / "inputs.pt"),
                   "reference": str(workdir / "reference.pt"), "backend": "onnxruntime"}
            result = run_worker(job, workdir, f"{recipe.name}.onnx", options, worker="planner.onnx_verify")
            result["note"] = "; ".join(filter(None, [*notes, result.get("note", "")]))
    row.update(result)
    verified = row["status"] == "verified" and artifact is not None
    _set_figures(row, {"analytic_disk_bytes": analytic_disk}, onnx_file_bytes(artifact) if verified else None)
    row["note"] = explain(row, ["runtime measured only: ONNX Runtime's arena allocator is not modelled"]
                          if verified else [], source.kind, reference)
    files = [artifact, artifact.with_name(external_data_name(artifact))] if artifact else [workdir / "none"]
    return _keep_or_drop(row, files, options, keep_anyway=artifact == onnx_base), onnx_base


def onnx_touches(recipe: Recipe) -> str:
    parts = [f"prunes {recipe.prune:.0%} of Linear/Conv weights before export"] if recipe.prune else []
    if recipe.channels:
        parts.append(f"removes {recipe.channels:.0%} of channels/neurons (torch-pruning) before export")
    if recipe.quantize == "int8-dynamic":
        parts.append("onnxruntime quantize_dynamic on MatMul (Linear) weights")
    elif recipe.quantize == "int4-weight-only":
        parts.append(f"onnxruntime MatMulNBits 4-bit, block {recipe.group_size}, on MatMul/Gemm (Linear) weights")
    parts.append("float16 initializers" if recipe.dtype == "float16" else "everything else float32")
    return "; ".join(parts)


def _onnx_build(source: ModelSource, recipe: Recipe, fp32_path: Path, onnx_base: Path | None, workdir: Path,
                options: PlanOptions, notes: list[str]) -> Path | None:
    """Build one ONNX artifact in an isolated process; None (and the reason in notes) when it fails."""
    job = {"source": source.to_json(), "recipe": recipe.to_json(), "fp32": str(fp32_path),
           "fp32_onnx": str(onnx_base) if onnx_base else None, "inputs": str(workdir / "inputs.pt"),
           "workdir": str(workdir)}
    built = run_worker(job, workdir, f"{recipe.name}.onnx-build", options, worker="planner.onnx_backend")
    if built["status"] != "verified":
        notes.append(built.get("note", "").replace("verification failed", "ONNX build failed"))
        return None
    notes += built.get("notes", [])
    return Path(built["artifact"])


def _apply_and_verify(source: ModelSource, recipe: Recipe, fp32_path: Path, artifact: Path, workdir: Path,
                      fmt: str, options: PlanOptions, progress: Callable[[str], None],
                      prune_thresholds: PruneThresholds | None = None) -> dict[str, Any]:
    try:
        model, structure = load_reference(source, fp32_path), None
        # The planner's own peak: release each layer's float32 pages once the recipe has its copy.
        mapped = MappedReference(fp32_path)
        if recipe.channels:
            structure = prune_channels(model, tuple(torch.load(workdir / "inputs.pt", weights_only=True)), recipe)
            mapped.release_unused(model)
        model, notes = apply_recipe(model, recipe, after_layer=mapped.release_unused,
                                    prune_thresholds=prune_thresholds)
        _save(model, artifact, fmt, recipe, structure)
        del model
        release_freed_memory()  # module graphs hold reference cycles; free this recipe's copy before the next
    except UnsupportedRecipe as error:
        return {"status": "unsupported", "note": str(error)}
    except Exception as error:  # a recipe that breaks on this model is a row, not a crash
        return {"status": "failed", "note": f"applying the recipe failed: {type(error).__name__}: {str(error)[:200]}"}
    progress(f"verifying {recipe.name} in a fresh process")
    job = _job(source, recipe, artifact, workdir, False)
    result = _with_eval(run_worker(job, workdir, recipe.name, options), job, workdir, recipe.name, options, progress)
    result["note"] = "; ".join(filter(None, [*notes, result.get("note", "")]))
    return result


def _set_figures(row: dict[str, Any], analytic: dict[str, Any], verified_disk: int | None) -> None:
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
