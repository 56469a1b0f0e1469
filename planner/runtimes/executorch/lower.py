"""How ExecuTorch realizes a recipe, what its .pte holds, and the build worker that makes one.

ExecuTorch runs a program lowered ahead of time: torchao quantizes the float32 reference, torch.export traces it,
and to_edge_transform_and_lower hands every subgraph XNNPACK supports to XNNPACK (the CPU delegate on phones and
boards), the rest to ExecuTorch's portable kernels. Measured with ExecuTorch 1.5.1, torchao 0.18 and torch 2.13 on
this CPU (../shared/notes/executorch-ray-probe.md and a 25M-parameter MLP here):

- fp32 and fp16 lower to XNNPACK whole; the .pte is the weights plus about 4 kB.
- int8 dynamic activations with int4 grouped weights (8da4w) or int8 per-channel weights (8da8w), from torchao's
  Int8DynamicActivationIntxWeightConfig, lower to XNNPACK: 4-bit values packed two per byte with one bfloat16
  scale per group; 8-bit values with one float32 scale per output channel. The project's int8-dynamic recipe
  (per-channel int8 weights, per-token int8 activations) is realized as 8da8w: the same arithmetic, and the
  torchao config torch uses (Int8DynamicActivationInt8WeightConfig) emits aten._int_mm, which is not Core ATen.
- Weight-only schemes have no XNNPACK kernel: IntxWeightOnlyConfig fails to lower (no out variant for
  torchao::dequantize_affine), Int8WeightOnlyConfig lowers but dequantizes every weight into the memory arena on
  each call (105 MB of arena for 25 MB of weights, 140x slower). bfloat16 has no XNNPACK kernels here: the
  portable kernels took 7.4 s per forward against 24 ms for float32.

`python -m planner.runtimes.executorch.lower JOB RESULT` builds one recipe's .pte in its own process: lowering
holds the exported program, the edge program and the serialized buffer at once (0.7-0.95 GB for a 100 MB model).
"""

from __future__ import annotations

import dataclasses
import sys
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from planner.core.safe_io import path_inside
from planner.recipes.recipe import Recipe, layer_decision

# The recipe's scheme → the scheme ExecuTorch lowers (int8-dynamic has the same arithmetic as 8da8w, see above).
REALIZED_SCHEMES = {"int8-dynamic": "8da8w", "8da8w": "8da8w", "8da4w": "8da4w"}
WEIGHT_ONLY_REASON = ("XNNPACK has no weight-only kernels: torchao's weight-only tensors do not lower "
                      "(torchao::dequantize_affine has no ExecuTorch out variant), and Int8WeightOnlyConfig "
                      "dequantizes every weight into the arena on each call (140x slower, arena larger than the "
                      "float weights)")
NO_EQUIVALENT = {
    "int8-weight-only": WEIGHT_ONLY_REASON + "; int8-dynamic (8da8w) is ExecuTorch's int8 path",
    "int4-weight-only": WEIGHT_ONLY_REASON + "; 8da4w is ExecuTorch's 4-bit path",
    "intx-weight-only": WEIGHT_ONLY_REASON + "; 8da4w is ExecuTorch's 4-bit path",
    "fp8-weight-only": "no float8 kernels in XNNPACK or ExecuTorch's portable kernels",
    "fp8-dynamic": "no float8 kernels in XNNPACK or ExecuTorch's portable kernels",
}
BFLOAT16_REASON = ("XNNPACK has no bfloat16 kernels on this CPU: ExecuTorch would run the model on its portable "
                   "kernels, measured 300x slower than float32 on XNNPACK (7.4 s against 24 ms per forward of a "
                   "25M-parameter MLP); use fp16 or 8da4w")
