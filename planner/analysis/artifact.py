"""Artifacts: a model's structure without weights, and loading a saved or exported artifact.

A state-dict artifact is the recipe's `state_dict()` saved with torch.save; loading it means building the
model's structure on the meta device and assigning the saved tensors (torchao tensor subclasses included),
so no float32 copy is ever materialized.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from planner.models.sources import ModelSource

if TYPE_CHECKING:
    from planner.recipes.recipe import Recipe


def weightless_structure(source: ModelSource, artifact_format: str) -> nn.Module | None:
    """The model without weights, so loading the artifact is the only weight memory measured."""
    if artifact_format == "torchscript":
        return None
    model = source.build("meta")
    _restore_non_persistent_buffers(model, source)
    # Sources that cannot build weightless (.pt2, pickles) built real tensors: drop them now.
    for module in model.modules():
        for key, param in list(module.named_parameters(recurse=False)):
            if param.device.type != "meta":
                setattr(module, key, torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad))
        persistent = [key for key, _ in module.named_buffers(recurse=False)
                      if key not in getattr(module, "_non_persistent_buffers_set", set())]
        for key in persistent:
            module._buffers[key] = module._buffers[key].to("meta")
    return model


def _restore_non_persistent_buffers(model: nn.Module, source: ModelSource) -> None:
    """Non-persistent buffers (masks, rotary tables) are not in a state dict: take them from a real build."""
    missing = [(module, key) for module in model.modules()
               for key in getattr(module, "_non_persistent_buffers_set", set())
               if module._buffers.get(key) is not None and module._buffers[key].device.type == "meta"]
    if not missing:
        return
    real = dict(source.build("cpu").named_modules())
    names = {id(module): name for name, module in model.named_modules()}
    for module, key in missing:
        module._buffers[key] = real[names[id(module)]]._buffers[key]
    del real


def load_weights_into(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Assign saved tensors to a weightless structure, then restore weight tying.

    load_state_dict(assign=True) gives tied parameters (GPT-2's lm_head and wte) separate Parameter
    objects over one shared storage; a later dtype cast would then make two copies. Re-pointing every
    holder at one Parameter keeps them one tensor, as in the original model.
    """
    model.load_state_dict(state, strict=True, assign=True)
    first: dict[tuple, nn.Parameter] = {}
    for module in model.modules():
        for key, param in list(module._parameters.items()):
            if param is None or type(param) is not nn.Parameter or param.device.type == "meta":
                continue
            identity = (param.untyped_storage().data_ptr(), param.storage_offset(), tuple(param.shape),
                        param.stride(), param.dtype)
            kept = first.setdefault(identity, param)
            if kept is not param:
                module._parameters[key] = kept
    return model


def set_eval(model: nn.Module) -> nn.Module:
    """eval() where the module allows it: a torch.export graph module refuses, and is exported in eval already."""
    try:
        model.eval()
    except NotImplementedError:
        pass
    return model


def load_artifact(folder: str | Path) -> nn.Module:
    """Load an exported artifact (DIR/RECIPE with manifest.json) into a ready-to-run module."""
    folder = Path(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    if manifest["format"] == "onnx":
        raise ValueError(f"{folder} holds an ONNX model: load it with onnxruntime.InferenceSession")
    if manifest["format"] == "executorch":
        raise ValueError(f"{folder} holds an ExecuTorch program: load it with "
                         "executorch.runtime.Runtime.get().load_program(path).load_method('forward')")
    if manifest["format"] == "torchscript":
        return torch.jit.load(str(folder / manifest["file"]), map_location="cpu")
    from planner.recipes.recipe import import_tensor_types

    import_tensor_types()
    source = ModelSource.from_json(manifest["source"])
    model = weightless_structure(source, manifest["format"])
    assert model is not None
    if manifest.get("recipe"):
        from planner.recipes.recipe import Recipe, linearize_conv1d

        linearize_conv1d(model, Recipe.from_json(manifest["recipe"]))
    from planner.analysis.pruning import unpack_artifact_state

    load_weights_into(model, unpack_artifact_state(model, torch.load(folder / manifest["file"], weights_only=True)))
    return set_eval(model)


def load_reference(source: ModelSource, fp32_path: Path) -> nn.Module:
    """A fresh float32 model backed by the memory-mapped reference weights (no second copy)."""
    if source.kind == "torchscript":
        return torch.jit.load(str(fp32_path), map_location="cpu")
    model = weightless_structure(source, "state_dict")
    assert model is not None
    load_weights_into(model, torch.load(fp32_path, weights_only=True, mmap=True))
    return set_eval(model)


def prune_channels_once(model: nn.Module, inputs: tuple[torch.Tensor, ...], recipe: Recipe, workdir: Path
                        ) -> dict[str, Any]:
    """planner.analysis.pruning.prune_channels on the float32 reference, once per plan for each pruning: the
    rows of several runtimes with the same structured pruning (struct50-int4-g128 on torch and ONNX Runtime)
    prune the same weights the same way, 20 s each on ComplexNet. The first build saves the pruned float32 state
    and its structure in the plan's work directory (renamed into place whole, so a parallel build reads all of it
    or none); the others rebuild the structure and assign the saved tensors (mmapped). Returns the structure."""
    from planner.analysis.pruning import STRUCTURE_KEY, prune_channels, pruning_key, rebuild

    # The architecture's tensor names and shapes in the name too: a work directory shared by two models (an API
    # caller's) must not hand one the other's pruning.
    shapes = json.dumps([[key, list(tensor.shape)] for key, tensor in model.state_dict().items()])
    architecture = hashlib.sha256(shapes.encode()).hexdigest()[:16]
    saved_path = Path(workdir) / f"pruned-{pruning_key(recipe)}-{architecture}.pt"
    if saved_path.exists():
        state = torch.load(saved_path, mmap=True, weights_only=True)
        structure: dict[str, Any] = json.loads(state.pop(STRUCTURE_KEY))
        load_weights_into(rebuild(model, structure), state)
        return structure
    structure = prune_channels(model, inputs, recipe)
    partial = saved_path.with_name(f"{saved_path.name}.{os.getpid()}.tmp")
    torch.save({**model.state_dict(), STRUCTURE_KEY: json.dumps(structure, separators=(",", ":"))}, partial)
    partial.replace(saved_path)
    return structure
