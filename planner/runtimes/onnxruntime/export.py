"""The ONNX Runtime backend: export the float model, then quantize in ONNX with onnxruntime's own tools.

torchao-quantized models mostly do not export (int8 dynamic needs `aten._int_mm`, which has no ONNX
function), so every ONNX artifact starts from the float32 model:

* pruning is done on the torch model first (the planner's own magnitude pruning), then exported;
* fp16 is `onnxruntime.transformers.float16.convert_float_to_float16` with float32 inputs and outputs;
* int8-dynamic is `onnxruntime.quantization.quantize_dynamic` on MatMul nodes with a constant weight;
* int4-weight-only is `MatMulNBitsQuantizer` (4-bit blocks of `group_size` along K).

Both quantizers ignore `Gemm`, which is what a Linear on a 2-D input exports as, so the graph is rewritten
to MatMul+Add first (`gemm_to_matmul`). The exporter is the dynamo one (`dynamo=True`): the legacy
TorchScript exporter de-duplicates identical initializers (a deep-copied TransformerEncoder shrinks
fourfold), which would make ONNX file sizes incomparable with the torch ones.
"""

from __future__ import annotations

import ast
import contextlib
import io
import logging
import math
import re
import sys
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from planner.core.safe_io import path_inside
from planner.models.hf_folder import kv_cache_off
from planner.recipes.recipe import Recipe, UnsupportedRecipe

# One initializer above 2 GB cannot be inline (protobuf's limit is for the whole file): use external data well
# before that, so a model whose quantized graph grows a little still saves.
EXTERNAL_DATA_THRESHOLD_BYTES = 1_500_000_000
# Exporter-made constants of at least this many equal elements are stored as ConstantOfShape.
SPLAT_MIN_ELEMENTS = 1024
# Graph overhead beyond the tensor payloads, fitted on the zoo models and an MLP (onnx 1.23, torch 2.13,
# onnxruntime 1.32; node metadata stripped): a fixed part (header, opsets, graph inputs and outputs), each
# stored tensor's header and name, the Cast nodes fp16 conversion adds around the float32 inputs and outputs,
# and per quantized MatMul the nodes the quantizer adds (int8: DynamicQuantizeLinear, MatMulInteger, Cast,
# two Mul, plus the scale and zero-point tensors; int4: MatMulNBits and its scales/zero-point tensors, which
# cost what the float MatMul and its weight header did). Residuals: under 20 B on SimpleNet and the MLP, under
# 0.2 % (7 kB) on ConvNet, TinyLM and the LSTM (gate slicing, shape constants).
GRAPH_BASE_BYTES = 1_500
GRAPH_BYTES_PER_TENSOR = 100
FP16_CAST_BYTES = 450
QUANTIZED_NODE_BYTES = {"int8-dynamic": 495, "int4-weight-only": 0}
# Layer types the ONNX quantizers can reach: a Linear's weight becomes the constant B of a MatMul.
ONNX_QUANTIZABLE_LAYERS = frozenset({"Linear", "Conv1D"})  # Conv1D exports as MatMul/Gemm too
# The quantized node kinds each scheme produces, for `count_quantized_nodes`.
QUANTIZED_OP_TYPES = {"int8-dynamic": ("MatMulInteger", "DynamicQuantizeMatMul"),
                      "int4-weight-only": ("MatMulNBits",)}
# torchao schemes onnxruntime has no CPU kernel for (weight-only int8 and intx, float8); any other scheme without
# an entry above is one this backend has not mapped yet, and its row says that instead.
NO_ONNX_EQUIVALENT = frozenset({"int8-weight-only", "intx-weight-only", "fp8-weight-only", "fp8-dynamic"})


# ---- which recipes have an ONNX Runtime equivalent ----

