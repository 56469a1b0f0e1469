"""The analytic footprint of a recipe, before anything runs: weights, disk, activations, runtime.

Works on a model built on the meta device: sizes come from shapes and the recipe's stored layout
(planner.recipes.recipe), activations from a liveness trace of a weightless forward (planner.analysis.activations).
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from planner.recipes.recipe import Recipe, layer_decision, prunable

if TYPE_CHECKING:
    from planner.analysis.generation import GenerationSpec, GenerationTrace

# torch.save's zip container: a fixed part plus a record per stored tensor (measured on torch 2.13:
# 1.5 kB + about 300 B per storage for plain and torchao tensors alike).
CONTAINER_BASE_BYTES = 1500
CONTAINER_BYTES_PER_STORAGE = 310
# The KV formula is trusted while it agrees with the cache transformers builds in the trace to within this share.
KV_CHECK_TOLERANCE = 0.02


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
    output_bytes: int | None = None  # the forward's outputs (part of activation_bytes: alive at the end)
    input_bytes: int | None = None  # the example inputs after the recipe's cast (held by the caller, not counted)
    quantized_layers: int = 0
    pruned_layers: int = 0
    notes: list[str] = field(default_factory=list)
    unsupported: str | None = None  # why the recipe cannot apply to this model (set by planner.analysis.pruning)
    # --context (planner.analysis.generation): the KV cache at the end of generation, and the traced peaks of the
    # prefill and of the last decode step (each with the cache alive then); activation_bytes is then the larger
    # peak less the KV cache
    kv_cache_bytes: int | None = None
    prefill_peak_bytes: int | None = None
    decode_peak_bytes: int | None = None

    @property
    def runtime_bytes(self) -> int | None:
        if self.activation_bytes is None:
            return None
        return self.weight_bytes + self.activation_bytes + (self.kv_cache_bytes or 0)


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
        layer_recipe, is_quantized, reason = layer_decision(module, name, recipe)
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
                layout = layer_recipe.scheme.layout(out_features, in_features, layer_recipe)  # type: ignore[union-attr]
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
    (a recipe with layers = ["Linear"] on GPT-2 leaves its Conv1D projections: 76% of the parameters)."""
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
    """A meta copy of the model with the recipe's dtype and its quantization (schemes whose quantization checks
    for a CPU weight are quantized on storage-less FakeTensors that claim the CPU, see _quantize_like_cpu)."""
    from planner.recipes.recipe import layer_filter, linearize_conv1d

    model = copy.deepcopy(meta_model).to(recipe.torch_dtype)
    scheme = recipe.scheme
    linearize_conv1d(model, recipe)  # what apply_recipe does before quantizing
    if recipe.layer_overrides:
        from planner.recipes.recipe import quantize_per_layer

        left = _quantize_left_like_cpu(model, recipe, quantize_per_layer(model, recipe, weightless=True))
        named = ", ".join(left) if len(left) <= 3 else f"{len(left)} layers ({', '.join(left[:2])}, ...)"
        return model, (f"activations of {named} traced in {recipe.dtype} without their quantization (the scheme "
                       "cannot run weightless)" if left else "")
    if scheme is None:
        return model, ""
    try:
        quantize_on_meta(model, scheme.make_config(recipe), layer_filter(recipe), like_cpu=not scheme.weightless_ok)
    except Exception as error:  # the dtype model's trace is the best left; the note says so
        if scheme.weightless_ok:
            raise
        model = copy.deepcopy(meta_model).to(recipe.torch_dtype)
        linearize_conv1d(model, recipe)
        return model, (f"activations traced on the {recipe.dtype} model ({scheme.name} cannot run weightless: "
                       f"{type(error).__name__})")
    return model, ""


def _quantize_left_like_cpu(model: nn.Module, recipe: Recipe, fqns: list[str]) -> list[str]:
    """Quantize the layers a mixed recipe could not quantize on meta as on a CPU; the fqns that still failed."""
    from planner.recipes.recipe import layer_decision

    left = []
    for fqn in fqns:
        module = model.get_submodule(fqn)
        layer_recipe, _quantized, _reason = layer_decision(module, fqn, recipe)
        try:
            _quantize_like_cpu(module, layer_recipe.scheme.make_config(layer_recipe))  # type: ignore[union-attr]
        except Exception:  # traced unquantized, and the note names it
            left.append(fqn)
    return left


