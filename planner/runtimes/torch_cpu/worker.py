"""The torch verification worker: one artifact in a fresh process, loaded, run and measured.

The parent (planner.runtimes.torch_cpu.runtime) starts `python -m planner.runtimes.torch_cpu.worker JOB RESULT`
once per recipe, so no recipe shares allocator state, imported kernels or cached pages with another. The process:

1. imports torch (and torchao), warms the framework up on a tiny forward, builds the model's
   structure without weights (meta), and loads the example input;
2. resets the resident-memory high-water mark (/proc/self/clear_refs) and takes the baseline;
3. loads the artifact (resident weights = growth of RSS without file-backed pages after load, see
   private_resident_bytes) and runs the example input once (first-run lazy initialisation is reported on its own);
4. resets the high-water mark and runs it again: activation peak = peak - RSS before that forward;
   verified runtime = resident weights + activation peak;
5. times further forwards (median) and compares the first outputs with the fp32 reference.

glibc is told to hand large freed blocks straight back to the OS (MALLOC_MMAP_THRESHOLD_), so the
high-water mark is what was alive at once, not what the allocator kept cached. The measuring itself is
planner.measure's, shared with the other workers.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from planner.measure import (
    compare_outputs,
    floating_tensors,
    measure_runs,
    private_resident_bytes,
    proc_status_bytes,
    release_freed_memory,
    reset_peak,
)
from planner.worker import worker_main


def warm_up(dtype: Any) -> None:
    # First-use costs of the framework (thread pool, oneDNN primitives) belong to the baseline.
    import torch

    with torch.inference_mode():
        x = torch.randn(4, 64, dtype=dtype)
        torch.nn.functional.linear(x, torch.randn(32, 64, dtype=dtype))
        image = torch.randn(1, 3, 16, 16, dtype=dtype)
        torch.nn.functional.conv2d(image, torch.randn(8, 3, 3, 3, dtype=dtype), padding=1)


def warm_up_framework() -> None:
    """What a worker does before its baseline, for the framework baseline (planner.baseline): torchao's tensor
    types imported, the framework warmed up in float32."""
    import torch

    from planner.recipes import import_tensor_types

    import_tensor_types()
    warm_up(torch.float32)


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    from planner import sparse
    from planner.artifact import load_weights_into, set_eval, weightless_structure
    from planner.pruning import unpack_artifact_state
    from planner.recipes import DTYPES
    from planner.sources import ModelSource

    if job.get("needs_torchao"):
        from planner.recipes import import_tensor_types

        import_tensor_types()
    dtype = DTYPES[job["dtype"]]
    torch.manual_seed(0)
    warm_up(dtype)
    sparse.warm_up()  # a sparse artifact is densified at load: its ops' first use belongs to the baseline
    source = ModelSource.from_json(job["source"])
    model = weightless_structure(source, job["artifact_format"])
    if model is not None and job.get("recipe"):
        from planner.recipes import Recipe, linearize_conv1d

        linearize_conv1d(model, Recipe.from_json(job["recipe"]))  # the structure the recipe saved
    inputs = torch.load(job["inputs"], weights_only=True)
    inputs = tuple(t.to(dtype) if t.is_floating_point() else t for t in inputs)
    release_freed_memory()
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
    loaded = proc_status_bytes("VmRSS")
    weights = private_resident_bytes() - private_baseline

    with torch.inference_mode():
        measured = measure_runs(lambda: model(*inputs))
    outputs = [t.float() for t in floating_tensors(measured.first_output)]
    result: dict[str, Any] = {
        "verified_runtime_bytes": weights + measured.warm_growth,
        "verified_weight_resident_bytes": weights,
        "verified_activation_bytes": measured.warm_growth,
        # What the first forward needed beyond a warm one (framework lazy init); reported, not ranked.
        "verified_first_run_extra_bytes": max(0, measured.first_peak - loaded - measured.warm_growth),
        "baseline_rss_bytes": baseline,
        "peak_is_exact": exact_peak,
        "load_s": load_s,
        **measured.timing_fields(),
    }
    if job.get("save_reference"):
        torch.save(outputs, job["reference"])
        result.update(compare_outputs(outputs, outputs))
    else:
        reference = torch.load(job["reference"], weights_only=True)
        result.update(compare_outputs(reference, outputs))
    result["output_shapes"] = [list(t.shape) for t in outputs]
    return result


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:], run_job))