def onnx_recipe_support(recipe: Recipe) -> str | None:
    """None when the recipe maps to an ONNX Runtime CPU artifact; otherwise the reason it does not."""
    if recipe.quantize in NO_ONNX_EQUIVALENT:
        return (f"no ONNX Runtime CPU equivalent for {recipe.quantize}: onnxruntime quantizes weights to int8 with "
                "int8 activations (int8-dynamic) or to 4-bit blocks (int4-weight-only) only")
    if recipe.quantize is not None and recipe.quantize not in QUANTIZED_OP_TYPES:  # a scheme not mapped here yet
        return (f"{recipe.quantize} is not realized on ONNX Runtime here: the ONNX path maps only int8-dynamic "
                "(quantize_dynamic) and int4-weight-only (MatMulNBits)")
    if recipe.dtype == "bfloat16" and recipe.quantize != "int4-weight-only":
        return "no ONNX Runtime CPU equivalent: bfloat16 has almost no CPU kernels in ONNX Runtime"
    if recipe.quantize is None:
        return None
    if any(override.quantize is not None for override in recipe.layer_overrides):
        return ("per-layer schemes ([[recipe.layer]] with quantize) are not realized on ONNX Runtime here; layers "
                "kept float (quantize = \"none\") are")
    if set(recipe.layers) - ONNX_QUANTIZABLE_LAYERS:
        other = "/".join(sorted(set(recipe.layers) - ONNX_QUANTIZABLE_LAYERS))
        return f"no ONNX equivalent for quantizing {other} here: the ONNX path quantizes Linear (MatMul) weights only"
    if recipe.quantize == "int8-dynamic":
        if recipe.dtype != "float32":
            return f"no ONNX Runtime CPU equivalent: int8 dynamic quantization with {recipe.dtype} elsewhere"
        return None
    if recipe.quantize == "int4-weight-only":
        if recipe.dtype == "float16":
            return "no ONNX Runtime CPU equivalent mapped: int4 MatMulNBits with float16 activations"
        block = recipe.group_size
        if block < 16 or block & (block - 1):
            return f"MatMulNBits needs a power-of-two block of at least 16, not group_size {block}"
    return None


def _onnx_int4_note(recipe: Recipe) -> str:
    if recipe.dtype == "bfloat16":
        # The torch recipe asks bfloat16 only because torchao's CPU int4 kernel needs it; ORT has float32 MatMulNBits.
        return "MatMulNBits with float32 activations (bfloat16 has no ONNX Runtime CPU kernels)"
    return "MatMulNBits with float32 activations"


# ---- export ----

def parameter_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and persistent buffers, each shared tensor once (what the exporter stores)."""
    seen: set[int] = set()
    total = 0
    for tensor in _stored_tensors(model):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def _stored_tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    for module in model.modules():
        yield from (tensor for _, tensor in module.named_parameters(recurse=False))
        skipped = getattr(module, "_non_persistent_buffers_set", set())
        yield from (tensor for key, tensor in module.named_buffers(recurse=False) if key not in skipped)


def needs_external_data(byte_count: int) -> bool:
    return byte_count > EXTERNAL_DATA_THRESHOLD_BYTES


def external_data_name(path: Path) -> str:
    """The one external data file next to `path` (a location relative to the .onnx file, as ONNX requires)."""
    return path.name + ".data"


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    # The dynamo exporter prints its progress and warns about optional torchvision ops on every call.
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def export_fp32(model: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path) -> list[str]:
    """Export the model as it is (float32) with the dynamo exporter, with a dynamic batch axis (and a dynamic
    sequence axis on integer inputs such as token ids) where the model allows it.

    Inputs keep the names of the model's forward arguments (`input_ids`, `x`); outputs are named after the
    model's output structure (`logits`, or output / output_0.. for plain tensors) in torch.export's pytree order,
    the order planner.measure.library.floating_tensors walks a tensor/tuple/list/dict output in; the verifier
    feeds and compares by position and keeps only the floating outputs. Weights above
    EXTERNAL_DATA_THRESHOLD_BYTES go to one external file PATH.data; otherwise everything is in PATH.
    A transformers model is exported with its KV cache off (torch.export cannot return a DynamicCache); the
    returned note says so. A model that does not export with dynamic axes is exported with the example's fixed
    shapes, and the note says why.
    """
    path = Path(path)
    external = needs_external_data(parameter_bytes(model))
    _remove_artifact(path)
    notes: list[str] = []
    with _quiet_export(), torch.no_grad(), kv_cache_off(model) as had_cache:
        try:
            program = _export_dynamic(model, inputs)
        except Exception as error:  # a model whose shapes are fixed (or that breaks on batch 2): as it was traced
            notes.append(f"exported with the example's fixed shapes: dynamic axes failed "
                         f"({export_failure_cause(error)[:160]})")
            try:
                program = torch.onnx.export(model, tuple(inputs), dynamo=True, external_data=external,
                                            optimize=True, verbose=False, report=False)
            except Exception as error:
                raise RuntimeError(f"torch.onnx.export failed: {export_failure_cause(error)}") from error
        assert program is not None
        for value, name in zip(program.model.graph.outputs, output_names(program), strict=True):
            value.name = name
        # Each node carries the exporter's debug metadata (stack trace with absolute source paths, FX node text):
        # up to 1 kB a node, private to this machine, and no part of the model.
        for node in program.model.graph.all_nodes():
            node.metadata_props.clear()
        unfold_splat_constants(program.model, _stored_names(model))
        unfold_duplicated_transposes(program.model)
        # ONNXProgram.save switches to external data by itself only above 2 GB; decide here, with margin.
        program.save(str(path), external_data=external)
    if had_cache:
        notes.append("exported with use_cache=False: the graph returns the model's outputs without the KV cache, as "
                     "one full-sequence forward (prefill) computes them")
    return notes


def dynamic_axes(inputs: tuple[torch.Tensor, ...]) -> list[dict[int, str]]:
    """The axes exported as dynamic, by input: the batch (axis 0), and the sequence (axis 1) of integer inputs of
    two or more dimensions (token ids, attention masks)."""
    axes = []
    for tensor in inputs:
        named = {0: "batch"} if tensor.dim() >= 1 else {}
        if tensor.dim() >= 2 and not tensor.is_floating_point() and not tensor.is_complex():
            named[1] = "sequence"
        axes.append(named)
    return axes


def _export_dynamic(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Any:
    """torch.onnx.export with Dim.AUTO on dynamic_axes(), traced on a batch of two: torch.export specializes a
    size-1 axis to 1 inside the graph while leaving the input symbolic, which breaks at batch 2 (measured on
    GPT-2 in ONNX Runtime). The symbolic dimensions are renamed batch / sequence in every value of the graph."""
    from torch.export import Dim

    axes = dynamic_axes(inputs)
    doubled = tuple(torch.cat([tensor, tensor]) if named else tensor for tensor, named in zip(inputs, axes,
                                                                                               strict=True))
    shapes = tuple({axis: Dim.AUTO for axis in named} for named in axes)
    program = torch.onnx.export(model, doubled, dynamo=True, dynamic_shapes=shapes, optimize=True, verbose=False,
                                report=False)
    assert program is not None
    graph = program.model.graph
    renames: dict[str, str] = {}
    for value, named in zip(graph.inputs, axes, strict=True):
        dims = value.shape.dims if value.shape is not None else ()
        if 0 in named and (not dims or isinstance(dims[0], int)):
            # the model fixed the batch: this graph would take only the doubled example
            raise RuntimeError("the model fixes its batch size")
        for axis, name in named.items():
            if axis < len(dims) and not isinstance(dims[axis], int) and dims[axis].value is not None:
                renames.setdefault(str(dims[axis].value), name)
    _rename_dims(graph, renames)
    return program


def _rename_dims(graph: Any, renames: dict[str, str]) -> None:
    """Give the exporter's symbols (s72) the axis names (batch) in every value that carries them."""
    import onnx_ir as ir

    values = [*graph.inputs, *graph.outputs, *(out for node in graph.all_nodes() for out in node.outputs)]
    for value in values:
        if value.shape is None:
            continue
        dims = [ir.SymbolicDim(renames[str(d.value)]) if not isinstance(d, int) and d.value is not None
                and str(d.value) in renames else d for d in value.shape.dims]
        value.shape = ir.Shape(dims)