def quantize_on_meta(model: nn.Module, config: Any, filter_fn: Callable[[nn.Module, str], bool],
                     like_cpu: bool = False) -> None:
    """torchao's quantize_ for a weightless model, once per distinct layer signature.

    On meta the quantized layout depends only on the layer type, the weight's shape and dtype, the bias and
    the config, so the other layers of a signature get the template's quantized weight (a detached alias:
    each module holds its own Parameter). A 7B Llama has 225 Linear layers and 4 signatures: quantizing
    each took most of the int8 analytic time. like_cpu: quantize each template as on a CPU (_quantize_like_cpu).
    """
    from torchao.quantization import quantize_

    templates: dict[tuple[Any, ...], torch.Tensor] = {}
    for fqn, module in list(model.named_modules()):
        if not filter_fn(module, fqn):
            continue
        weight = module.weight
        key = (type(module), tuple(weight.shape), weight.dtype, getattr(module, "bias", None) is not None)
        if key in templates:
            module.weight = nn.Parameter(templates[key].detach(), requires_grad=False)
            continue
        if like_cpu:
            _quantize_like_cpu(module, config)
        else:
            quantize_(module, config, filter_fn=lambda candidate, _name, chosen=module: candidate is chosen)
        if module.weight is not weight:  # a config that leaves this layer alone is not a template
            templates[key] = module.weight


