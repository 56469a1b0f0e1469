"""`planner inspect`: a per-layer table in the spirit of torchsummary, from a weightless trace.

Each layer: type, output shape, parameters, parameter bytes under each selected recipe (with `*` where the
recipe quantizes it), output bytes, and the live activation bytes while it ran, so the layer where the
peak happens is visible. Nothing is materialized: the model is built on the meta device.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import nn

from planner.analysis.activations import ActivationReport, activation_peak, fake_forward
from planner.analysis.footprint import Footprint, cast_inputs, weight_footprint, weightless_recipe_model
from planner.analysis.scratch import SCRATCH_OPS, load_cache
from planner.recipes.recipe import Recipe


@dataclass
class Inspection:
    batch: int
    layers: pd.DataFrame  # one row per module that has parameters or outputs
    footprints: dict[str, Footprint]
    activations: dict[str, ActivationReport]  # per recipe (dtype and quantization change them)


def output_shapes(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> dict[str, list[int]]:
    """Shape of each module's (first tensor) output, from one weightless forward on fake tensors (plain meta
    tensors raise in data-dependent code, e.g. transformers' mask preparation calls .item())."""
    names = {id(module): name for name, module in model.named_modules()}
    shapes: dict[str, list[int]] = {}

    def record(module: nn.Module, args: Any, output: Any) -> None:
        tensor = output if isinstance(output, torch.Tensor) else next(
            (item for item in (output if isinstance(output, tuple | list) else ()) if isinstance(item, torch.Tensor)),
            None)
        if tensor is not None:
            shapes[names[id(module)] or "(top)"] = list(tensor.shape)

    handles = [module.register_forward_hook(record) for module in model.modules()]
    try:
        fake_forward(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def inspect_model(meta_model: nn.Module, inputs: tuple[torch.Tensor, ...], recipes: list[Recipe],
                  batch: int) -> Inspection:
    """The per-layer table for one batch size; its activation columns are those of the first recipe."""
    footprints = {recipe.name: weight_footprint(meta_model, recipe) for recipe in recipes}
    scratch = load_cache()  # kernel workspace measured by earlier plans on this machine; inspect measures nothing
    if isinstance(meta_model, torch.jit.ScriptModule):
        # TorchScript cannot run weightless (no FakeTensors, no functional_call, no Python hooks): it was loaded on
        # cpu (only with --trust-code), so its forward runs for real, in each recipe's dtype; torchao cannot
        # quantize it, so quantized recipes trace their dtype alone.
        reports = {recipe.name: activation_peak(copy.deepcopy(meta_model).to(recipe.torch_dtype),
                                                cast_inputs(inputs, recipe.torch_dtype, "cpu"), scratch=scratch,
                                                memoize=False)
                   for recipe in recipes}
        shapes: dict[str, list[int]] = {}
    else:
        reports = {recipe.name: activation_peak(weightless_recipe_model(meta_model, recipe)[0],
                                                cast_inputs(inputs, recipe.torch_dtype, "meta"), scratch=scratch)
                   for recipe in recipes}
        shapes = output_shapes(meta_model, cast_inputs(inputs, torch.float32, "meta"))
    activations = reports[recipes[0].name]
    rows = []
    for name, module in meta_model.named_modules():
        key = name or "(top)"
        per_module = activations.per_module.get(name) or activations.per_module.get(key)
        row: dict[str, Any] = {
            "layer": key,
            "type": type(module).__name__,
            "output shape": "×".join(map(str, shapes[key])) if key in shapes else "",
            "params": sum(p.numel() for p in module.parameters(recurse=False)),
        }
        for recipe in recipes:
            layer = next((item for item in footprints[recipe.name].layers if item.name == key), None)
            size = layer.recipe_bytes if layer else 0
            row[f"{recipe.name} bytes"] = f"{size:,}{'*' if layer and layer.quantized else ''}"
            if recipe.layer_overrides:  # a mixed recipe: the precision it chose for this layer
                override = recipe.override_for(name)
                row[f"{recipe.name} precision"] = override.label if override else ""
        row["output bytes"] = per_module.output_bytes if per_module else 0
        row["live bytes while running"] = per_module.peak_bytes if per_module else 0
        row["peak here"] = "◀ peak" if name == activations.peak_module and name else ""
        if row["params"] or row["output bytes"]:
            rows.append(row)
    return Inspection(batch, pd.DataFrame(rows), footprints, reports)


def summary_row(inspection: Inspection, recipe: Recipe) -> dict[str, Any]:
    footprint = inspection.footprints[recipe.name]
    activations = inspection.activations[recipe.name]
    return {
        "batch": inspection.batch,
        "recipe": recipe.name,
        "params": sum(layer.params for layer in footprint.layers),
        "weight bytes": footprint.weight_bytes,
        "activation peak bytes": activations.peak_bytes,
        "runtime bytes": footprint.weight_bytes + activations.peak_bytes,
        "peak in": activations.peak_module or "(top)",
        "kernel workspace (measured, cached)": ", ".join(f"{op.removeprefix('aten.')} {nbytes:,}" for op, nbytes
                                                        in sorted(activations.scratch_applied.items())),
        "workspace not counted": ", ".join(sorted(set(activations.fused_ops) - SCRATCH_OPS
                                                  | set(activations.scratch_missing))),
    }