def output_names(program: Any) -> list[str]:
    """Names for the graph's outputs from the model's output structure: `logits` for a transformers output,
    `output` for one tensor, `output_0`.. for a tuple; exporter names where the structure is not known."""
    from torch.utils import _pytree as pytree

    count = len(program.model.graph.outputs)
    try:
        spec = program.exported_program.call_spec.out_spec
        tree = pytree.tree_unflatten(list(range(spec.num_leaves)), spec)
        paths = [path for path, _ in pytree.tree_flatten_with_path(tree)[0]]
    except Exception:  # an ONNXProgram without its ExportedProgram: the names stay as exported
        return [value.name for value in program.model.graph.outputs]
    if len(paths) != count:
        return [f"output_{index}" for index in range(count)]
    names = []
    for path in paths:
        parts = [str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))) for key in path]
        name = ".".join(parts)
        names.append("output" if not name else f"output_{name}" if name[0].isdigit() else name)
    if len(set(names)) != len(names):
        return [f"output_{index}" for index in range(count)]
    return names


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def export_failure_cause(error: BaseException) -> str:
    """The cause of an exporter failure in one plain line: the exporter's message is several paragraphs with
    terminal colour codes, and the cause sits under its "## Exception summary" heading."""
    text = _ANSI.sub("", str(error))
    summary = text.split("## Exception summary", 1)[-1]
    line = next((line.strip() for line in summary.splitlines() if line.strip()), type(error).__name__)
    return line[:300]


def _stored_names(model: nn.Module) -> set[str]:
    return set(model.state_dict(keep_vars=True))


