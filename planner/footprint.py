"""The analytic footprint of a recipe, before anything runs: weights, disk, activations, runtime.

Works on a model built on the meta device: sizes come from shapes and the recipe's stored layout
(planner.recipes), activations from a liveness trace of a weightless forward (planner.activations).
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from planner.recipes import Recipe, prunable, quantization_decision

# torch.save's zip container: a fixed part plus a record per stored tensor (measured on torch 2.13:
# 1.5 kB + about 300 B per storage for plain and torchao tensors alike).
CONTAINER_BASE_BYTES = 1500
CONTAINER_BYTES_PER_STORAGE = 310


@dataclass
class LayerFootprint:
    name: str
    type: str
    params: int
    fp32_bytes: int
    recipe_bytes: int
    quantized: bool
    note: str = ""


@dataclass
class Footprint:
    recipe: str
    layers: list[LayerFootprint]
    weight_bytes: int  # parameters and buffers resident after the recipe
    disk_bytes: int  # state dict payload plus container overhead
    activation_bytes: int | None = None  # liveness peak of one forward, transients included
    transient_bytes: int | None = None  # largest non-output allocation inside a layer (e.g. a dequantized weight)
    quantized_layers: int = 0
    pruned_layers: int = 0
    notes: list[str] = field(default_factory=list)
    unsupported: str | None = None  # why the recipe cannot apply to this model (set by planner.pruning)

    @property
    def runtime_bytes(self) -> int | None:
        if self.activation_bytes is None:
            return None
        return self.weight_bytes + self.activation_bytes


def tensor_bytes_after(tensor: torch.Tensor, recipe: Recipe) -> int:
    """Bytes of an untouched tensor after the recipe's dtype cast (only floating tensors are cast)."""
    if tensor.is_floating_point():
        return tensor.numel() * recipe.dtype_bytes
    return tensor.numel() * tensor.element_size()


def weight_footprint(model: nn.Module, recipe: Recipe) -> Footprint:
    """Per-layer parameter bytes after the recipe, resident and on disk. Shapes only: meta is fine."""
    layers: list[LayerFootprint] = []
    seen: set[int] = set()  # a tied plain tensor is stored and resident once
    # quantize_ replaces each holder's weight on its own, so a quantized holder of a tied weight gets its
    # own copy and the other holders keep the original.
    holders = Counter(id(value) for module in model.modules() for value in module._parameters.values()
                      if value is not None)
    resident = disk = storages = quantized = pruned = 0
    skipped: dict[str, int] = {}
    tie_notes: set[str] = set()
    for name, module in model.named_modules():
        is_quantized, reason = quantization_decision(module, recipe)
        pruned += int(prunable(module, recipe))
        if reason:
            skipped[reason] = skipped.get(reason, 0) + 1
        persistent = {key: value for key, value in module.named_buffers(recurse=False)
                      if key not in getattr(module, "_non_persistent_buffers_set", set())}
        own_params = list(module.named_parameters(recurse=False))
        param_ids = {id(tensor) for _, tensor in own_params}  # TorchScript parameters are plain tensors
        tensors = own_params + list(module.named_buffers(recurse=False))
        if not tensors:
            continue
        params = fp32 = after = 0
        for key, tensor in tensors:
            quantize_this = is_quantized and key == "weight"
            if quantize_this and holders[id(tensor)] > 1:
                tie_notes.add(f"{name}.{key} is a tied weight: quantizing it here stores a second copy")
            elif not quantize_this:
                if id(tensor) in seen:
                    continue
                seen.add(id(tensor))
            fp32 += tensor.numel() * (4 if tensor.is_floating_point() else tensor.element_size())
            is_param = id(tensor) in param_ids
            if is_param:
                params += tensor.numel()
            if quantize_this:
                out_features, in_features = tensor.shape
                layout = recipe.scheme.layout(out_features, in_features, recipe)  # type: ignore[union-attr]
                size, count = layout.total_bytes, layout.storages
            else:
                size, count = tensor_bytes_after(tensor, recipe), 1
            after += size
            if is_param or key in persistent:
                disk += size
                storages += count
        resident += after
        quantized += int(is_quantized)
        layers.append(LayerFootprint(name or "(top)", type(module).__name__, params, fp32, after, is_quantized,
                                     reason))
    footprint = Footprint(recipe.name, layers, weight_bytes=resident,
                          disk_bytes=disk + CONTAINER_BASE_BYTES + CONTAINER_BYTES_PER_STORAGE * storages,
                          quantized_layers=quantized, pruned_layers=pruned)
    if recipe.scheme is not None:
        footprint.notes.append(f"quantizes {quantized} layer(s)")
        footprint.notes += _coverage_notes(layers, recipe)
        if recipe.scheme.caveat:
            footprint.notes.append(recipe.scheme.caveat)
        footprint.notes += [f"{count} left in {recipe.dtype}: {reason}" for reason, count in skipped.items()]
        footprint.notes += sorted(tie_notes)
    return footprint


