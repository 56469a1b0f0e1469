"""The torch build worker: one recipe applied to the float32 reference and saved, in a process of its own.

The planner process never holds a recipe's copy of the model: applying int8 to ComplexNet's 2.1 GB `fc1` holds
about two float32 copies of the layer besides the reference (6.8 GB planner peak when it ran in-process). Here it
costs only this process, which the parent (planner.runtimes.torch_cpu.runtime) runs under the plan's timeout and
memory cap like every other worker, so a recipe that crashes or runs out of memory costs only its row; and each
row's build is independent of the others, so an executor may run several at once (planner.plan.executors).

`python -m planner.runtimes.torch_cpu.build JOB RESULT`; the result is {"artifact", "notes"}, or {"unsupported"}
(torchao refused the recipe once it saw the model), or {"failed"} (the recipe broke on this model).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from planner.measure.worker import worker_main
from planner.models.sources import ModelSource
from planner.recipes.recipe import Recipe

FAILED_PREFIX = "applying the recipe failed"


def artifact_format(source: ModelSource) -> str:
    return "torchscript" if source.kind == "torchscript" else "state_dict"


def save_artifact(model: torch.nn.Module, path: Path, fmt: str, recipe: Recipe | None = None,
                  structure: dict[str, Any] | None = None) -> None:
    """Write the model (a recipe's state dict with its packed pruning, or TorchScript) atomically."""
    from planner.analysis.pruning import artifact_state

    temporary = path.with_suffix(path.suffix + ".tmp")
    if fmt == "torchscript":
        torch.jit.save(model, str(temporary))
    else:
        torch.save(artifact_state(model, recipe, structure) if recipe else model.state_dict(), temporary)
    temporary.replace(path)


def make_job(source: ModelSource, recipe: Recipe, fp32_path: Path, artifact: Path, inputs: Path) -> dict[str, Any]:
    return {"source": source.to_json(), "recipe": recipe.to_json(), "fp32": str(fp32_path), "artifact": str(artifact),
            "inputs": str(inputs)}


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    from planner.analysis.artifact import load_reference, prune_channels_once
    from planner.core.pages import MappedReference
    from planner.recipes.recipe import UnsupportedRecipe, apply_recipe

    source, recipe = ModelSource.from_json(job["source"]), Recipe.from_json(job["recipe"])
    fp32_path, artifact = Path(job["fp32"]), Path(job["artifact"])
    try:
        model, structure = load_reference(source, fp32_path), None
        # This process's peak: release each layer's float32 pages once the recipe has its copy.
        mapped = MappedReference(fp32_path)
        if recipe.channels:
            inputs = tuple(torch.load(job["inputs"], weights_only=True))
            structure = prune_channels_once(model, inputs, recipe, fp32_path.parent)
            mapped.release_unused(model)
        model, notes = apply_recipe(model, recipe, after_layer=mapped.release_unused)
        save_artifact(model, artifact, artifact_format(source), recipe, structure)
    except UnsupportedRecipe as error:
        return {"unsupported": str(error)}
    except Exception as error:  # a recipe that breaks on this model is a row, not a crash
        return {"failed": f"{FAILED_PREFIX}: {type(error).__name__}: {str(error)[:200]}"}
    return {"artifact": str(artifact), "notes": notes}


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:], run_job))