def unfold_splat_constants(model: object, keep: set[str], min_elements: int = SPLAT_MIN_ELEMENTS) -> int:
    """Store each large exporter-made constant whose elements are all equal as ConstantOfShape, in place.

    The exporter folds shape-dependent constants into the file, e.g. the ones(L, S) that
    scaled_dot_product_attention(is_causal=True) tril()s, once per layer (2 × 64 kB for tinylm). They follow
    the input shape, not the weights, so no weight-based size model can predict them; ONNX Runtime folds
    ConstantOfShape back at load, so the graph computes the same. Parameters and buffers (`keep`, by name)
    stay as they are even when uniform (a fresh LayerNorm weight is all ones). Returns the constants unfolded."""
    import numpy as np
    import onnx_ir as ir

    assert isinstance(model, ir.Model)
    graph = model.graph
    unfolded = 0
    for name, value in list(graph.initializers.items()):
        tensor = value.const_value
        if name in keep or tensor is None or value.is_graph_input() or value.is_graph_output():
            continue
        if math.prod(tensor.shape.numpy()) < min_elements:
            continue
        array = tensor.numpy()
        if array.dtype.kind not in "fiub" or not (array == array.flat[0]).all():
            continue
        shape = ir.Value(name=f"{name}_shape", const_value=ir.tensor(np.array(array.shape, dtype=np.int64)))
        graph.register_initializer(shape)
        fill = ir.node("ConstantOfShape", [shape], {"value": ir.tensor(array.reshape(-1)[:1].copy())},
                       name=f"{name}_splat")
        _compute_instead(graph, value, fill)
        unfolded += 1
    return unfolded


def _compute_instead(graph: Any, value: Any, node: Any) -> None:
    """Replace the initializer `value` by `node`'s output, under the same name, computed first in the graph."""
    name = value.name
    graph.insert_before(graph.node(0), node)
    value.replace_all_uses_with(node.outputs[0])
    node.outputs[0].name = name
    graph.initializers.pop(name)


# The exporter's optimizer records, on each constant it folds, the initializers it was computed from.
FOLDED_FROM = "pkg.onnxscript.optimizer.folded_from"


def folded_sources(metadata: Mapping[str, str]) -> list[str]:
    """The initializer names a folded constant was computed from (its FOLDED_FROM metadata), or []."""
    try:
        sources = ast.literal_eval(metadata.get(FOLDED_FROM, "[]"))
    except (ValueError, SyntaxError):
        return []
    return [name for name in sources if isinstance(name, str)] if isinstance(sources, list) else []


def unfold_duplicated_transposes(model: object) -> int:
    """Read back as Transpose(W) each folded constant that is the transpose of an initializer W still stored.

    The exporter folds a weight's Transpose into a new constant; when the weight has another reader (a small LM's
    head tied to its embedding, read by Gather), both are stored: a pruned Qwen2's file held its 32,000 x 256
    embedding twice. Returns the constants unfolded."""
    import numpy as np
    import onnx_ir as ir

    assert isinstance(model, ir.Model)
    graph = model.graph
    unfolded = 0
    for name, value in list(graph.initializers.items()):
        sources = folded_sources(value.metadata_props)
        source = graph.initializers.get(sources[0]) if len(sources) == 1 else None
        if source is None or value.const_value is None or source.const_value is None:
            continue
        array, original = value.const_value.numpy(), source.const_value.numpy()
        if array.ndim != 2 or array.shape != original.shape[::-1] or not np.array_equal(array, original.T):
            continue
        _compute_instead(graph, value, ir.node("Transpose", [source], {"perm": [1, 0]}, name=f"{name}_transpose"))
        unfolded += 1
    return unfolded


def _remove_artifact(path: Path) -> None:
    """Delete an earlier artifact at `path` and its external data: a stale .data file would be read back."""
    for stale in (path, path.with_name(external_data_name(path))):
        stale.unlink(missing_ok=True)


