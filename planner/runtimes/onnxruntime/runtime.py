"""ONNX Runtime on the CPU: the float32 model exported once, each recipe realized with ONNX Runtime's own
quantizers (quantize_dynamic for int8, MatMulNBits for int4), built and verified in fresh processes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from planner.analysis.footprint import Footprint
from planner.analysis.pruning import pruned_meta_model
from planner.measure.isolation import run_worker
from planner.models.sources import ModelSource
from planner.recipes.recipe import Recipe
from planner.runtimes.base import Artifact, BuildFailed, PlanContext, Runtime
from planner.runtimes.onnxruntime.export import (
    analytic_onnx_bytes,
    external_data_name,
    float_weight_names,
    onnx_file_bytes,
    onnx_recipe_support,
)
from planner.runtimes.onnxruntime.worker import make_job
from planner.runtimes.rows import REFERENCE

BUILD_WORKER = "planner.runtimes.onnxruntime.export"
VERIFY_WORKER = "planner.runtimes.onnxruntime.worker"
ARENA_NOTE = "runtime measured only: ONNX Runtime's arena allocator is not modelled"


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


class OnnxRuntime(Runtime):
    name = "onnxruntime"

    def __init__(self) -> None:
        self.disk: dict[str, int | None] = {}  # analytic ONNX file bytes per recipe (describe)
        self.float_base: Path | None = None  # the float32 export, built once and shared by every recipe
        self.keep_float: dict[str, list[str]] = {}  # per recipe: weights its [[recipe.layer]] tables keep float
        self.float_tried = False  # the float32 export is tried once per plan
        self.float_notes: list[str] = []  # what building it said, for the float32 row's note

    def touches(self, recipe: Recipe) -> str:
        return onnx_touches(recipe)

    def unsupported_generation(self) -> str | None:
        return ("generation is not verified on ONNX Runtime: its rows export one forward without KV-cache inputs "
                "and outputs (a decoder with past key values, as optimum exports it, is not built here)")

    def unsupported(self, recipe: Recipe, source: ModelSource, footprint: Footprint) -> str | None:
        if source.kind == "torchscript":
            return "the ONNX exporter does not take TorchScript modules; give a factory (file.py:build) or a .pt2"
        return onnx_recipe_support(recipe) or footprint.unsupported

    def describe(self, meta_model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], recipes: list[Recipe],
                 footprints: dict[str, Footprint]) -> None:
        for recipe in recipes:
            self.keep_float[recipe.name] = float_weight_names(meta_model, recipe)
            try:
                if onnx_recipe_support(recipe) or footprints[recipe.name].unsupported:
                    self.disk[recipe.name] = None
                    continue
                model = pruned_meta_model(meta_model, inputs, recipe)[0] if recipe.channels else meta_model
                self.disk[recipe.name] = analytic_onnx_bytes(model, recipe)
            except Exception:  # an architecture the ONNX size model does not know: verified figures still come
                self.disk[recipe.name] = None

    def analytic(self, recipe: Recipe, footprint: Footprint) -> dict[str, Any]:
        return {"analytic_disk_bytes": self.disk.get(recipe.name)}

    def analytic_notes(self, footprint: Footprint, verified: bool) -> list[str]:
        return [ARENA_NOTE] if verified else []

    def prepare(self, recipes: list[Recipe], context: PlanContext) -> None:
        if self.float_base is None and not self.float_tried and any(not r.changes_weights for r in recipes):
            self._build_float_base(context)

    def _build_float_base(self, context: PlanContext) -> None:
        """The float32 export every recipe that keeps the weights starts from (tried once; its notes go on the
        float32 row)."""
        self.float_tried = True
        self.float_base = self._build(Recipe(REFERENCE, dtype="float32"), context, self.float_notes)

    def job_state(self) -> dict[str, Any]:
        return {"float_base": str(self.float_base) if self.float_base else None, "float_tried": self.float_tried,
                "float_notes": self.float_notes, "keep_float": self.keep_float}

    def restore_job_state(self, state: dict[str, Any]) -> None:
        self.float_base = Path(state["float_base"]) if state.get("float_base") else None
        self.float_tried, self.float_notes = bool(state.get("float_tried")), list(state.get("float_notes", []))
        self.keep_float = dict(state.get("keep_float", {}))

    def build(self, recipe: Recipe, context: PlanContext) -> Artifact:
        if not self.float_tried and not recipe.changes_weights:
            self._build_float_base(context)
        notes: list[str] = list(self.float_notes) if recipe.name == REFERENCE else []
        if recipe.name == REFERENCE and self.float_base is not None:
            return Artifact(self._files(self.float_base), notes=notes, shared=True)
        artifact = self._build(recipe, context, notes)
        if artifact is None:
            raise BuildFailed("failed", "; ".join(notes))
        return Artifact(self._files(artifact), notes=notes)

    def _build(self, recipe: Recipe, context: PlanContext, notes: list[str]) -> Path | None:
        """Build one ONNX artifact in an isolated process; None (and the reason in notes) when it fails."""
        workdir = context.workdir
        job = {"source": context.source.to_json(), "recipe": recipe.to_json(), "fp32": str(context.fp32_path),
               "fp32_onnx": str(self.float_base) if self.float_base else None, "inputs": str(workdir / "inputs.pt"),
               "workdir": str(workdir), "keep_float": self.keep_float.get(recipe.name, [])}
        built = run_worker(job, workdir, f"{recipe.name}.onnx-build", context.options, worker=BUILD_WORKER)
        if built["status"] != "verified":
            notes.append(built.get("note", "").replace("verification failed", "ONNX build failed"))
            return None
        notes += built.get("notes", [])
        return Path(built["artifact"])

    @staticmethod
    def _files(artifact: Path) -> list[Path]:
        return [artifact, artifact.with_name(external_data_name(artifact))]

    def measure(self, artifact: Artifact, recipe: Recipe, context: PlanContext) -> dict[str, Any]:
        workdir = context.workdir
        job = make_job(artifact.files[0], workdir / "inputs.pt", workdir / "reference.pt")
        result = run_worker(job, workdir, f"{recipe.name}.onnx", context.options, worker=VERIFY_WORKER)
        result["note"] = "; ".join(filter(None, [*artifact.notes, result.get("note", "")]))
        return result

    def disk_bytes(self, artifact: Artifact) -> int:
        return onnx_file_bytes(artifact.files[0])

    def export_files(self, artifact: Path) -> list[Path]:
        data = artifact.with_name(external_data_name(artifact))
        return [artifact, data] if data.exists() else [artifact]

    def export_format(self, artifact: Path) -> str:
        return "onnx"

    def how_to_load(self, file: str, suffix: str, tensor_modules: tuple[str, ...] = (),
                    restructured: bool = False) -> str:
        return f"onnxruntime.InferenceSession('{file}') (keep any .data file beside it)"