TINY_PROGRAM = "tiny.pte"  # planner.runtimes.baseline's first-use program, in its folder
# Layers whose weights XNNPACK takes (and packs at load); everything else stays an ExecuTorch constant.
DELEGATED_LAYERS = ("Linear", "Conv1d", "Conv2d", "ConvTranspose2d", "Conv1D")
FOLDED_NORMS = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d")
# Layers XNNPACK does not take whose presence splits a graph into many subgraphs (GPT-2: 75).
SPLITTING_LAYERS = ("Embedding", "EmbeddingBag")
# The program's flatbuffer, delegate headers and per-tensor entries: measured 3.5-4.5 kB on the MLP.
PTE_BASE_BYTES = 4096
PTE_BYTES_PER_TENSOR = 128
# 8da4w stores one bfloat16 scale per group; 8da8w one float32 scale per output channel (measured).
GROUP_SCALE_BYTES = 2
CHANNEL_SCALE_BYTES = 4


def support(recipe: Recipe) -> str | None:
    """None when ExecuTorch lowers the recipe to XNNPACK here; otherwise the reason it does not."""
    schemes = {recipe.quantize} | {override.quantize for override in recipe.layer_overrides}
    for scheme in sorted(name for name in schemes if name is not None):
        if scheme in NO_EQUIVALENT:
            return f"no ExecuTorch equivalent for {scheme}: {NO_EQUIVALENT[scheme]}"
        if scheme not in REALIZED_SCHEMES:
            return f"{scheme} is not realized on ExecuTorch here: the XNNPACK path maps int8-dynamic, 8da8w and 8da4w"
    if recipe.dtype == "bfloat16":
        return BFLOAT16_REASON
    if recipe.quantize is not None and recipe.dtype != "float32":
        return f"the XNNPACK path here lowers quantized weights on a float32 model only, not {recipe.dtype}"
    if recipe.quantize is not None and set(recipe.layers) - {"Linear", "Conv1D"}:
        other = "/".join(sorted(set(recipe.layers) - {"Linear", "Conv1D"}))
        return f"no ExecuTorch equivalent for quantizing {other} here: the XNNPACK path quantizes Linear weights only"
    return None


def realized_recipe(recipe: Recipe) -> Recipe:
    """The recipe as ExecuTorch runs it: its schemes replaced by the ones XNNPACK lowers (support() said yes)."""
    overrides = tuple(dataclasses.replace(o, quantize=REALIZED_SCHEMES.get(o.quantize, o.quantize))
                      for o in recipe.layer_overrides)
    quantize = REALIZED_SCHEMES.get(recipe.quantize, recipe.quantize) if recipe.quantize else None
    return dataclasses.replace(recipe, quantize=quantize, layer_overrides=overrides)


# ---- what the .pte holds: the analytic twin of the file ----

@dataclasses.dataclass(frozen=True)
class ProgramBytes:
    """The constants a .pte stores: those XNNPACK packs at load, the rest, and how many tensors; the largest single
    delegated weight, and whether the graph is likely to split into several XNNPACK subgraphs."""

    delegated_bytes: int
    constant_bytes: int
    tensors: int
    largest_delegated_bytes: int = 0
    split: bool = False

    @property
    def packing_bytes(self) -> int:
        """The raw copy alive beside the packed weights while XNNPACK packs at load. Each subgraph is packed at its
        own init and its raw copy freed, so the peak holds one subgraph's raw weights. A graph XNNPACK takes whole
        is one subgraph (all delegated weights: the MLP measured 2.0x). A model with layers XNNPACK does not take
        (embeddings: GPT-2 lowered to 75 subgraphs) is split; its largest subgraph is taken as its largest weight
        (GPT-2's tied head, 154 MB: load peak 834 MB measured, weights + head 834 MB)."""
        return self.largest_delegated_bytes if self.split else self.delegated_bytes

    @property
    def file_bytes(self) -> int:
        return self.delegated_bytes + self.constant_bytes + PTE_BASE_BYTES + PTE_BYTES_PER_TENSOR * self.tensors


def quantized_weight_bytes(scheme: str, out_features: int, in_features: int, group_size: int) -> int:
    """Bytes XNNPACK's serialized weight holds for one quantized (out, in) Linear weight."""
    if scheme == "8da4w":
        return (out_features * in_features + 1) // 2 + out_features * (in_features // group_size) * GROUP_SCALE_BYTES
    return out_features * in_features + out_features * CHANNEL_SCALE_BYTES


