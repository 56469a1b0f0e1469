"""Verification of one artifact in a fresh process: load it, run it, measure it.

The parent (planner.pipeline) starts `python -m planner.verify JOB.json RESULT.json` once per recipe,
so no recipe shares allocator state, imported kernels or cached pages with another. The process:

1. imports torch (and torchao), warms the framework up on a tiny forward, builds the model's
   structure without weights (meta), and loads the example input;
2. resets the resident-memory high-water mark (/proc/self/clear_refs) and takes the baseline;
3. loads the artifact (resident weights = growth of RSS without file-backed pages after load, see
   private_resident_bytes) and runs the example input once (first-run lazy initialisation is reported on its own);
4. resets the high-water mark and runs it again: activation peak = peak - RSS before that forward;
   verified runtime = resident weights + activation peak;
5. times further forwards (median) and compares the first outputs with the fp32 reference.

glibc is told to hand large freed blocks straight back to the OS (MALLOC_MMAP_THRESHOLD_), so the
high-water mark is what was alive at once, not what the allocator kept cached.
"""

from __future__ import annotations

import ctypes
import gc
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Environment for the child: fixed mmap threshold (no dynamic growth) and no trim hysteresis.
MEASUREMENT_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
LATENCY_BUDGET_S = 1.0  # beyond the first and the warm run; a plan verifies every recipe, so this adds up
LATENCY_MAX_RUNS = 20


