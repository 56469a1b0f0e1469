"""The Runtime interface: what the plan asks of every runtime a recipe can be verified on.

A plan is a loop over recipes × runtimes (planner.plan.pipeline.evaluate). For each pair a runtime says why it
refuses the recipe (one reason, logged), or builds the artifact from the float32 reference and measures it in a
fresh, isolated process; the row then sets those figures beside the runtime's analytic ones. A new runtime
(ExecuTorch, CUDA) is one package with one Runtime subclass, listed in planner.runtimes.registry.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from planner.analysis.footprint import Footprint
from planner.models.sources import ModelSource
from planner.recipes.recipe import Recipe
from planner.runtimes.baseline import first_use_bytes, framework_baseline
from planner.runtimes.rows import PlanOptions

log = logging.getLogger("planner.runtimes")


@dataclass
class PlanContext:
    """What every runtime of one plan shares. In an --analytic-only plan nothing is materialized:
    fp32_path is None and reference is empty."""

    source: ModelSource
    options: PlanOptions
    workdir: Path
    fp32_path: Path | None  # the float32 reference artifact (a torch state dict, or TorchScript)
    reference: dict[str, Any]  # the float32 reference verified on torch: the quality baseline and latency ratio
    progress: Callable[[str], None] = lambda message: None


@dataclass
class Artifact:
    """What build() made: the model file first, then what must travel with it (ONNX external data)."""

    files: list[Path]
    notes: list[str] = field(default_factory=list)  # what building it did, for the row's note
    shared: bool = False  # other rows use it (the float32 reference): kept whatever the budget
    measured: dict[str, Any] | None = None  # already measured (the reference row): measure() returns it


class BuildFailed(Exception):
    """build() could not make the artifact: the row's status (failed, or unsupported when the runtime's own
    tools refuse the recipe only once they see the model) and the reason."""

    def __init__(self, status: str, note: str) -> None:
        super().__init__(note)
        self.status, self.note = status, note


class Runtime(ABC):
    """One runtime. Instances are made per plan (planner.runtimes.registry.create): a runtime may keep what
    its rows share (ONNX Runtime's float32 export, made by prepare()) and hand it to the copy that runs a row's
    job (job_state, restore_job_state)."""

    name: str  # the row's backend column and --backend's word: torch, onnxruntime

    @abstractmethod
    def touches(self, recipe: Recipe) -> str:
        """What the recipe changes in this runtime, for the table's touches column."""

    @abstractmethod
    def unsupported(self, recipe: Recipe, source: ModelSource, footprint: Footprint) -> str | None:
        """Why this runtime cannot run the recipe on this model here, decided before any work; None if it can."""

    def unsupported_generation(self) -> str | None:
        """Why this runtime's rows cannot verify generate() at a context (--context), or None where they can."""
        return f"{self.name} rows verify one forward; generation with a KV cache is verified on torch only"

    def refusal(self, recipe: Recipe, footprint: Footprint, reason: str) -> dict[str, Any]:
        """The row of a refused recipe. Logged: each refusal says its one reason."""
        log.info("%s refuses %s: %s", self.name, recipe.name, reason)
        return {"status": "unsupported", "note": reason}

    def describe(self, meta_model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], recipes: list[Recipe],
                 footprints: dict[str, Footprint]) -> None:
        """Work out, on the weightless model, what analytic() will need (called once, before it is freed).
        The torch runtime needs nothing more: its analytic figures are the footprint's."""
        return None

    @abstractmethod
    def analytic(self, recipe: Recipe, footprint: Footprint) -> dict[str, Any]:
        """The analytic figures of the row (analytic_disk_bytes, analytic_runtime_bytes, ...) that it models."""

    def analytic_notes(self, footprint: Footprint, verified: bool) -> list[str]:
        """Notes on the analytic figures, for the row's note column."""
        return []

    def progress_label(self, recipe: Recipe) -> str:
        return f"{self.name}: {recipe.name}"

    def prepare(self, recipes: list[Recipe], context: PlanContext) -> None:
        """Build, once and before any row's job starts, what the rows of `recipes` share (ONNX Runtime's float32
        export), so that each row's build then depends on nothing another row builds."""
        return None

    def job_state(self) -> dict[str, Any]:
        """What a copy of this runtime in another process needs to build and measure one row (plain data: a row's
        job may run in a Ray task on another machine); restore_job_state takes it back."""
        return {}

    def restore_job_state(self, state: dict[str, Any]) -> None:
        return None

    @abstractmethod
    def build(self, recipe: Recipe, context: PlanContext) -> Artifact:
        """Make the recipe's artifact from the float32 reference (context.fp32_path) in context.workdir;
        BuildFailed when it cannot."""

    @abstractmethod
    def measure(self, artifact: Artifact, recipe: Recipe, context: PlanContext) -> dict[str, Any]:
        """Measure the artifact in a fresh, isolated process: the verified figures with status verified, or
        status failed and the reason."""

    def framework_baseline(self) -> int | None:
        """Resident bytes of a process of this runtime with its libraries imported, no model (measured once,
        cached)."""
        return framework_baseline(self.name)

    def device_framework_bytes(self, measured: int | None) -> int | None:
        """What a device running this runtime holds besides the model, given the measured framework baseline:
        by default that baseline (the device runs the same Python stack). None: not measured (see
        device_framework_note)."""
        return measured

    def device_framework_note(self, measured: int | None) -> str | None:
        """Why device_framework_bytes is not the measured baseline, for rows that say so."""
        return None

    def first_use_bytes(self) -> int | None:
        """What the first forward of any model costs this runtime beyond the model (thread pools, kernel
        libraries' pages): part of every verified runtime, so the analytic runtime adds it (measured once)."""
        if not hasattr(self, "_first_use"):
            self._first_use = first_use_bytes(self.name)
        return self._first_use

    def disk_bytes(self, artifact: Artifact) -> int:
        """The artifact's bytes on disk."""
        return sum(path.stat().st_size for path in artifact.files if path.exists())

    def export_format(self, artifact: Path) -> str:
        """The manifest's `format` word for the artifact (planner.artifact.load_artifact reads it)."""
        return "state_dict"

    def export_files(self, artifact: Path) -> list[Path]:
        """The files an export of the artifact copies, the model file first."""
        return [artifact]

    def how_to_load(self, file: str, suffix: str, tensor_modules: tuple[str, ...] = (),
                    restructured: bool = False) -> str:
        """One line for the export manifest: how to load the exported file (`tensor_modules`: what a fresh
        process must import first, from Recipe.tensor_modules; `restructured`: the recipe replaced layers, so the
        weights no longer fit the user's own architecture)."""
        return f"load {file} with {self.name}"
