"""Per-layer sensitivity: the whole model's output SQNR when only one layer takes one precision.

Runs as an isolated worker (`python -m planner.analysis.sensitivity JOB RESULT`, like the torch worker) on the float32
reference memory-mapped from disk. Each layer is quantized on a shallow copy that shares the original's
parameters (quantize_ replaces the copy's weight, never the original's), swapped into the model for one
forward and swapped back: the model is never copied, and each layer's weight is quantized once per precision.

Results are cached per precision under $PLANNER_CACHE_DIR (default ~/.cache/planner)/sensitivity, keyed by
the model source, a hash of the float32 weights, a hash of the inputs, the precision and the library versions.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from planner.core.errors import PlannerError


def cache_dir() -> Path:
    return Path(os.environ.get("PLANNER_CACHE_DIR") or Path.home() / ".cache" / "planner") / "sensitivity"


def tensors_digest(named: list[tuple[str, torch.Tensor]]) -> str:
    """A hash of names, shapes, dtypes and bytes (independent of the file container that held them)."""
    digest = hashlib.blake2b(digest_size=20)
    for name, tensor in named:
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        flat = tensor.detach().contiguous().reshape(-1)
        for chunk in flat.split(1 << 24):
            digest.update(chunk.view(torch.uint8).numpy().data if chunk.numel() else b"")
    return digest.hexdigest()


def cache_key(model_spec: str, weights_hash: str, inputs_hash: str, precision: dict[str, Any]) -> str:
    versions = {name: metadata.version(name) for name in ("torch", "torchao")}
    text = json.dumps({"model": model_spec, "weights": weights_hash, "inputs": inputs_hash,
                       "precision": precision, "versions": versions}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def load_calibration(path: Path, example: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Real inputs for the sensitivity pass: a .pt (a tensor, or a tuple/list of them; loaded with
    weights_only=True) or a .safetensors file (tensors in key order). They must match the example
    inputs in count, dtype and every dimension but the batch."""
    if not path.exists():
        raise PlannerError(f"--calibration {path} does not exist: pass a .pt or .safetensors file of input tensors")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            loaded: Any = [tensor for _, tensor in sorted(load_file(str(path)).items())]
        else:
            loaded = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:
        raise PlannerError(f"--calibration {path} cannot be read as tensors ({type(error).__name__}): save a "
                           "tensor or a tuple of tensors with torch.save, or use safetensors") from error
    tensors = (loaded,) if isinstance(loaded, torch.Tensor) else loaded
    if not isinstance(tensors, list | tuple) or not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
        raise PlannerError(f"--calibration {path} holds {type(loaded).__name__}: save a tensor or a tuple of tensors")
    if len(tensors) != len(example):
        raise PlannerError(f"--calibration {path} holds {len(tensors)} tensor(s); the model takes {len(example)}")
    for index, (given, wanted) in enumerate(zip(tensors, example, strict=True)):
        if given.dtype != wanted.dtype or given.dim() != wanted.dim() or given.shape[1:] != wanted.shape[1:]:
            raise PlannerError(f"--calibration {path}: input {index} is {tuple(given.shape)} {given.dtype}; the model "
                               f"takes (batch, {', '.join(map(str, wanted.shape[1:]))}) {wanted.dtype}")
    return tuple(t.contiguous() for t in tensors)


def _floating_outputs(output: Any) -> list[torch.Tensor]:
    from planner.measure.library import floating_tensors

    return [t.float() for t in floating_tensors(output)]


def _quantized_copy(module: nn.Module, config: Any) -> nn.Module:
    """A copy of one module whose weight is quantized, sharing every other tensor with the original."""
    from torchao.quantization import quantize_

    clone = copy.copy(module)
    clone._parameters = dict(module._parameters)  # quantize_ replaces clone.weight in this dict only
    clone._buffers = dict(module._buffers)
    clone._modules = dict(module._modules)
    quantize_(clone, config, filter_fn=lambda candidate, fqn: candidate is clone)
    return clone