def onnx_file_bytes(path: Path) -> int:
    """The .onnx file plus every external data file it references (each counted once)."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    locations = {ExternalDataInfo(tensor).location for tensor in _get_all_tensors(model) if uses_external_data(tensor)}
    return path.stat().st_size + sum((path.parent / location).stat().st_size for location in locations)


# ---- graph rewriting ----

def gemm_to_matmul(model: object) -> int:
    """Rewrite Gemm(A, B const, C) with alpha = beta = 1 and no transA as MatMul(A, B') + C, in place.

    Both onnxruntime quantizers only take MatMul with a constant B, and a Linear on a 2-D input exports
    as Gemm(transB=1). B is transposed into a new [K, N] initializer (the [N, K] one is dropped when no
    other node reads it), so the file holds the same number of weights. Returns the nodes rewritten."""
    import onnx
    from onnx import helper

    assert isinstance(model, onnx.ModelProto)
    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    rewritten: list[onnx.NodeProto] = []
    count = 0
    for node in graph.node:
        weight = initializers.get(node.input[1]) if node.op_type == "Gemm" and len(node.input) >= 2 else None
        attributes = {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}
        plain = (attributes.get("alpha", 1.0) == 1.0 and attributes.get("beta", 1.0) == 1.0
                 and not attributes.get("transA", 0))
        if weight is None or not plain or len(weight.dims) != 2:
            rewritten.append(node)
            continue
        weight_name = weight.name
        if attributes.get("transB", 0):
            readers[weight.name] -= 1
            weight_name = _transposed_initializer(graph, weight, in_place=readers[weight.name] == 0)
        has_bias = len(node.input) > 2 and node.input[2]
        product = node.output[0] + "_matmul" if has_bias else node.output[0]
        rewritten.append(helper.make_node("MatMul", [node.input[0], weight_name], [product], name=node.name + "_mm"))
        if has_bias:
            rewritten.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]],
                                              name=node.name + "_bias"))
        count += 1
    del graph.node[:]
    graph.node.extend(rewritten)
    return count


TRANSPOSED_SUFFIX = "_kn"  # a Gemm weight also read elsewhere is transposed into a new initializer so named


def _transposed_initializer(graph: object, weight: object, in_place: bool) -> str:
    """Store `weight` [N, K] as [K, N]: in place when nothing else reads it, else as a new initializer.

    Fields are set one by one: appending a finished TensorProto above 2 GB to the graph fails to serialize."""
    import numpy as np
    from onnx import numpy_helper

    array = np.ascontiguousarray(numpy_helper.to_array(weight).T)  # type: ignore[arg-type]
    target = weight if in_place else graph.initializer.add()  # type: ignore[attr-defined]
    if not in_place:
        target.name = weight.name + TRANSPOSED_SUFFIX  # type: ignore[attr-defined]
        target.data_type = weight.data_type  # type: ignore[attr-defined]
    if in_place:  # a declared shape of the old [N, K] layout would contradict the new one in shape inference
        stale = [info for info in graph.value_info if info.name == weight.name]  # type: ignore[attr-defined]
        for info in stale:
            graph.value_info.remove(info)  # type: ignore[attr-defined]
    target.ClearField("float_data")
    del target.dims[:]
    target.dims.extend(array.shape)
    target.raw_data = array.tobytes()
    return target.name


def count_quantized_nodes(path: Path, quantize: str) -> int:
    import onnx

    wanted = QUANTIZED_OP_TYPES.get(quantize, ())
    return sum(node.op_type in wanted for node in onnx.load(str(path), load_external_data=False).graph.node)


# ---- int8: which setting suits this CPU ----

def cpu_has_vnni() -> bool:
    """True where the CPU has an int8 dot product that does not saturate (x86 VNNI, Arm dot product).

    Without it, onnxruntime's u8s8 kernels add pairs of products in int16 (vpmaddubsw), which saturates
    with full-range int8 weights: the field notes measured 17 dB on an MLP, 36 dB with reduce_range."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = {flag for line in text.splitlines()
             if line.split(":")[0].strip() in ("flags", "Features") for flag in line.split(":", 1)[1].split()}
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8", "asimddp"})


def int8_reduce_range() -> bool:
    """reduce_range (7-bit weights) only where the CPU lacks VNNI: it costs precision where it is not needed."""
    return not cpu_has_vnni()


# ---- building an artifact ----

def build_onnx_artifact(fp32_model_path_or_module: Path | str | nn.Module, inputs: tuple[torch.Tensor, ...],
                        recipe: Recipe, workdir: Path, keep_float: frozenset[str] = frozenset()
                        ) -> tuple[Path, list[str]]:
    """The recipe's ONNX artifact in `workdir` (RECIPE.onnx, plus RECIPE.onnx.data for large models) and notes.

    Give the float32 module (needed for pruning: the planner prunes torch weights) or the path of an
    export_fp32 file. A module is pruned in place when the recipe prunes (the pipeline builds a fresh one
    per recipe). Raises UnsupportedRecipe when the recipe has no ONNX equivalent."""
    reason = onnx_recipe_support(recipe)
    if reason is not None:
        raise UnsupportedRecipe(reason)
    workdir = Path(workdir).resolve()  # as path_inside resolves it, for the comparison below
    target = path_inside(workdir, f"{recipe.name}.onnx")
    notes: list[str] = []
    if isinstance(fp32_model_path_or_module, nn.Module):
        model = fp32_model_path_or_module
        if recipe.changes_weights:
            notes += _prune(model, inputs, recipe, workdir)
        plain = recipe.quantize is None and recipe.dtype == "float32"
        float_path = target if plain else path_inside(workdir, f"{recipe.name}.fp32.onnx")
        notes += export_fp32(model, inputs, float_path)
    else:
        if recipe.changes_weights:
            raise UnsupportedRecipe("pruning needs the torch module (the planner prunes torch weights before export)")
        float_path = Path(fp32_model_path_or_module)
    if float_path == target:
        return target, notes
    try:
        notes += _convert(float_path, target, recipe, keep_float)
    finally:
        if float_path.parent == workdir and float_path.name.endswith(".fp32.onnx"):
            _remove_artifact(float_path)
    return target, notes


