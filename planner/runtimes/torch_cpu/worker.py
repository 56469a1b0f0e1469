"""The torch verification worker: one artifact in a fresh process, loaded, run and measured.

The parent (planner.runtimes.torch_cpu.runtime) starts `python -m planner.runtimes.torch_cpu.worker JOB RESULT`
once per recipe, so no recipe shares allocator state, imported kernels or cached pages with another. It measures
what a user's own fresh process holds over the artifact's lifetime, so it does no more than theirs would:

1. imports torch (and torchao), builds the model's structure without weights (meta) and loads the example input;
   nothing runs before the baseline, so the framework's first-use costs (thread pool, the kernel libraries'
   pages and primitive caches) count for the model, as they do for a user;
2. resets the resident-memory high-water mark (/proc/self/clear_refs) and takes the baseline;
3. loads the artifact: load peak = high-water mark - baseline; resident weights = growth without file-backed
   pages (private_resident_bytes);
4. runs the example input once (first-forward peak), then again (steady peak), each output dropped before the
   next run, then times further runs (median) and compares the first outputs with the fp32 reference;
5. verified runtime = the lifetime peak, the largest of the three (planner.measure.library.lifetime_fields). The budget
   applies to it.

It runs with glibc's default allocator settings, as a user's process does: what glibc keeps cached after a free
is memory the process holds. The measuring itself is planner.measure.library's, shared with the other workers.
"""

from __future__ import annotations

import gc
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from planner.measure.library import (
    LoadMeasurement,
    floating_tensors,
    measure_runs,
    private_resident_bytes,
    proc_status_bytes,
    quality_fields,
    reset_peak,
    verified_fields,
)
from planner.measure.worker import worker_main


def warm_up(dtype: Any) -> None:
    # The framework's first-use costs (thread pool, oneDNN primitives), for planner.runtimes.baseline's first-use
    # figure.
    import torch

    with torch.inference_mode():
        x = torch.randn(4, 64, dtype=dtype)
        torch.nn.functional.linear(x, torch.randn(32, 64, dtype=dtype))
        image = torch.randn(1, 3, 16, 16, dtype=dtype)
        torch.nn.functional.conv2d(image, torch.randn(8, 3, 3, 3, dtype=dtype), padding=1)


def import_framework() -> None:
    """What a worker imports before its baseline, for planner.runtimes.baseline: torch and torchao's tensor types."""
    from planner.recipes.recipe import import_tensor_types

    import_tensor_types()


def first_tiny_forward() -> None:
    """planner.runtimes.baseline's first-use figure: the first float32 linear and convolution of a process."""
    import torch

    warm_up(torch.float32)


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    from planner.analysis.artifact import load_weights_into, set_eval, weightless_structure
    from planner.analysis.pruning import unpack_artifact_state
    from planner.models.sources import ModelSource
    from planner.recipes.recipe import DTYPES

    if job.get("needs_torchao"):
        from planner.recipes.recipe import import_tensor_types

        import_tensor_types()
    dtype = DTYPES[job["dtype"]]
    torch.manual_seed(0)
    source = ModelSource.from_json(job["source"])
    model = weightless_structure(source, job["artifact_format"])
    if model is not None and job.get("recipe"):
        from planner.recipes.recipe import Recipe, linearize_conv1d

        linearize_conv1d(model, Recipe.from_json(job["recipe"]))  # the structure the recipe saved
    inputs = torch.load(job["inputs"], weights_only=True)
    inputs = tuple(t.to(dtype) if t.is_floating_point() else t for t in inputs)
    generation = job.get("generation")
    if generation:  # imported before the baseline, as the user's process would have transformers already
        from planner.analysis.generation import GenerationSpec
        from planner.runtimes.torch_cpu import generation as generating
    gc.collect()  # no malloc_trim: the state a user's process is in after its imports
    exact_peak = reset_peak()
    baseline = proc_status_bytes("VmRSS")
    private_baseline = private_resident_bytes()

    started = time.perf_counter()
    if job["artifact_format"] == "torchscript":
        model = torch.jit.load(job["artifact"], map_location="cpu")
    else:
        state = unpack_artifact_state(model, torch.load(job["artifact"], weights_only=True))
        load_weights_into(model, state)
        del state
    set_eval(model)
    load_s = time.perf_counter() - started
    load_peak = proc_status_bytes("VmHWM")
    weights = private_resident_bytes() - private_baseline

    load = LoadMeasurement(baseline, load_peak, weights, exact_peak, load_s)
    if generation:
        spec = GenerationSpec.from_json(generation)
        with tempfile.TemporaryDirectory() as folder, torch.inference_mode():
            sequences_path = Path(folder) / "sequences.pt"
            measured, found = generating.measure_generation(model, inputs[0], spec, sequences_path)
            quality = generating.generation_quality(model, spec, torch.load(sequences_path, weights_only=True),
                                                    Path(job["reference"]), bool(job.get("save_reference")))
        return {**verified_fields(load, measured, activation_bytes=measured.warm_growth), **found, **quality}
    # The first outputs wait on disk (the worker's TMPDIR, under the plan's work directory) during the later runs.
    with tempfile.TemporaryDirectory() as folder, torch.inference_mode():
        first_outputs = Path(folder) / "first-outputs.pt"
        measured = measure_runs(lambda: model(*inputs),
                                lambda output: torch.save(floating_tensors(output), first_outputs))
        outputs = [t.float() for t in torch.load(first_outputs, weights_only=True)]
    if job.get("save_reference"):
        torch.save(outputs, job["reference"])
        reference = outputs
    else:
        reference = torch.load(job["reference"], weights_only=True)
    return {**verified_fields(load, measured, activation_bytes=measured.warm_growth),
            **quality_fields(reference, outputs)}

if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:], run_job))