def _coverage_notes(layers: list[LayerFootprint], recipe: Recipe) -> list[str]:
    """Say how much of the model the quantization reached, and which large layer types it left alone
    (GPT-2's projections are transformers' Conv1D, not Linear: int8 then reaches only the tied lm_head)."""
    total = sum(layer.params for layer in layers)
    reached = sum(layer.params for layer in layers if layer.quantized)
    if not total or reached / total >= 0.9:
        return []
    untouched: Counter[str] = Counter()
    for layer in layers:
        if not layer.quantized and layer.params:
            untouched[layer.type] += layer.params
    largest = ", ".join(f"{kind} {count / total:.0%}" for kind, count in untouched.most_common(3)
                        if count / total >= 0.01)
    return [f"quantized layers hold {reached / total:.0%} of the parameters; left in {recipe.dtype}: {largest}"]


def weightless_recipe_model(meta_model: nn.Module, recipe: Recipe) -> tuple[nn.Module, str]:
    """A meta copy of the model with the recipe's dtype and, where torchao allows, its quantization."""
    model = copy.deepcopy(meta_model).to(recipe.torch_dtype)
    scheme = recipe.scheme
    if scheme is None:
        return model, ""
    if not scheme.weightless_ok:
        return model, f"activations traced on the {recipe.dtype} model ({scheme.name} cannot run on meta)"
    from torchao.quantization import quantize_

    from planner.recipes import layer_filter

    quantize_(model, scheme.make_config(recipe), filter_fn=layer_filter(recipe))
    return model, ""


def cast_inputs(inputs: tuple[torch.Tensor, ...], dtype: torch.dtype, device: str | None = None
                ) -> tuple[torch.Tensor, ...]:
    """Floating inputs follow the recipe's dtype; token ids and masks keep theirs."""
    return tuple(
        tensor.to(device=device or tensor.device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
        for tensor in inputs
    )


def analytic_footprint(meta_model: nn.Module, inputs: tuple[torch.Tensor, ...], recipe: Recipe) -> Footprint:
    """Weights and disk from shapes, activations from a weightless liveness trace."""
    from planner.activations import activation_peak

    footprint = weight_footprint(meta_model, recipe)
    if recipe.scheme is not None and recipe.scheme.needs_cuda and not torch.cuda.is_available():
        footprint.notes.append("activations not traced: the scheme has no CPU kernel")
        return footprint
    try:
        traced_model, note = weightless_recipe_model(meta_model, recipe)
        device = next((t.device.type for t in traced_model.parameters()), "meta")
        report = activation_peak(traced_model, cast_inputs(inputs, recipe.torch_dtype, device))
    except Exception as error:  # a model whose forward cannot run weightless still gets its weight figures
        footprint.notes.append(f"activations not traced ({type(error).__name__}: {str(error)[:120]})")
        return footprint
    if note:
        footprint.notes.append(note)
    footprint.activation_bytes = report.peak_bytes
    footprint.transient_bytes = report.transient_bytes
    if report.fused_ops:
        footprint.notes.append(f"fused kernels hide workspace: {', '.join(sorted(set(report.fused_ops)))}")
    return footprint
