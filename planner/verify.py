"""Verification of one artifact in a fresh process: load it, run it, measure it.

The parent (planner.pipeline) starts `python -m planner.verify JOB.json RESULT.json` once per recipe,
so no recipe shares allocator state, imported kernels or cached pages with another. The process:

1. imports torch (and torchao's tensor types where the recipe quantizes), builds the model's structure without
   weights (meta; this imports the model's own code, e.g. transformers) and loads the example input;
2. takes the baseline: VmRSS right there, with nothing run (no warm-up: a device pays the framework's first-use
   costs, thread pool, oneDNN kernels, library code paged in, during the model's first forward, so they are
   the model's too). planner.baseline measures the same state without a model (the framework column);
3. loads the artifact: load peak = VmHWM - baseline (a loader's transient copies included);
4. runs the example input once from a reset high-water mark: first-forward peak = VmHWM - baseline (lazy
   initialisation and first-use code pages included);
5. runs it again from a reset high-water mark: steady peak = VmHWM - baseline;
   verified runtime = lifetime peak = max(load, first-forward, steady peak), what a device must survive, the same
   figure as VmHWM - baseline over load + two forwards with no reset (scripts/measure_lifetime.py checks it);
6. times further forwards (median) and compares the warm run's outputs with the fp32 reference.

Nothing is freed or trimmed between the phases beyond what the model's own code frees, so the phases add up as
they would in a deployment. glibc is told to hand large freed blocks straight back to the OS
(MALLOC_MMAP_THRESHOLD_), so the high-water mark is what was alive at once, not what the allocator kept cached.
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
    if not reference_is_finite(reference):
        # No error can be measured against NaN/inf: every quality figure is unknown, not a number.
        return {"sqnr_db": None, "max_abs_error": None, "top1_agreement": None, "reference_max_abs": None,
                "reference_finite": False}
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
    return {"sqnr_db": sqnr, "max_abs_error": max_abs, "top1_agreement": top1, "reference_max_abs": reference_max,
            "reference_finite": True}


def reference_is_finite(reference: list[Any]) -> bool:
    """Every value of every floating reference output is finite (no NaN, no inf)."""
    import torch

    return all(bool(torch.isfinite(tensor).all()) for tensor in reference)


@dataclass
class RunMeasurement:
    output: Any  # what the warm run returned (the first run's output is dropped at once, as a caller would)
    first_ms: float
    first_peak: int  # VmHWM of the first run, from a high-water mark reset just before it
    warm_peak: int  # VmHWM of the warm (second) run, from a reset high-water mark
    warm_growth: int  # warm_peak minus the resident memory just before the warm run
    latency_ms: float  # median of the warm runs
    runs: int

    def timing_fields(self) -> dict[str, Any]:
        return {"first_forward_ms": self.first_ms, "latency_ms": self.latency_ms, "latency_runs": self.runs}


@dataclass(frozen=True)
class LifetimePeaks:
    """Peak resident growth over the worker's baseline in each phase of a deployment's life."""

    load: int  # while the artifact is loaded (the loader's transient copies included)
    first_forward: int  # during the first forward (lazy initialisation, first-use code pages)
    steady: int  # during the second, warm forward

    @property
    def lifetime(self) -> int:
        """What a device must survive: the largest of the three."""
        return max(self.load, self.first_forward, self.steady)

    def fields(self) -> dict[str, int]:
        return {"verified_runtime_bytes": self.lifetime, "verified_load_peak_bytes": self.load,
                "verified_first_forward_peak_bytes": self.first_forward, "verified_steady_peak_bytes": self.steady}


def lifetime_peaks(baseline: int, load_hwm: int, measured: RunMeasurement) -> LifetimePeaks:
    """The three phase peaks from absolute high-water marks (each read after its own reset) and the baseline."""
    return LifetimePeaks(load_hwm - baseline, measured.first_peak - baseline, measured.warm_peak - baseline)


def measure_runs(run: Callable[[], Any]) -> RunMeasurement:
    """Run once from a reset high-water mark (first-use costs included), then again from a reset mark (the warm
    peak), then repeat for a latency median within LATENCY_BUDGET_S. Nothing is freed or trimmed in between, as in
    a deployment. Shared by the torch and ONNX workers."""
    reset_peak()
    started = time.perf_counter()
    run()  # dropped: holding it would add an output's bytes to the warm peak that no deployment pays
    first_ms = (time.perf_counter() - started) * 1000
    first_peak = _proc_status_kib("VmHWM")
    reset_peak()
    before_warm = _proc_status_kib("VmRSS")
    started = time.perf_counter()
    output = run()
    latencies = [(time.perf_counter() - started) * 1000]
    warm_peak = _proc_status_kib("VmHWM")
    budget_end = time.perf_counter() + LATENCY_BUDGET_S
    while len(latencies) < LATENCY_MAX_RUNS and time.perf_counter() < budget_end and first_ms < 5000:
        started = time.perf_counter()
        run()
        latencies.append((time.perf_counter() - started) * 1000)
    return RunMeasurement(output, first_ms, first_peak, warm_peak, warm_peak - before_warm,
                          statistics.median(latencies), len(latencies))


def worker_imports() -> None:
    """What every torch verification worker imports before its baseline, and planner.baseline before its figure:
    torch and torchao's tensor types (the int4 prototype's included), whatever the recipe, so every row's
    baseline, and the framework column, hold the same libraries."""
    from planner.recipes import import_tensor_types

    import_tensor_types()


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    from planner.artifact import load_weights_into, set_eval, weightless_structure
    from planner.pruning import unpack_artifact_state
    from planner.recipes import DTYPES
    from planner.sources import ModelSource

    worker_imports()
    dtype = DTYPES[job["dtype"]]
    torch.manual_seed(0)
    source = ModelSource.from_json(job["source"])
    model = weightless_structure(source, job["artifact_format"])
    if model is not None and job.get("recipe"):
        from planner.recipes import Recipe, linearize_conv1d

        linearize_conv1d(model, Recipe.from_json(job["recipe"]))  # the structure the recipe saved
    inputs = torch.load(job["inputs"], weights_only=True)
    inputs = tuple(t.to(dtype) if t.is_floating_point() else t for t in inputs)
    # The structure's build may have made and dropped a real copy (non-persistent buffers): gone before the baseline.
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
    load_hwm = _proc_status_kib("VmHWM")
    loaded = _proc_status_kib("VmRSS")
    weights = private_resident_bytes() - private_baseline

    with torch.inference_mode():
        measured = measure_runs(lambda: model(*inputs))
    outputs = [t.float() for t in floating_tensors(measured.output)]
    result: dict[str, Any] = {
        # verified_runtime_bytes: the lifetime peak, max of the load, first-forward and steady peaks
        **lifetime_peaks(baseline, load_hwm, measured).fields(),
        "verified_weight_resident_bytes": weights,  # anonymous resident growth of the load (no file pages)
        "verified_activation_bytes": measured.warm_growth,  # peak growth of the warm forward over its start
        # What the first forward needed beyond a warm one (framework lazy init and first-use code pages).
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