def _quantize_like_cpu(module: nn.Module, config: Any) -> None:
    """Quantize one meta layer as torchao does on a CPU, without storage.

    Some torchao schemes assert that the weight lives on the CPU and pack it with a CPU op (the prototype int4's
    Int4OpaqueTensor: `_convert_weight_to_int4pack_for_cpu`), so they cannot run on meta. On a FakeTensor that
    claims the CPU they run their shape logic and give the exact quantized layout; the result is moved back to
    meta so the trace treats it like any other weightless layer. Tracing the quantized model, not the float one,
    matters: a tensor-subclass weight sends nn.TransformerEncoderLayer down its slow path, separate attention and
    feed-forward ops (zoo:tinylm int4 at batch 64: 50.4 MB traced on the int4 model, 50.5 MB measured; the bf16
    model's fused fast path traced 42.0 MB).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torchao.quantization import quantize_

    from planner.analysis.activations import fake_on

    fake_mode = FakeTensorMode()
    weight = module.weight
    module.weight = nn.Parameter(fake_on(weight, fake_mode, "cpu"), requires_grad=False)
    try:
        with fake_mode:
            quantize_(module, config, filter_fn=lambda candidate, _name: candidate is module)
        quantized = module.weight
    finally:
        module.weight = weight
    if is_traceable_wrapper_subclass(quantized):
        module.weight = nn.Parameter(fake_on(quantized, None, "meta"), requires_grad=False)


def cast_inputs(inputs: tuple[torch.Tensor, ...], dtype: torch.dtype, device: str | None = None
                ) -> tuple[torch.Tensor, ...]:
    """Floating inputs follow the recipe's dtype; token ids and masks keep theirs."""
    return tuple(
        tensor.to(device=device or tensor.device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
        for tensor in inputs
    )


def analytic_footprint(meta_model: nn.Module, inputs: tuple[torch.Tensor, ...], recipe: Recipe,
                       measure_scratch: bool = True, generation: GenerationSpec | None = None) -> Footprint:
    """Weights and disk from shapes, activations from a weightless liveness trace, plus the measured workspace of
    kernels the trace cannot see into (planner.analysis.scratch; measured on first use unless measure_scratch is
    off). With `generation`, the activations are generate()'s at that context (planner.analysis.generation):
    `inputs` is the prompt, and the KV cache gets its own figure."""
    from planner.analysis.activations import activation_peak
    from planner.analysis.generation import trace_generation
    from planner.analysis.scratch import SCRATCH_OPS
    from planner.core.units import format_bytes

    footprint = weight_footprint(meta_model, recipe)
    if recipe.scheme is not None and recipe.scheme.missing_kernel():
        footprint.notes.append("activations not traced: the scheme has no CPU kernel")
        return footprint
    try:
        traced_model, note = weightless_recipe_model(meta_model, recipe)
        device = next((t.device.type for t in traced_model.parameters()), "meta")
        traced_inputs = cast_inputs(inputs, recipe.torch_dtype, device)
        if generation is None:
            def trace(scratch: dict[str, Any]) -> tuple[Any, list[str]]:
                report = activation_peak(traced_model, traced_inputs, scratch=scratch)
                return report, report.scratch_calls
        else:
            def trace(scratch: dict[str, Any]) -> tuple[Any, list[str]]:
                traced = trace_generation(traced_model, traced_inputs[0], generation, scratch)
                return traced, traced.scratch_calls
        traced, failure = _with_measured_scratch(trace, measure_scratch)
        if failure:
            footprint.notes.append(f"kernel workspace not measured: {failure}")
    except Exception as error:  # a model whose forward cannot run weightless still gets its weight figures
        footprint.notes.append(f"activations not traced ({type(error).__name__}: {str(error)[:120]})")
        return footprint
    if note:
        footprint.notes.append(note)
    reports = [traced] if generation is None else [r for r in (traced.prefill, traced.decode) if r is not None]
    applied: dict[str, int] = {}
    for report in reports:
        for op, nbytes in report.scratch_applied.items():
            applied[op] = max(nbytes, applied.get(op, 0))
    if applied:
        added = ", ".join(f"{op.removeprefix('aten.')} {format_bytes(nbytes)}"
                          for op, nbytes in sorted(applied.items()))
        footprint.notes.append(f"measured kernel workspace added: {added}")
    if generation is None:
        footprint.activation_bytes = traced.peak_bytes
        footprint.output_bytes = traced.output_bytes
    else:
        _set_generation_figures(footprint, meta_model, traced, generation, recipe, int(inputs[0].shape[0]))
    footprint.transient_bytes = max(report.transient_bytes for report in reports)
    footprint.input_bytes = sum(t.numel() * t.element_size() for t in cast_inputs(inputs, recipe.torch_dtype))
    unmeasured = sorted({op for report in reports for op in report.fused_ops} - SCRATCH_OPS)
    if unmeasured:
        footprint.notes.append(f"fused kernels hide workspace: {', '.join(unmeasured)}")
    return footprint


def _with_measured_scratch(trace: Callable[[dict[str, Any]], tuple[Any, list[str]]], measure_scratch: bool
                           ) -> tuple[Any, str | None]:
    """trace(scratch) with this machine's cached kernel workspace; kernels met at shapes not measured yet are
    measured once (a child process, cached per machine) and the trace runs again with them. Returns what the
    trace returned and why measuring failed (None if it did not)."""
    from planner.analysis.scratch import load_cache, scratch_bytes

    cached = load_cache()
    traced, calls = trace(cached)
    if not measure_scratch or not set(calls) - set(cached):
        return traced, None
    scratch, failure = scratch_bytes(calls)
    return trace(scratch)[0], failure


def _set_generation_figures(footprint: Footprint, meta_model: nn.Module, traced: GenerationTrace,
                            generation: GenerationSpec, recipe: Recipe, batch: int) -> None:
    """The KV cache from the formula (checked against the traced cache), and the activations beyond it: the
    generation peak less the cache, so that weights + KV cache + activations is the analytic runtime."""
    from planner.analysis.generation import cache_implementation_note
    from planner.analysis.kv_cache import cache_bytes, kv_geometry
    from planner.core.units import format_bytes

    geometry = kv_geometry(meta_model.config)
    kv_bytes = cache_bytes(geometry, generation.cached_tokens, recipe.torch_dtype.itemsize, batch)
    if geometry.unmodelled:
        footprint.notes.append(f"KV cache layers the formula does not model: {', '.join(geometry.unmodelled)}")
    if abs(kv_bytes - traced.cache_bytes) > KV_CHECK_TOLERANCE * max(traced.cache_bytes, 1):
        # The traced cache is transformers' own object at these shapes: trust it over the formula's reading.
        footprint.notes.append(f"KV cache {format_bytes(traced.cache_bytes)} as traced, not the formula's "
                               f"{format_bytes(kv_bytes)} (a geometry the config does not state)")
        kv_bytes = traced.cache_bytes
    note = cache_implementation_note(meta_model)
    if note:
        footprint.notes.append(note)
    footprint.kv_cache_bytes = kv_bytes
    footprint.prefill_peak_bytes = traced.prefill.peak_bytes
    footprint.decode_peak_bytes = traced.decode.peak_bytes if traced.decode else None
    footprint.activation_bytes = max(0, traced.peak_bytes - kv_bytes)
    footprint.output_bytes = (traced.decode or traced.prefill).output_bytes
    where = "prefill" if traced.decode is None or traced.prefill.peak_bytes >= traced.decode.peak_bytes else \
        "last decode step"
    footprint.notes.append(f"generation: prompt {generation.prompt_tokens} + {generation.new_tokens} generated "
                           f"tokens, KV cache at {generation.cached_tokens} positions; peak in the {where}")
