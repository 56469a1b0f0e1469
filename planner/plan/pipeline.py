"""The plan: describe the model → analytic footprint per recipe → apply, save, verify each → rank.

The planner process builds the float32 model once, to save it; every build and verification a runtime runs
(planner.runtimes) happens in a fresh subprocess under a timeout and a memory cap (planner.measure.isolation).
Each row to verify is a job (planner.plan.jobs) that an executor runs (planner.plan.executors: here, several at
once, or on a Ray cluster); evaluate() sets its figures beside the analytic ones, in the plan's order.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from planner.analysis.activations import fake_forward
from planner.analysis.footprint import Footprint
from planner.analysis.generation import check_generation
from planner.analysis.pruning import clear_flatten_memo, pruning_footprint, resolve_recipe
from planner.core import rank
from planner.core.errors import PlannerError
from planner.measure.isolation import plan_workdir, report_stage
from planner.measure.library import return_freed_memory_promptly
from planner.models.sources import ModelSource
from planner.plan.executors import ExecutorOptions, create_executor
from planner.plan.jobs import RowOutcome, build_and_measure, make_job
from planner.plan.mixed_plan import mixed_rows
from planner.plan.schedule import predicted_job_bytes
from planner.recipes.recipe import Recipe, check_layer_overrides, keep_ties
from planner.runtimes.base import PlanContext, Runtime
from planner.runtimes.registry import create
from planner.runtimes.rows import REFERENCE, PlanOptions, explain, keep_or_drop, set_figures
from planner.runtimes.torch_cpu.runtime import TorchCpu, materialize_reference, verify_reference

ANALYTIC_RUNTIME = TorchCpu.name  # the runtime the analytic model describes (--analytic-only's rows)


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
    min_sqnr_db: float | None = None
    generation: dict[str, int] | None = None  # --context: {"context": N, "new_tokens": G}

    def row(self, recipe: str, backend: str = "torch") -> dict[str, Any] | None:
        return next((r for r in self.rows if r["recipe"] == recipe and r.get("backend") == backend), None)

    def artifact(self, recipe: str, backend: str = "torch") -> Path | None:
        row = self.row(recipe, backend)
        path = row and row.get("artifact")
        return Path(path) if path and Path(path).exists() else None

    def cleanup(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


def _reference_recipe(recipes: list[Recipe]) -> Recipe:
    return next((r for r in recipes if r.name == REFERENCE), Recipe(REFERENCE, "float32 reference"))


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
             progress: Callable[[str, int, int], None] = lambda message, done, total: None,
             on_estimates: Callable[[list[dict[str, Any]]], None] = lambda rows: None,
             executor: ExecutorOptions | None = None) -> PlanResult:
    """`progress(message, steps_done, steps_total)` is called as the plan goes (for a progress bar);
    `on_estimates(ranked rows)` once, with every row's analytic figures, before anything is verified;
    `executor`: where and how many rows are verified at once (default: here, what the cores allow)."""
    total = 2

    def stage(message: str, done: int, steps: int) -> None:
        nonlocal total
        total = steps
        report_stage(message)  # the supervisor's --timeout clock and its words for where a crash happened
        progress(message, done, steps)

    return_freed_memory_promptly()
    stage("describing the model (weightless)", 0, total)
    meta_model = source.build("meta")
    if options.generation is not None:
        check_generation(meta_model, options.generation, source.spec)
    inputs = source.example_inputs()
    check_inputs_fit(source, meta_model, inputs, confirm_on_real_weights=not options.analytic_only)
    for recipe in recipes:
        check_layer_overrides(meta_model, recipe)
    materialize = not options.analytic_only  # analytic-only never builds real weights, not even to prune
    resolved = [resolve_recipe(meta_model, inputs, recipe, materialize=materialize) for recipe in recipes]
    ties = [keep_ties(meta_model, recipe) for recipe, _ in resolved]  # a tied head stays tied (and float)
    recipes = [recipe for recipe, _ in ties]
    footprints = {recipe.name: pruning_footprint(meta_model, inputs, recipe, materialize=materialize,
                                                 generation=options.generation) for recipe in recipes}
    clear_flatten_memo()  # every structured pruning of the analysis is done
    for (_, note), (recipe, tie_note) in zip(resolved, ties, strict=True):
        for text in filter(None, [tie_note, note]):
            footprints[recipe.name].notes.insert(0, text)
    # --analytic-only estimates on the runtime the analytic model describes; ONNX Runtime's memory is not modelled.
    runtimes = [create(name) for name in (ANALYTIC_RUNTIME,) if options.analytic_only] or \
        [create(name) for name in options.backends]
    for runtime in runtimes:
        runtime.describe(meta_model, inputs, recipes, footprints)
    del meta_model

    stage("measuring the framework baseline (once per machine, then cached)", 0, total)
    backend_runtimes = {name: create(name) for name in options.backends}
    measured = {name: runtime.framework_baseline() for name, runtime in backend_runtimes.items()}
    on_device = {name: runtime.device_framework_bytes(measured[name]) for name, runtime in backend_runtimes.items()}
    unmeasured = tuple(name for name in options.backends if on_device[name] is None and measured[name] is not None)
    options = dataclasses.replace(options, framework_bytes=measured, device_framework_bytes=on_device,
                                  device_framework_unmeasured=unmeasured)
    if options.budget_on == "device" and any(measured[name] is None for name in options.backends):
        failed = ", ".join(name for name in options.backends if measured[name] is None)
        raise PlannerError(f"--budget-on device (the default) needs the framework baseline of {failed}, and "
                           "measuring it failed here: use --budget-on runtime")
    workdir = plan_workdir()
    try:
        # Every row's analytic figures first (seconds): the table a user sees before anything is verified.
        estimating = PlanContext(source, options, workdir, fp32_path=None, reference={})
        estimates = [evaluate(recipe, runtime, footprints[recipe.name], estimating, verify=False)
                     for runtime in runtimes for recipe in recipes]
        on_estimates(rank.rank_rows(estimates, options.budget_bytes, options.budget_on))
        if options.analytic_only:
            rows = estimates
        else:
            rows = _verify_recipes(source, recipes, runtimes, footprints, estimates, workdir, options,
                                   lambda message, done, steps: stage(message, done, steps),
                                   executor or ExecutorOptions())
    except BaseException:  # an error or Ctrl-C: remove the artifacts, keep nothing half-written
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    stage("done", total, total)
    ranked = rank.rank_rows(rows, options.budget_bytes, options.budget_on)
    for row in ranked:
        floor = rank.quality_floor_note(row, options.min_sqnr_db)
        if floor:
            row["note"] = "; ".join(filter(None, [row.get("note"), floor]))
    chosen = rank.pick_row(ranked, options.min_sqnr_db)
    return PlanResult(model=source.spec, budget_bytes=options.budget_bytes, budget_on=options.budget_on,
                      rows=ranked, pick=chosen["recipe"] if chosen else None, footprints=footprints, workdir=workdir,
                      input_shapes=[list(t.shape) for t in inputs], input_note=source.input_note,
                      pick_backend=chosen.get("backend") if chosen else None, min_sqnr_db=options.min_sqnr_db,
                      generation=options.generation.to_json() if options.generation else None)


def needs_verifying(estimate: dict[str, Any], options: PlanOptions) -> bool:
    """--verify all measures every row a runtime supports; --verify needed (the default) only those whose analytic
    figure leaves room to fit the budget (rank.could_fit), and always the float32 reference on torch."""
    if estimate["status"] == "unsupported":
        return False
    if options.verify == "all" or (estimate["recipe"], estimate["backend"]) == (REFERENCE, TorchCpu.name):
        return True
    return rank.could_fit(estimate, options.budget_bytes, options.budget_on)


def _verify_recipes(source: ModelSource, recipes: list[Recipe], runtimes: list[Runtime],
                    footprints: dict[str, Footprint], estimates: list[dict[str, Any]], workdir: Path,
                    options: PlanOptions, progress: Callable[[str, int, int], None],
                    executor_options: ExecutorOptions) -> list[dict[str, Any]]:
    """Materialize and verify the float32 reference, then each recipe on each runtime that needs verifying
    (needs_verifying): a job each, run by the executor; the others keep their estimate, saying why."""
    by_key = {(recipe.name, runtime.name): (recipe, runtime) for runtime in runtimes for recipe in recipes}
    chosen = [row for row in estimates if needs_verifying(row, options)]
    total = len(chosen) + 2 + len(options.mixed_budgets)
    step = 1

    def report(message: str) -> None:
        progress(message, step, total)

    report("materializing the float32 reference")
    started = time.perf_counter()
    fp32_path = materialize_reference(source, workdir)
    built = time.perf_counter()
    report(f"verifying {REFERENCE} (reference)")
    reference = verify_reference(source, _reference_recipe(recipes), fp32_path, workdir, options, report)
    # fp32's row reuses the reference: its seconds are the reference's (jobs.build_and_measure times the others)
    reference = {**reference, "build_s": round(built - started, 2), "verify_s": round(time.perf_counter() - built, 2)}
    context = PlanContext(source, options, workdir, fp32_path, reference, report)
    for runtime in runtimes:  # what a runtime's rows share is built before any row's job (ONNX's float32 export)
        report(f"{runtime.name}: preparing what its rows share")
        runtime.prepare([by_key[(row["recipe"], runtime.name)][0] for row in chosen if row["backend"] == runtime.name],
                        context)
    jobs = [make_job(*by_key[(row["recipe"], row["backend"])], context, _predicted_bytes(row, reference, options))
            for row in chosen]
    executor = create_executor(executor_options, options.memory_cap_bytes, workdir)
    try:
        outcomes = dict(zip(map(id, chosen), executor.run(jobs, lambda message, done: progress(
            message, 2 + done, total)), strict=True))
    finally:
        executor.close()
    step = 1 + len(chosen)  # the mixed rows, if any, come after every job

    rows: list[dict[str, Any]] = []
    for estimate in estimates:
        recipe, runtime = by_key[(estimate["recipe"], estimate["backend"])]
        if id(estimate) in outcomes:
            rows.append(evaluate(recipe, runtime, footprints[recipe.name], context, outcome=outcomes[id(estimate)]))
        elif estimate["status"] == "unsupported":
            rows.append(estimate)
        else:
            note = rank.ruled_out_note(estimate, options.budget_bytes, options.budget_on)
            rows.append(dict(estimate, note="; ".join(filter(None, [note, estimate.get("note")]))))
    if options.mixed_budgets:
        torch_runtime = next((runtime for runtime in runtimes if runtime.name == TorchCpu.name), TorchCpu())

        def verify_mixed(recipe: Recipe, footprint: Footprint) -> dict[str, Any]:
            return evaluate(recipe, torch_runtime, footprint, context)

        rows += mixed_rows(source, fp32_path, workdir, options, footprints, report, verify_mixed)
    return rows


def _predicted_bytes(estimate: dict[str, Any], reference: dict[str, Any], options: PlanOptions) -> int:
    """A row job's predicted peak, for the executor's admission under --memory-cap (planner.plan.schedule)."""
    return predicted_job_bytes(estimate.get("analytic_runtime_bytes"), estimate.get("analytic_disk_bytes"),
                               reference.get("verified_runtime_bytes"),
                               options.framework_bytes.get(estimate["backend"]))


def evaluate(recipe: Recipe, runtime: Runtime, footprint: Footprint, context: PlanContext,
             verify: bool = True, outcome: RowOutcome | None = None) -> dict[str, Any]:
    """One row: the recipe on the runtime. Refused with the runtime's one reason; else built from the float32
    reference and measured in a fresh process (verify=False: estimated; `outcome`: what an executor's job for
    the row built and measured); then its verified figures beside the runtime's analytic ones, the note that
    explains them, and whether it fits."""
    row: dict[str, Any] = {"recipe": recipe.name, "backend": runtime.name, "touches": runtime.touches(recipe)}
    if not verify:  # estimated rows' quality is unknown: rank orders them by how much is pruned
        row["pruned_share"] = max(recipe.prune, recipe.channels, recipe.params)
    made = RowOutcome({"status": "estimated"})
    # A runtime that cannot verify generate() refuses every row of a --context plan, saying why.
    generation_refusal = runtime.unsupported_generation() if context.options.generation else None
    if generation_refusal is not None:
        made = RowOutcome(dict(runtime.refusal(recipe, footprint, generation_refusal), analytic_is_what_if=False))
    elif (reason := runtime.unsupported(recipe, context.source, footprint)) is not None:
        made = RowOutcome(runtime.refusal(recipe, footprint, reason))
    elif verify:
        made = outcome or build_and_measure(recipe, runtime, context)
    row.update(made.result)
    if row.pop("latency_shared", None):  # planner.measure.timing_lock: the machine was not free in time
        row["note"] = "; ".join(filter(None, [row.get("note"), "latency timed while other rows' jobs ran (the "
                                              "machine was not free in time): not comparable with the others"]))
    verified = row["status"] == "verified" and bool(made.files)
    analytic = runtime.analytic(recipe, footprint)
    if row["status"] == "unsupported" and not row.get("analytic_is_what_if", True):
        analytic = dict.fromkeys(analytic)
    set_figures(row, analytic, made.disk_bytes if verified else None)
    # oneDNN's convolution scratch is torch's (transformers' Conv1D is a Linear)
    has_convolutions = runtime.name == TorchCpu.name and any(
        layer.type.startswith("Conv") and layer.type != "Conv1D" for layer in footprint.layers)
    device_note = runtime.device_framework_note(context.options.framework_bytes.get(runtime.name))
    row["note"] = explain(row, [*runtime.analytic_notes(footprint, verified), *filter(None, [device_note])],
                          context.source.kind, context.reference, has_convolutions)
    return keep_or_drop(row, [Path(file) for file in made.files], context.options, keep_anyway=made.shared)