def program_bytes(meta_model: nn.Module, recipe: Recipe) -> ProgramBytes:
    """The .pte's constants for the (already structurally pruned) weightless model under the realized recipe.

    torch.export lifts a tied weight once, but XNNPACK serializes its own copy of what it takes: a weight shared by
    an embedding (a portable gather) and a delegated head is stored twice (GPT-2's fp32 .pte: 652 MB, weights
    498 MB + the 154 MB head). So ties are counted once per side, and a quantized weight is its own tensor."""
    seen: set[tuple[int, bool]] = set()
    delegated = constant = tensors = largest = 0
    split = False
    # XNNPACK folds an inference BatchNorm into the convolution before it: its tensors are not stored.
    folds_norms = any(type(module).__name__.startswith("Conv") for module in meta_model.modules())
    for name, module in meta_model.named_modules():
        if folds_norms and type(module).__name__ in FOLDED_NORMS:
            continue
        layer_recipe, quantized, _ = layer_decision(module, name, recipe)
        takes = type(module).__name__ in DELEGATED_LAYERS
        for key, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if quantized and key == "weight" and layer_recipe.quantize is not None:
                out_features, in_features = tensor.shape if type(module).__name__ != "Conv1D" else tensor.shape[::-1]
                size = quantized_weight_bytes(layer_recipe.quantize, out_features, in_features,
                                              layer_recipe.group_size)
                delegated += size
                largest = max(largest, size)
                tensors += 2  # the values and their scales
                continue
            if (id(tensor), takes) in seen:
                continue
            seen.add((id(tensor), takes))
            tensors += 1
            size = tensor.numel() * (recipe.dtype_bytes if tensor.is_floating_point() else tensor.element_size())
            if takes:
                delegated += size
                largest = max(largest, size)
            else:
                constant += size
                split = split or type(module).__name__ in SPLITTING_LAYERS
    return ProgramBytes(delegated, constant, tensors, largest, split)


# ---- building the .pte (the build worker) ----