def _prune(model: nn.Module, inputs: tuple[torch.Tensor, ...], recipe: Recipe, workdir: Path) -> list[str]:
    from planner.recipes.recipe import apply_recipe

    if recipe.channels:  # a structurally pruned model is a smaller dense model: it exports as any other
        from planner.analysis.artifact import prune_channels_once

        prune_channels_once(model, inputs, recipe, workdir)

    if not recipe.prune:
        return []
    only_pruning = Recipe(name=recipe.name, prune=recipe.prune, prune_layers=recipe.prune_layers)
    _, notes = apply_recipe(model, only_pruning)
    return [note.split(",")[0] + ", stored densely in ONNX: the file does not shrink" for note in notes]


def _convert(float_path: Path, target: Path, recipe: Recipe, keep_float: frozenset[str] = frozenset()
             ) -> list[str]:
    """From the float32 export to the recipe's artifact; a plain fp32 recipe on a given path is a copy. MatMuls
    reading a weight named in `keep_float` (the recipe's layers kept float, by parameter name) stay float."""
    import onnx

    _remove_artifact(target)
    if recipe.quantize == "int8-dynamic":
        return _quantize_int8_dynamic(float_path, target, keep_float)
    model = onnx.load(str(float_path))
    if recipe.quantize == "int4-weight-only":
        return _quantize_int4(model, target, recipe, keep_float)
    if recipe.dtype == "float16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        # keep_io_types: the caller feeds float32 and compares float32 outputs, as with the torch fp16 rows.
        # Its shape inference serializes the whole model, which fails above protobuf's 2 GB limit.
        too_big = not _inline_size_known(model)
        model = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=too_big)
        _save(model, target)
        return ["float16 initializers (convert_float_to_float16, float32 inputs and outputs)"]
    _save(model, target)
    return []


def _save(model: object, path: Path) -> None:
    import onnx

    assert isinstance(model, onnx.ModelProto)
    external = needs_external_data(model.ByteSize() if _inline_size_known(model) else EXTERNAL_DATA_THRESHOLD_BYTES + 1)
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=external_data_name(path), size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def _inline_size_known(model: object) -> bool:
    # ByteSize() fails (or overflows) on protos above 2 GB: sum the raw data instead of asking for it.
    return sum(len(tensor.raw_data) for tensor in model.graph.initializer) < EXTERNAL_DATA_THRESHOLD_BYTES  # type: ignore[attr-defined]


def matmuls_reading(model: object, weights: frozenset[str]) -> list[str]:
    """Names of the MatMul/Gemm nodes whose weight input is one of `weights` (initializer names), directly or
    through a Transpose, Cast or Identity (a tied head reads the embedding transposed). Unnamed nodes get a name, so
    the quantizers' nodes_to_exclude can name them."""
    if not weights:
        return []
    graph = model.graph  # type: ignore[attr-defined]
    producers = {output: node for node in graph.node for output in node.output}
    # A weight the exporter folded (a Linear's transpose, as val_N) is known by the parameter it came from.
    folded = {info.name: folded_sources({prop.key: prop.value for prop in info.metadata_props})
              for info in graph.value_info}
    found = []
    for index, node in enumerate(graph.node):
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        name, producer = node.input[1], producers.get(node.input[1])
        while producer is not None and producer.op_type in ("Transpose", "Cast", "Identity"):
            name, producer = producer.input[0], producers.get(producer.input[0])
        origins = {name, name.removesuffix(TRANSPOSED_SUFFIX), *folded.get(name, ()),
                   *folded.get(name.removesuffix(TRANSPOSED_SUFFIX), ())}
        if origins & weights:
            node.name = node.name or f"planner_matmul_{index}"
            found.append(node.name)
    return found


def _kept_note(excluded: list[str]) -> list[str]:
    return [f"{len(excluded)} MatMul node(s) kept float as the recipe's layer tables say"] if excluded else []


def _quantize_int8_dynamic(float_path: Path, target: Path, keep_float: frozenset[str] = frozenset()) -> list[str]:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(float_path))
    rewritten = gemm_to_matmul(model)
    excluded = matmuls_reading(model, keep_float)
    external = not _inline_size_known(model)
    reduce_range = int8_reduce_range()
    # MatMul only: the torch recipe quantizes Linear layers, so Conv, Gather (embeddings) and LSTM stay float32
    # (quantize_dynamic's default list would take them all). Per-tensor weights, quantize_dynamic's default.
    source: object = model
    typed = declares_matmul_input_types(model)
    if external and not typed:
        # quantize_dynamic saves a ModelProto input and reloads it with shape inference, holding several copies
        # at once; from a file with external data it holds fewer, which matters for a 2 GB model. (A typed model
        # skips that round trip, and is quantized as it is: one copy.)
        source = target.with_name(target.stem + ".gemm.onnx")
        _save(model, source)
        del model
    try:
        with _quiet_export(), _shape_inference_skipped() if typed else contextlib.nullcontext():
            quantize_dynamic(source, str(target), op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8,
                             per_channel=False, reduce_range=reduce_range, use_external_data_format=external,
                             nodes_to_exclude=excluded)
    finally:
        if isinstance(source, Path):
            _remove_artifact(source)
    _rename_external_data(target)
    setting = "reduce_range=True (no VNNI on this CPU)" if reduce_range else "reduce_range=False (CPU has VNNI)"
    notes = [f"quantize_dynamic QInt8 per-tensor, {setting}", *_kept_note(excluded)]
    if rewritten:
        notes.append(f"{rewritten} Gemm node(s) rewritten to MatMul+Add so they quantize")
    return notes