def layer_sqnrs(model: nn.Module, inputs: tuple[torch.Tensor, ...], reference: list[torch.Tensor],
                layers: list[str], config: Any) -> dict[str, float | None]:
    """Output SQNR with each listed layer alone quantized by `config` (one forward per layer)."""
    from planner.measure.library import compare_outputs

    sqnrs: dict[str, float | None] = {}
    for fqn in layers:
        original = model.get_submodule(fqn)
        parent_name, _, child = fqn.rpartition(".")
        parent = model.get_submodule(parent_name)
        clone = _quantized_copy(original, config)
        setattr(parent, child, clone)
        try:
            with torch.inference_mode():
                output = _floating_outputs(model(*inputs))
        finally:
            setattr(parent, child, original)
        sqnrs[fqn] = compare_outputs(reference, output)["sqnr_db"]
        del clone, output  # freed by reference counting; a gc.collect here cost 1.6 s per layer on BERT-base
    return sqnrs


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """job: source, fp32 (state dict), inputs (.pt tuple), precisions [{label, override}], layers {label: [fqn]},
    dtype (of the base model: float32 or bfloat16)."""
    from planner.analysis.artifact import load_reference
    from planner.models.sources import ModelSource
    from planner.recipes.recipe import LayerOverride, Recipe, import_tensor_types

    import_tensor_types()
    torch.manual_seed(0)
    source = ModelSource.from_json(job["source"])
    model = load_reference(source, Path(job["fp32"]))
    inputs = tuple(torch.load(job["inputs"], weights_only=True))
    weights_hash = tensors_digest(sorted(model.state_dict().items()))
    inputs_hash = tensors_digest([(str(i), t) for i, t in enumerate(inputs)])
    with torch.inference_mode():
        reference = _floating_outputs(model(*inputs))
    # A bfloat16 base: every layer runs in bf16 and each SQNR is against the float32 reference, so the base's
    # own error is in every figure; the caller subtracts it (base_sqnr_db).
    dtype = job.get("dtype", "float32")
    base_sqnr: float | None = math.inf
    if dtype != "float32":
        from planner.analysis.footprint import cast_inputs
        from planner.measure.library import compare_outputs
        from planner.recipes.recipe import DTYPES

        model = model.to(DTYPES[dtype])
        inputs = cast_inputs(inputs, DTYPES[dtype])
        with torch.inference_mode():
            base_sqnr = compare_outputs(reference, _floating_outputs(model(*inputs)))["sqnr_db"]
    folder = Path(job.get("cache_dir") or cache_dir())
    table: dict[str, dict[str, float | None]] = {}
    cached: list[str] = []
    seconds: dict[str, float] = {}
    for precision in job["precisions"]:
        label, override = precision["label"], LayerOverride(**precision["override"])
        layers = job["layers"][label]
        # One file per precision, layer by layer: a later plan that needs a subset (or more layers) reuses them.
        path = folder / f"{cache_key(source.spec, weights_hash, inputs_hash, {**precision, 'dtype': dtype})}.json"
        known = {k: _number(v) for k, v in json.loads(path.read_text())["sqnr_db"].items()} if path.exists() else {}
        missing = [fqn for fqn in layers if fqn not in known]
        if not missing:
            table[label] = {fqn: known[fqn] for fqn in layers}
            cached.append(label)
            continue
        started = time.perf_counter()
        layer_recipe = Recipe("sensitivity", dtype=dtype, quantize=override.quantize, bits=override.bits,
                              group_size=override.group_size, mapping=override.mapping)
        assert layer_recipe.scheme is not None
        known.update(layer_sqnrs(model, inputs, reference, missing, layer_recipe.scheme.make_config(layer_recipe)))
        seconds[label] = time.perf_counter() - started
        table[label] = {fqn: known[fqn] for fqn in layers}
        folder.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps({"model": source.spec, "precision": precision, "dtype": dtype,
                                         "sqnr_db": {k: _finite_or_text(v) for k, v in known.items()}}))
        temporary.replace(path)
    table = {label: {fqn: _number(value) for fqn, value in sqnrs.items()} for label, sqnrs in table.items()}
    return {"sqnr_db": table, "base_sqnr_db": base_sqnr, "cached": cached, "seconds": seconds,
            "weights_hash": weights_hash, "inputs_hash": inputs_hash}


def _finite_or_text(value: float | None) -> float | str | None:
    return str(value) if isinstance(value, float) and value in (float("inf"), float("-inf")) else value


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, str) else value


if __name__ == "__main__":
    from planner.measure.worker import worker_main

    sys.exit(worker_main(sys.argv[1:], run_job))