def lower_to_pte(model: nn.Module, inputs: tuple[torch.Tensor, ...], target: Path) -> dict[str, Any]:
    """torch.export → XNNPACK partition → ExecuTorch program, written atomically to `target`. Returns the memory
    plan's bytes and which operators were left to the portable kernels."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from torchao.utils import unwrap_tensor_subclass

    from planner.models.hf_folder import kv_cache_off

    unwrap_tensor_subclass(model)
    with torch.no_grad(), kv_cache_off(model) as had_cache:
        exported = torch.export.export(model, tuple(inputs))
        edge = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()])
    graph = edge.exported_program().graph_module.graph
    portable = sorted({getattr(node.target, "__name__", str(node.target)) for node in graph.nodes
                       if node.op == "call_function" and "executorch_call_delegate" not in str(node.target)
                       and "getitem" not in str(node.target)})
    delegates = sum(1 for node in graph.nodes if "executorch_call_delegate" in str(node.target))
    program = edge.to_executorch()
    temporary = target.with_suffix(".pte.tmp")
    with open(temporary, "wb") as handle:
        program.write_to_file(handle)
    temporary.replace(target)
    plan = program.executorch_program.execution_plan[0].non_const_buffer_sizes
    return {"memory_plan_bytes": int(sum(plan)), "portable_ops": portable, "delegates": delegates,
            "had_cache": had_cache}


def layer_norms_in_float32(model: nn.Module) -> int:
    """Make every LayerNorm compute in float32 from its stored (float16) weights; returns how many.

    ExecuTorch's portable layer_norm accumulates a float16 input in float16, and XNNPACK has no layer norm to take
    it: on 768 features (GPT-2, BERT) its output measured -18.6 dB SQNR against eager float16 (84 dB on 64), and a
    whole GPT-2 -0.3 dB. Deployments keep norms in float32; the .pte stores the same float16 weights."""
    count = 0
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            module.forward = types.MethodType(_float32_layer_norm, module)
            count += 1
    return count


def _float32_layer_norm(self: nn.LayerNorm, hidden: torch.Tensor) -> torch.Tensor:
    weight = None if self.weight is None else self.weight.float()
    bias = None if self.bias is None else self.bias.float()
    return F.layer_norm(hidden.float(), self.normalized_shape, weight, bias, self.eps).to(hidden.dtype)


def build_pte(model: nn.Module, inputs: tuple[torch.Tensor, ...], recipe: Recipe, workdir: Path
              ) -> tuple[Path, dict[str, Any], list[str]]:
    """Apply the recipe as ExecuTorch realizes it to the float32 module (in place), lower it, write RECIPE.pte."""
    from planner.analysis.artifact import prune_channels_once
    from planner.recipes.recipe import UnsupportedRecipe, apply_recipe

    reason = support(recipe)
    if reason is not None:
        raise UnsupportedRecipe(reason)
    realized = realized_recipe(recipe)
    target = path_inside(Path(workdir).resolve(), f"{recipe.name}.pte")
    notes: list[str] = []
    if recipe.channels:
        prune_channels_once(model, inputs, recipe, workdir)
    model, applied = apply_recipe(model, realized)
    notes += [note.replace("stored densely: file and memory do not shrink", "stored densely in the .pte")
              .replace("stored sparse where smaller (the file shrinks), loaded dense (memory does not)",
                       "stored densely in the .pte: the file does not shrink") for note in applied]
    model.eval()
    if recipe.torch_dtype == torch.float16 and (norms := layer_norms_in_float32(model)):
        notes.append(f"{norms} LayerNorm(s) computed in float32 from their float16 weights: ExecuTorch's float16 "
                     "layer_norm accumulates in float16 (-18.6 dB on 768 features)")
    inputs = tuple(t.to(recipe.torch_dtype) if t.is_floating_point() else t for t in inputs)
    lowered = lower_to_pte(model, inputs, target)
    if lowered["had_cache"]:
        notes.append("exported with use_cache=False: the program returns the model's outputs without the KV cache")
    if lowered["portable_ops"]:
        notes.append(f"{lowered['delegates']} XNNPACK subgraph(s); portable kernels run "
                     f"{', '.join(lowered['portable_ops'][:8])}{' ...' if len(lowered['portable_ops']) > 8 else ''}")
    return target, lowered, notes


def build_job(job: dict[str, Any]) -> dict[str, Any]:
    """Worker body: build one recipe's .pte from the float32 reference in its own process."""
    from planner.analysis.artifact import load_reference
    from planner.models.sources import ModelSource

    recipe = Recipe.from_json(job["recipe"])
    inputs = tuple(torch.load(job["inputs"], weights_only=True))
    model = load_reference(ModelSource.from_json(job["source"]), Path(job["fp32"]))
    artifact, lowered, notes = build_pte(model, inputs, recipe, Path(job["workdir"]))
    return {"artifact": str(artifact), "notes": notes, "memory_plan_bytes": lowered["memory_plan_bytes"],
            "portable_ops": lowered["portable_ops"]}


def write_tiny_program(path: Path) -> None:
    """A one-Linear XNNPACK program: what planner.runtimes.baseline's first-use figure runs."""
    torch.manual_seed(0)
    lower_to_pte(nn.Sequential(nn.Linear(64, 32)).eval(), (torch.randn(4, 64),), path)


if __name__ == "__main__":
    from planner import quiet_library_noise
    from planner.measure.worker import worker_main

    if sys.argv[1:2] == ["--tiny"]:  # planner.runtimes.baseline: the program its first-use figure runs
        quiet_library_noise()
        write_tiny_program(Path(sys.argv[2]) / TINY_PROGRAM)
        sys.exit(0)
    sys.exit(worker_main(sys.argv[1:], build_job))
