"""The plan: describe the model → analytic footprint per recipe → apply, save, verify each → rank.

The planner process holds the float32 weights only as a memory-mapped file and one recipe's copy at
a time; every verification (planner.verify, planner.onnx_verify) and every ONNX build runs in a fresh
subprocess under a timeout and a memory cap (planner.isolation).
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from planner import rank
from planner.activations import fake_forward
from planner.artifact import load_reference
from planner.baseline import framework_baseline
from planner.errors import PlannerError
from planner.footprint import Footprint
from planner.isolation import plan_workdir, report_stage, run_worker
from planner.measure import release_freed_memory, return_freed_memory_promptly
from planner.pages import MappedReference
from planner.pruning import artifact_state, prune_channels, pruning_footprint, resolve_recipe
from planner.recipes import PruneThresholds, Recipe, UnsupportedRecipe, apply_recipe, check_layer_overrides
from planner.rows import (
    REFERENCE,
    PlanOptions,
    analytic_figures,
    explain,
    keep_or_drop,
    set_figures,
)
from planner.safe_io import path_inside
from planner.sources import ModelSource


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
    if scheme.needs_cuda and not torch.cuda.is_available():
        return f"needs CUDA: {scheme.needs_cuda}; no GPU on this machine"
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

        def verify_mixed(recipe: Recipe, footprint: Footprint) -> dict[str, Any]:
            return _torch_row(source, recipe, footprint, fp32_path, reference, workdir, fmt, options, report)

        rows += mixed_rows(source, fp32_path, workdir, options, footprints, report, verify_mixed)
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
    set_figures(row, analytic_figures(row, footprint), artifact.stat().st_size if artifact.exists() else None)
    has_convolutions = any(layer.type.startswith("Conv") for layer in footprint.layers)
    row["note"] = explain(row, footprint.notes, source.kind, reference, has_convolutions)
    return keep_or_drop(row, [artifact], options, keep_anyway=artifact == fp32_path)


def _unsupported_result(recipe: Recipe, source: ModelSource, footprint: Footprint) -> dict[str, Any] | None:
    if (reason := why_unsupported(recipe, source, footprint)) is None:
        return None
    # Analytic figures stay as a what-if only where the recipe would change something here.
    what_if = ((recipe.scheme is None or footprint.quantized_layers > 0)
               and (not recipe.prune or footprint.pruned_layers > 0) and not footprint.unsupported)
    return {"status": "unsupported", "note": reason, "analytic_is_what_if": what_if}


def _estimated_row(source: ModelSource, recipe: Recipe, footprint: Footprint, options: PlanOptions
                   ) -> dict[str, Any]:
    """A row of `plan --analytic-only`: the analytic figures, ranked as they are; nothing measured."""
    row: dict[str, Any] = {"recipe": recipe.name, "backend": "torch", "touches": recipe.touches(),
                           "pruned_share": max(recipe.prune, recipe.channels, recipe.params)}
    row.update(_unsupported_result(recipe, source, footprint) or {"status": "estimated"})
    set_figures(row, analytic_figures(row, footprint), None)
    has_convolutions = any(layer.type.startswith("Conv") for layer in footprint.layers)
    row["note"] = explain(row, footprint.notes, source.kind, {}, has_convolutions)
    return keep_or_drop(row, [], options)


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
    set_figures(row, {"analytic_disk_bytes": analytic_disk}, onnx_file_bytes(artifact) if verified else None)
    row["note"] = explain(row, ["runtime measured only: ONNX Runtime's arena allocator is not modelled"]
                          if verified else [], source.kind, reference)
    files = [artifact, artifact.with_name(external_data_name(artifact))] if artifact else [workdir / "none"]
    return keep_or_drop(row, files, options, keep_anyway=artifact == onnx_base), onnx_base


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
