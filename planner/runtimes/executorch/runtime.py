"""ExecuTorch with the XNNPACK delegate: each recipe lowered from the float32 reference to a .pte in an isolated
build process (planner.runtimes.executorch.lower), verified in a fresh process of ExecuTorch's Python runtime
(planner.runtimes.executorch.worker).

Analytic figures, before anything is lowered:
- disk: the constants the .pte stores (XNNPACK's packed int4 with bfloat16 group scales, int8 with per-channel
  scales, float weights at the recipe's dtype) plus the program's few kilobytes (lower.program_bytes);
- runtime: the larger of the load peak and the forward peak; the forward includes the runtime's first-use cost
  (its first program run: thread pool and workspace, measured once per machine like torch's). Loading a method
  is when XNNPACK packs the weights it takes, so the raw and the packed copy are alive together: load =
  2 x delegated weights + other constants + the memory plan (inputs and outputs of a graph XNNPACK takes whole).
  The forward holds the packed weights, the constants, the inputs and XNNPACK's intermediates, taken as the
  float model's liveness peak (the quantized graph keeps float activations between layers; torch's eager
  dequantized weight copies do not exist here).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from planner.analysis.activations import activation_peak
from planner.analysis.footprint import Footprint, cast_inputs, weightless_recipe_model
from planner.analysis.pruning import pruned_meta_model
from planner.core.text import first_names
from planner.core.units import format_bytes
from planner.measure.isolation import run_worker
from planner.models.sources import ModelSource
from planner.recipes.recipe import Recipe, untied
from planner.runtimes.base import Artifact, BuildFailed, PlanContext, Runtime
from planner.runtimes.executorch.lower import (
    ProgramBytes,
    program_bytes,
    realized_recipe,
    support,
)

BUILD_WORKER = "planner.runtimes.executorch.lower"
VERIFY_WORKER = "planner.runtimes.executorch.worker"
def python_binding_note(measured: int | None) -> str:
    binding = f" ({format_bytes(measured)})" if measured else ""
    return (f"framework: ExecuTorch's Python binding{binding} links libtorch and is not what a device loads; the "
            "device's C++ runtime is not measured (the pip wheel ships no runner binary), so --budget-on device "
            "counts the model alone")


def executorch_touches(recipe: Recipe) -> str:
    parts = []
    if recipe.channels:
        parts.append(f"removes {recipe.channels:.0%} of channels/neurons (torch-pruning) before export")
    if recipe.prune:
        parts.append(f"prunes {recipe.prune:.0%} of Linear/Conv weights before export (stored densely)")
    realized = realized_recipe(recipe) if support(recipe) is None else recipe
    if realized.quantize == "8da4w":
        parts.append(f"XNNPACK 8da4w: int8 dynamic activations, 4-bit Linear weights packed, group "
                     f"{recipe.group_size}")
    elif realized.quantize == "8da8w":
        same = " (int8-dynamic's arithmetic)" if recipe.quantize == "int8-dynamic" else ""
        parts.append(f"XNNPACK 8da8w{same}: int8 dynamic activations, int8 Linear weights per channel")
    parts.append(f"lowered to XNNPACK in {recipe.dtype}" if recipe.dtype != "float32" else
                 "everything else float32 on XNNPACK")
    return "; ".join(parts)


def xnnpack_intermediates(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], recipe: Recipe) -> int:
    """XNNPACK's intermediates for one forward, taken as the float model's liveness peak at the recipe's dtype: the
    quantized graph keeps float activations between layers, and torch's measured kernel workspaces (oneDNN's
    convolution scratch, which the torch footprint adds) are not XNNPACK's. MobileNetV2 with them: 16.5 MB against
    about 5 MB measured."""
    twin = dataclasses.replace(recipe, name=f"{recipe.name}.float", quantize=None, layer_overrides=(), prune=0.0,
                               channels=0.0)
    traced, _ = weightless_recipe_model(model, twin)
    device = next((t.device.type for t in traced.parameters()), "meta")
    return activation_peak(traced, cast_inputs(inputs, twin.torch_dtype, device), scratch={}).peak_bytes


def untied_note(dropped: list[str]) -> list[str]:
    if not dropped:
        return []
    return [f"{first_names(dropped)} quantized as the recipe says, though tied: XNNPACK packs a delegated Linear's "
            "weight into its own blob, so the tie is stored twice on ExecuTorch either way (kept float, the second "
            "copy would be full size)"]


class ExecuTorchRuntime(Runtime):
    name = "executorch"

    def __init__(self) -> None:
        self.programs: dict[str, ProgramBytes | None] = {}  # per recipe, from describe()
        self.activations: dict[str, int | None] = {}  # XNNPACK's intermediates per recipe: the float liveness peak

    def touches(self, recipe: Recipe) -> str:
        return executorch_touches(recipe)

    def unsupported_generation(self) -> str | None:
        return ("generation is not verified on ExecuTorch: its rows lower one forward; decoding needs a program "
                "with a static KV cache (ExecuTorch's LLM export), which is not built here")

    def unsupported(self, recipe: Recipe, source: ModelSource, footprint: Footprint) -> str | None:
        if source.kind == "torchscript":
            return "torch.export does not take TorchScript modules; give a factory (file.py:build) or a .pt2"
        return support(recipe) or footprint.unsupported

    def describe(self, meta_model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], recipes: list[Recipe],
                 footprints: dict[str, Footprint]) -> None:
        float_peaks: dict[tuple[float, str], int | None] = {}  # per (structured pruning, dtype)
        for recipe in recipes:
            self.programs[recipe.name] = self.activations[recipe.name] = None
            if support(recipe) or footprints[recipe.name].unsupported:
                continue
            try:
                model = pruned_meta_model(meta_model, inputs, recipe)[0] if recipe.channels else meta_model
                self.programs[recipe.name] = program_bytes(model, realized_recipe(untied(recipe)[0]))
                key = (recipe.channels, recipe.dtype)
                if key not in float_peaks:
                    float_peaks[key] = xnnpack_intermediates(model, inputs, recipe)
                self.activations[recipe.name] = float_peaks[key]
            except Exception:  # an architecture the size model does not know: verified figures still come
                self.programs[recipe.name] = None

    def analytic(self, recipe: Recipe, footprint: Footprint) -> dict[str, Any]:
        program = self.programs.get(recipe.name)
        if program is None:
            return {"analytic_disk_bytes": None, "analytic_runtime_bytes": None}
        activations = self.activations.get(recipe.name)
        inputs, outputs = footprint.input_bytes or 0, footprint.output_bytes or 0
        first_use = self.first_use_bytes() or 0
        weights = program.delegated_bytes + program.constant_bytes
        load_peak = weights + program.packing_bytes + inputs + outputs  # raw and packed copies at once
        runtime = None
        if activations is not None:  # the first-use cost (thread pool, workspace) comes with the first forward
            runtime = max(load_peak, weights + inputs + activations + first_use)
        return {"analytic_disk_bytes": program.file_bytes, "analytic_weight_bytes": weights,
                "analytic_activation_bytes": activations, "analytic_runtime_bytes": runtime,
                "analytic_first_use_bytes": first_use, "analytic_input_bytes": inputs,
                "analytic_output_bytes": outputs}

    def device_framework_bytes(self, measured: int | None) -> int | None:
        return None  # the C++ runtime a device loads: not measured here

    def device_framework_note(self, measured: int | None) -> str | None:
        return python_binding_note(measured)

    def progress_label(self, recipe: Recipe) -> str:
        return f"executorch: lowering {recipe.name} to XNNPACK"

    def build(self, recipe: Recipe, context: PlanContext) -> Artifact:
        workdir = context.workdir
        recipe, dropped = untied(recipe)
        job = {"source": context.source.to_json(), "recipe": recipe.to_json(), "fp32": str(context.fp32_path),
               "inputs": str(workdir / "inputs.pt"), "workdir": str(workdir)}
        built = run_worker(job, workdir, f"{recipe.name}.pte-build", context.options, worker=BUILD_WORKER)
        if built["status"] != "verified":
            raise BuildFailed("failed", built.get("note", "").replace("verification failed",
                                                                      "lowering to ExecuTorch failed"))
        return Artifact([Path(built["artifact"])], notes=[*untied_note(dropped), *built.get("notes", [])])

    def measure(self, artifact: Artifact, recipe: Recipe, context: PlanContext) -> dict[str, Any]:
        workdir = context.workdir
        context.progress(f"verifying {recipe.name} in a fresh ExecuTorch process")
        job = {"artifact": str(artifact.files[0]), "inputs": str(workdir / "inputs.pt"),
               "reference": str(workdir / "reference.pt"), "dtype": recipe.dtype}
        result = run_worker(job, workdir, f"{recipe.name}.executorch", context.options, worker=VERIFY_WORKER)
        result["note"] = "; ".join(filter(None, [*artifact.notes, result.get("note", "")]))
        return result

    def export_format(self, artifact: Path) -> str:
        return "executorch"

    def how_to_load(self, file: str, suffix: str, tensor_modules: tuple[str, ...] = (),
                    restructured: bool = False) -> str:
        return (f"from executorch.runtime import Runtime; method = Runtime.get().load_program('{file}')"
                ".load_method('forward'); outputs = method.execute([inputs...])")