def declares_matmul_input_types(model: object) -> bool:
    """Whether the type of every MatMul input is declared (value_info, graph input or initializer), all that
    quantize_dynamic reads from shape inference: it then learns nothing from it. The dynamo exporter declares every
    intermediate value."""
    graph = model.graph  # type: ignore[attr-defined]
    typed = {value.name for value in [*graph.value_info, *graph.input]} | {tensor.name for tensor in graph.initializer}
    return all(name in typed for node in graph.node if node.op_type == "MatMul" for name in node.input[:2])


@contextlib.contextmanager
def _shape_inference_skipped() -> Iterator[None]:
    """quantize_dynamic saves the whole model and reloads it with shape inference before quantizing (15 of the
    63 s of ComplexNet's struct50-int8-dynamic build, a 1 GB model): for a model whose MatMul inputs are all
    typed (declares_matmul_input_types), it is taken as it is, marked as inferred as the reload would mark it."""
    from onnxruntime.quantization.quant_utils import add_infer_metadata

    module = sys.modules["onnxruntime.quantization.quantize"]
    saved = module.save_and_reload_model_with_shape_infer

    def as_given(model: Any) -> Any:
        add_infer_metadata(model)
        return model

    module.save_and_reload_model_with_shape_infer = as_given
    try:
        yield
    finally:
        module.save_and_reload_model_with_shape_infer = saved


