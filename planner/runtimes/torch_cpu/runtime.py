"""PyTorch eager on the CPU: recipes applied with torchao to a copy of the float32 reference in a build process
(planner.runtimes.torch_cpu.build), saved as a state dict (or TorchScript), and verified in a fresh process
(planner.runtimes.torch_cpu.worker). The analytic figures are the footprint's (planner.analysis.footprint): this is
the runtime the analytic model describes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from planner.analysis.footprint import Footprint
from planner.core.errors import PlannerError
from planner.core.safe_io import path_inside
from planner.core.units import format_bytes
from planner.measure.isolation import run_worker
from planner.measure.library import release_freed_memory
from planner.models.sources import ModelSource
from planner.recipes.recipe import Recipe
from planner.runtimes.base import Artifact, BuildFailed, PlanContext, Runtime
from planner.runtimes.rows import REFERENCE, RESOLUTION_BYTES, PlanOptions
from planner.runtimes.torch_cpu.build import FAILED_PREFIX, artifact_format, make_job, save_artifact

WORKER = "planner.runtimes.torch_cpu.worker"
BUILD_WORKER = "planner.runtimes.torch_cpu.build"
FIRST_RUN_SHARE = 0.05  # a first generate() this much above the second (and above RESOLUTION_BYTES) gets a note


def materialize_reference(source: ModelSource, workdir: Path) -> Path:
    """Build the float32 model with its real weights, save it (every runtime builds from this file) and the
    example inputs (after the real build: a factory's example input made on meta now has its real values)."""
    fmt = artifact_format(source)
    fp32_path = workdir / f"{REFERENCE}{'.ts' if fmt == 'torchscript' else '.pt'}"
    model = source.build("cpu")
    save_artifact(model, fp32_path, fmt)
    del model
    release_freed_memory()
    torch.save(tuple(source.example_inputs()), workdir / "inputs.pt")
    return fp32_path


def verification_job(source: ModelSource, recipe: Recipe, artifact: Path, workdir: Path, save_reference: bool,
                     options: PlanOptions | None = None) -> dict[str, Any]:
    generation = options.generation if options is not None else None
    return {
        "generation": generation.to_json() if generation is not None else None,
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


def with_eval(result: dict[str, Any], job: dict[str, Any], workdir: Path, name: str, options: PlanOptions,
              progress: Any) -> dict[str, Any]:
    """Add --eval's figure to a verified row. It runs in its own worker (planner.analysis.evalhook) after the
    measurement: a function that fails, hangs or exits costs the row only its eval figure, with a note."""
    if options.eval_spec is None or result.get("status") != "verified":
        return result
    from planner.analysis.evalhook import eval_job, failure_note

    progress(f"running --eval on {name} in a fresh process")
    evaluated = run_worker(eval_job(job, options.eval_spec), workdir, f"{name}.eval", options,
                           worker="planner.analysis.evalhook")
    if evaluated["status"] != "verified":
        return dict(result, eval_score=None, eval_error=failure_note(options.eval_spec, evaluated.get("note", "")))
    return dict(result, **{key: evaluated[key] for key in ("eval_score", "eval_error") if key in evaluated})


def verify_reference(source: ModelSource, recipe: Recipe, fp32_path: Path, workdir: Path, options: PlanOptions,
                     progress: Any) -> dict[str, Any]:
    """Verify the float32 reference in a fresh process; it saves the outputs every other row is compared with."""
    job = verification_job(source, recipe, fp32_path, workdir, True, options)
    reference = run_worker(job, workdir, REFERENCE, options, worker=WORKER)
    if reference["status"] != "verified":
        raise PlannerError(f"{source.spec} does not run in float32 in a fresh process, so nothing can be compared: "
                           f"{reference.get('note')}")
    if options.generation:
        reference["note"] = "; ".join(filter(None, [reference.get("note"), first_run_note(reference)]))
    return with_eval(reference, job, workdir, REFERENCE, options, progress)


def first_run_note(result: dict[str, Any]) -> str | None:
    """Why a generation row's first generate() peaked above its second, where it did by more than noise. Measured
    on this machine: a 2-layer LM whose prefill allocates 33 MB blocks peaked 90 MB higher in its first generate()
    than in the next ones, and by 10 MB with MALLOC_MMAP_THRESHOLD_ fixed. glibc serves blocks under 32 MiB from
    mmap until one is freed, then raises its threshold and keeps later ones on the heap (up to twice that size
    cached), so the first run holds both. The analytic figure models the live tensors, which the second run shows."""
    if result.get("status") != "verified":
        return None
    first, steady = result.get("verified_first_forward_peak_bytes"), result.get("verified_steady_peak_bytes")
    if first is None or steady is None or first - steady < max(RESOLUTION_BYTES, FIRST_RUN_SHARE * steady):
        return None
    return (f"the first generate() peaked {format_bytes(first - steady)} above the second ({format_bytes(steady)}): "
            "glibc keeps freed heap blocks while its mmap threshold adapts, which the analytic figure does not model")


class TorchCpu(Runtime):
    name = "torch"

    def touches(self, recipe: Recipe) -> str:
        return recipe.touches()

    def unsupported(self, recipe: Recipe, source: ModelSource, footprint: Footprint) -> str | None:
        if recipe.name == REFERENCE:
            return None  # the reference row is the reference's own verification
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

    def unsupported_generation(self) -> str | None:
        return None  # the worker runs generate() itself (planner.runtimes.torch_cpu.worker)

    def refusal(self, recipe: Recipe, footprint: Footprint, reason: str) -> dict[str, Any]:
        # Analytic figures stay as a what-if only where the recipe would change something here.
        what_if = ((recipe.scheme is None or footprint.quantized_layers > 0)
                   and (not recipe.prune or footprint.pruned_layers > 0) and not footprint.unsupported)
        return dict(super().refusal(recipe, footprint, reason), analytic_is_what_if=what_if)

    def analytic(self, recipe: Recipe, footprint: Footprint) -> dict[str, Any]:
        # The verified runtime is a fresh process's lifetime peak, which includes the framework's first-use
        # costs (measured once per machine); loading never holds more than the weights (torch.load reads each
        # storage once and load_state_dict(assign=True) keeps it), so the first forward is the analytic peak.
        first_use = self.first_use_bytes() or 0
        runtime = None if footprint.runtime_bytes is None else footprint.runtime_bytes + first_use
        generation = {} if footprint.kv_cache_bytes is None else {
            "analytic_kv_cache_bytes": footprint.kv_cache_bytes,
            "analytic_prefill_peak_bytes": footprint.prefill_peak_bytes,
            "analytic_decode_peak_bytes": footprint.decode_peak_bytes}
        return {"analytic_disk_bytes": footprint.disk_bytes, "analytic_weight_bytes": footprint.weight_bytes,
                "analytic_activation_bytes": footprint.activation_bytes,
                "analytic_runtime_bytes": runtime, "analytic_first_use_bytes": first_use,
                "analytic_transient_bytes": footprint.transient_bytes, "analytic_input_bytes": footprint.input_bytes,
                "analytic_output_bytes": footprint.output_bytes, **generation}

    def analytic_notes(self, footprint: Footprint, verified: bool) -> list[str]:
        return footprint.notes

    def progress_label(self, recipe: Recipe) -> str:
        return f"applying {recipe.name}"

    def build(self, recipe: Recipe, context: PlanContext) -> Artifact:
        assert context.fp32_path is not None
        if recipe.name == REFERENCE:
            return Artifact([context.fp32_path], shared=True, measured=context.reference)
        source, fp32_path, workdir = context.source, context.fp32_path, context.workdir
        artifact = path_inside(workdir, f"{recipe.name}{fp32_path.suffix}")  # a recipe name never leaves the workdir
        # In a process of its own: the planner holds no recipe's copy, and a recipe that crashes, hangs or runs out
        # of memory costs only its row.
        job = make_job(source, recipe, fp32_path, artifact, workdir / "inputs.pt")
        built = run_worker(job, workdir, f"{recipe.name}.torch-build", context.options, worker=BUILD_WORKER)
        if built["status"] != "verified":
            raise BuildFailed("failed", built.get("note", "").replace("verification failed", FAILED_PREFIX))
        if "unsupported" in built:
            raise BuildFailed("unsupported", built["unsupported"])
        if "failed" in built:
            raise BuildFailed("failed", built["failed"])
        return Artifact([artifact], notes=built.get("notes", []))

    def measure(self, artifact: Artifact, recipe: Recipe, context: PlanContext) -> dict[str, Any]:
        if artifact.measured is not None:
            return artifact.measured
        context.progress(f"verifying {recipe.name} in a fresh process")
        job = verification_job(context.source, recipe, artifact.files[0], context.workdir, False,
                               context.options)
        result = with_eval(run_worker(job, context.workdir, recipe.name, context.options, worker=WORKER), job,
                           context.workdir, recipe.name, context.options, context.progress)
        result["note"] = "; ".join(filter(None, [*artifact.notes, result.get("note", ""),
                                                 first_run_note(result) if context.options.generation else None]))
        return result

    def disk_bytes(self, artifact: Artifact) -> int:
        return artifact.files[0].stat().st_size

    def export_format(self, artifact: Path) -> str:
        return "torchscript" if artifact.suffix == ".ts" else "state_dict"

    def how_to_load(self, file: str, suffix: str, tensor_modules: tuple[str, ...] = (),
                    restructured: bool = False) -> str:
        if suffix == ".ts":
            return f"torch.jit.load('{file}')"
        if restructured:  # transformers Conv1D layers became nn.Linear: planner rebuilds that structure
            return ("from planner.artifact import load_artifact; model = load_artifact('.')  # run in this folder; "
                    "its Conv1D layers became nn.Linear, so the weights no longer load into the original model")
        # weights_only loading accepts torchao's tensors only once their modules are imported (the prototype int4
        # tensor lives outside `torchao`'s own import).
        imports = "".join(f"import {module}; " for module in tensor_modules)
        return (f"import torch; {imports}model = <build the model>; model.load_state_dict(torch.load('{file}', "
                "weights_only=True), assign=True)  # or planner.artifact.load_artifact(this folder)")