def _proc_status_kib(field_name: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def private_resident_bytes() -> int:
    """Resident memory less file-backed pages (library code and data mapped from disk).

    Loaded weights are anonymous memory. A worker forked from planner.isolation's fork server has the libraries
    the server imported mapped but not yet paged into its own page tables, so the first call of a code path
    (unpickling a torchao int4 tensor) adds about 1 MB of library pages to VmRSS that a freshly started process
    had already mapped at import; those are the framework's, not the weights'."""
    return _proc_status_kib("VmRSS") - _proc_status_kib("RssFile")


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the OS does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def return_freed_memory_promptly() -> None:
    """In this process, what MEASUREMENT_ENV does for a child: large blocks come from mmap and go back to the
    OS when freed, with no trim hysteresis, so one recipe's freed copy is gone before the next is made."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-1, 0)  # M_TRIM_THRESHOLD
    libc.mallopt(-3, 65536)  # M_MMAP_THRESHOLD (also stops glibc raising it dynamically)


def release_freed_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def floating_tensors(output: Any) -> list[Any]:
    """Every floating tensor in a tensor, tuple, list, dict or model-output object, in a stable order."""
    import torch

    if isinstance(output, torch.Tensor):
        return [output] if output.is_floating_point() else []
    if isinstance(output, Mapping):
        return [t for value in output.values() for t in floating_tensors(value)]
    if isinstance(output, list | tuple):
        return [t for value in output for t in floating_tensors(value)]
    if hasattr(output, "to_tuple"):  # transformers ModelOutput
        return floating_tensors(output.to_tuple())
    if hasattr(output, "__dataclass_fields__"):
        return [t for name in output.__dataclass_fields__ for t in floating_tensors(getattr(output, name))]
    return []


def compare_outputs(reference: list[Any], candidate: list[Any]) -> dict[str, float | None]:
    """SQNR over all floating outputs together, max abs error, and top-1 agreement for logits."""
    import torch

    if len(reference) != len(candidate) or any(r.shape != c.shape for r, c in zip(reference, candidate, strict=True)):
        raise RuntimeError("the recipe changed the model's output structure or shapes")
    signal = noise = 0.0
    max_abs = 0.0
    for ref, out in zip(reference, candidate, strict=True):
        ref64, out64 = ref.double(), out.double()
        signal += float((ref64 * ref64).sum())
        diff = ref64 - out64
        noise += float((diff * diff).sum())
        if diff.numel():
            max_abs = max(max_abs, float(diff.abs().max()))
    if not all(math.isfinite(x) for x in (signal, noise)):
        sqnr: float | None = None
    elif noise == 0:
        sqnr = math.inf
    else:
        sqnr = 10 * math.log10(signal / noise) if signal > 0 else -math.inf
    top1 = None
    logits = next((r for r in reference if r.dim() >= 2 and r.shape[-1] >= 2), None)
    if logits is not None:
        index = next(i for i, r in enumerate(reference) if r is logits)
        top1 = float((logits.argmax(-1) == candidate[index].argmax(-1)).to(torch.float64).mean())
    reference_max = max((float(r.abs().max()) for r in reference if r.numel()), default=0.0)
    return {"sqnr_db": sqnr, "max_abs_error": max_abs, "top1_agreement": top1, "reference_max_abs": reference_max}


@dataclass
class RunMeasurement:
    first_output: Any  # what the first run returned
    first_ms: float
    first_peak: int  # VmHWM after the first run (lazy initialisation included)
    warm_peak: int  # VmHWM of the warm run, from a reset high-water mark
    warm_growth: int  # warm_peak minus the resident memory just before the warm run
    latency_ms: float  # median of the warm runs
    runs: int

    def timing_fields(self) -> dict[str, Any]:
        return {"first_forward_ms": self.first_ms, "latency_ms": self.latency_ms, "latency_runs": self.runs}


def measure_runs(run: Callable[[], Any]) -> RunMeasurement:
    """Run once (first-use costs included), then again from a reset high-water mark (the warm peak),
    then repeat for a latency median within LATENCY_BUDGET_S. Shared by the torch and ONNX workers."""
    started = time.perf_counter()
    first_output = run()
    first_ms = (time.perf_counter() - started) * 1000
    first_peak = _proc_status_kib("VmHWM")
    release_freed_memory()
    reset_peak()
    before_warm = _proc_status_kib("VmRSS")
    started = time.perf_counter()
    run()
    latencies = [(time.perf_counter() - started) * 1000]
    warm_peak = _proc_status_kib("VmHWM")
    budget_end = time.perf_counter() + LATENCY_BUDGET_S
    while len(latencies) < LATENCY_MAX_RUNS and time.perf_counter() < budget_end and first_ms < 5000:
        started = time.perf_counter()
        run()
        latencies.append((time.perf_counter() - started) * 1000)
    return RunMeasurement(first_output, first_ms, first_peak, warm_peak, warm_peak - before_warm,
                          statistics.median(latencies), len(latencies))


def _warm_up(dtype: Any) -> None:
    # First-use costs of the framework (thread pool, oneDNN primitives) belong to the baseline.
    import torch

    with torch.inference_mode():
        x = torch.randn(4, 64, dtype=dtype)
        torch.nn.functional.linear(x, torch.randn(32, 64, dtype=dtype))
        image = torch.randn(1, 3, 16, 16, dtype=dtype)
        torch.nn.functional.conv2d(image, torch.randn(8, 3, 3, 3, dtype=dtype), padding=1)


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
    _warm_up(dtype)
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
    baseline = _proc_status_kib("VmRSS")
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
    loaded = _proc_status_kib("VmRSS")
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


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "inf" / "-inf" / "nan": strict JSON has no infinities
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    return value


def worker_main(argv: list[str], run: Callable[[dict[str, Any]], dict[str, Any]]) -> int:
    """`python -m planner.WORKER JOB.json RESULT.json`: run the job, write the result atomically.
    A failure is a result too ({"error": "Type: first line"}, exit 1): the parent turns it into a row."""
    from planner import quiet_library_noise

    quiet_library_noise()
    job_path, result_path = Path(argv[0]), Path(argv[1])
    job = json.loads(job_path.read_text())
    try:
        result = run(job)
    except Exception as error:
        first_line = (str(error).strip().splitlines() or [""])[0][:300]
        result = {"error": f"{type(error).__name__}: {first_line}"}
    temporary = result_path.with_suffix(".tmp")
    temporary.write_text(json.dumps(_json_safe(result)))
    temporary.replace(result_path)
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:], run_job))