def _rename_external_data(target: Path) -> None:
    """quantize_dynamic names its external file after the model's name; nothing to do when it saved inline."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    model = onnx.load(str(target), load_external_data=False)
    if any(uses_external_data(tensor) for tensor in _get_all_tensors(model)):
        _save(onnx.load(str(target)), target)


def _quantize_int4(model: object, target: Path, recipe: Recipe, keep_float: frozenset[str] = frozenset()
                   ) -> list[str]:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    rewritten = gemm_to_matmul(model)
    excluded = matmuls_reading(model, keep_float)
    symmetric = recipe.mapping == "symmetric"
    with _quiet_export():
        quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=recipe.group_size, is_symmetric=symmetric,
                                         op_types_to_quantize=("MatMul",), nodes_to_exclude=excluded)
        quantizer.process()
    _save(quantizer.model.model, target)
    notes = [f"{_onnx_int4_note(recipe)}, block {recipe.group_size}, {recipe.mapping}", *_kept_note(excluded)]
    if rewritten:
        notes.append(f"{rewritten} Gemm node(s) rewritten to MatMul+Add so they quantize")
    return notes


def float_weight_names(meta_model: nn.Module, recipe: Recipe) -> list[str]:
    """Every parameter name (tied aliases included: the export keeps one of them) of the weights of the layers the
    recipe keeps float by a [[recipe.layer]] table."""
    modules = dict(meta_model.named_modules())
    kept = {id(weight) for override in recipe.layer_overrides if override.quantize is None
            and isinstance(weight := getattr(modules.get(override.fqn), "weight", None), torch.Tensor)}
    return [name for name, param in meta_model.named_parameters(remove_duplicate=False) if id(param) in kept]


# ---- the analytic file size ----

def onnx_matmul_weights(meta_model: nn.Module) -> list[tuple[int, int]]:
    """(K, N) of every weight the export turns into the constant B of a MatMul (or Gemm, rewritten).

    A Linear's weight always does (and a transformers Conv1D's); so does MultiheadAttention's packed
    in_proj_weight (or its separate q/k/v weights), which torchao leaves alone but onnxruntime quantizes.
    Weights used only inside custom forward code (F.linear on a raw Parameter) are not found: the rule
    follows module types."""
    found: list[tuple[int, int]] = []
    seen: set[int] = set()
    for module in meta_model.modules():
        for weight, transposed in _matmul_weights_of(module):
            if id(weight) in seen or weight.dim() != 2 or not weight.is_floating_point():
                continue
            seen.add(id(weight))
            found.append(_k_n(weight, transposed))
    return found


def _k_n(weight: torch.Tensor, transposed: bool) -> tuple[int, int]:
    out_features, in_features = weight.shape[::-1] if transposed else weight.shape
    return in_features, out_features


def _matmul_weights_of(module: nn.Module) -> list[tuple[torch.Tensor, bool]]:
    """(weight, stored as (in, out)) for each weight the module feeds to a MatMul or Gemm."""
    if isinstance(module, nn.Linear):
        return [(module.weight, False)]
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return [(module.weight, True)]  # transformers' GPT-2 Conv1D: a Linear stored transposed
    if isinstance(module, nn.MultiheadAttention):
        names = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
        return [(weight, False) for name in names if isinstance(weight := getattr(module, name, None), torch.Tensor)]
    return []


def int8_matmul_bytes(k: int, n: int) -> int:
    # quantize_dynamic per tensor: K×N int8 payload, one float32 scale and one int8 zero point.
    return k * n + 4 + 1


def int4_matmul_bytes(k: int, n: int, block: int, symmetric: bool) -> int:
    # MatMulNBits: N × blocks × block/2 packed nibbles (K padded to whole blocks), a float32 scale per
    # block, and for asymmetric a 4-bit zero point per block (two per byte, each row padded to a byte).
    blocks = math.ceil(k / block)
    zero_points = 0 if symmetric else n * math.ceil(blocks / 2)
    return n * blocks * (block // 2) + n * blocks * 4 + zero_points


def analytic_onnx_bytes(meta_model: nn.Module, recipe: Recipe) -> int:
    """Predicted bytes of build_onnx_artifact's files (no export): weights at the recipe's layout plus graph overhead.

    Shapes only, so a model on the meta device is fine. Assumes the recipe is supported (onnx_recipe_support)."""
    float_bytes = 2 if recipe.dtype == "float16" else 4
    matmul = {id(weight): transposed for module in meta_model.modules()
              for weight, transposed in _matmul_weights_of(module)}
    # A weight tied to a non-MatMul user (GPT-2's lm_head and the wte embedding) is exported once and
    # transposed at run time, so quantize_dynamic and MatMulNBits leave it float.
    for module in meta_model.modules():
        own = {id(weight) for weight, _ in _matmul_weights_of(module)}
        for param in module._parameters.values():
            if param is not None and id(param) not in own:
                matmul.pop(id(param), None)
    modules = dict(meta_model.named_modules())
    for override in recipe.layer_overrides:  # layers the recipe keeps float stay float here too
        weight = getattr(modules.get(override.fqn), "weight", None)
        if override.quantize is None and weight is not None:
            matmul.pop(id(weight), None)
    quantized = recipe.quantize in QUANTIZED_OP_TYPES
    total = GRAPH_BASE_BYTES + (FP16_CAST_BYTES if recipe.dtype == "float16" else 0)
    seen: set[int] = set()
    for tensor in _stored_tensors(meta_model):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += GRAPH_BYTES_PER_TENSOR
        if quantized and id(tensor) in matmul and tensor.dim() == 2:
            in_features, out_features = _k_n(tensor, matmul[id(tensor)])
            total += _quantized_bytes(in_features, out_features, recipe) + QUANTIZED_NODE_BYTES[recipe.quantize]
        elif tensor.is_floating_point():
            total += tensor.numel() * float_bytes
        else:
            total += tensor.numel() * tensor.element_size()
    return total


def _quantized_bytes(k: int, n: int, recipe: Recipe) -> int:
    if recipe.quantize == "int8-dynamic":
        return int8_matmul_bytes(k, n)
    return int4_matmul_bytes(k, n, recipe.group_size, recipe.mapping == "symmetric")


def build_job(job: dict[str, Any]) -> dict[str, Any]:
    """Worker body for `python -m planner.runtimes.onnxruntime.export JOB RESULT`: build one recipe's ONNX
    artifact in its own process (quantize_dynamic holds several copies of the weights: a memory cap must be able
    to stop it)."""
    from planner.analysis.artifact import load_reference
    from planner.models.sources import ModelSource

    recipe = Recipe.from_json(job["recipe"])
    inputs = tuple(torch.load(job["inputs"], weights_only=True))
    base = job.get("fp32_onnx")
    what: Path | nn.Module = Path(base) if base and not recipe.changes_weights else load_reference(
        ModelSource.from_json(job["source"]), Path(job["fp32"]))
    artifact, notes = build_onnx_artifact(what, inputs, recipe, Path(job["workdir"]),
                                          frozenset(job.get("keep_float", ())))
    return {"artifact": str(artifact), "notes": notes}


if __name__ == "__main__":
    from planner.measure.worker import worker_main

    sys.exit(worker_main(sys.argv[1:], build_job))
