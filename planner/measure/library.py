"""The shared measurement library: what every verification worker measures, the same way in each.

- the process's own memory from /proc/self/status (resident set, its high-water mark, file-backed pages) and the
  high-water mark's reset (/proc/self/clear_refs);
- glibc's handling of freed memory (MEASUREMENT_ENV for a child that compares allocation patterns,
  return_freed_memory_promptly in this process; never for a verification worker, whose figures are a user's);
- one model's lifetime (measure_runs, lifetime_fields: load, first-forward and steady peaks, latency median);
- output quality against the float32 reference (floating_tensors, compare_outputs).

No torch import at module level: the ONNX Runtime worker measures its baseline with no torch in the process.
"""

from __future__ import annotations

import ctypes
import gc
import math
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

# Environment for a child that compares one allocation pattern with another (the scratch probe): fixed mmap
# threshold (no dynamic growth) and no trim hysteresis. Not for verification workers: their figures must be what a
# user's own process holds, with glibc's default settings.
MEASUREMENT_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
LATENCY_BUDGET_S = 1.0  # beyond the first and the warm run; a plan verifies every recipe, so this adds up
LATENCY_MAX_RUNS = 20


def proc_status_bytes(field_name: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM, RssFile...), in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def private_resident_bytes() -> int:
    """Resident memory less file-backed pages (library code and data mapped from disk).

    Loaded weights are anonymous memory. The first call of a code path (unpickling a torchao int4 tensor) pages in
    library code too; those pages count in the lifetime peak (a user's process holds them) but are the framework's,
    not the weights', so the weights figure leaves them out."""
    return proc_status_bytes("VmRSS") - proc_status_bytes("RssFile")


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


@dataclass
class RunMeasurement:
    first_ms: float
    first_peak: int  # VmHWM over the first run, from a reset mark (first-use costs included)
    second_peak: int  # VmHWM over the second run, from a reset mark
    repeat_peak: int  # VmHWM over the latency runs after the second, from a reset mark (second_peak if none)
    warm_growth: int  # second_peak minus the resident memory just before the second run
    latency_ms: float  # median of the warm runs
    runs: int
    alone: bool = True  # the runs had the machine to themselves (planner.measure.timing_lock)

    def timing_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"first_forward_ms": self.first_ms, "latency_ms": self.latency_ms,
                                  "latency_runs": self.runs}
        if not self.alone:
            fields["latency_shared"] = True
        return fields


def measure_runs(run: Callable[[], Any], keep_first: Callable[[Any], None]) -> RunMeasurement:
    """The model's runs as a user's process makes them, each output dropped before the next run; alone on the
    machine when other jobs run at once (planner.measure.timing_lock), so that their times are comparable.

    The first run's output goes to `keep_first` (which should put what it needs out of memory, e.g. on disk) and
    is then released, so later peaks do not carry it. Each phase starts from a reset high-water mark; nothing is
    trimmed between runs, since a user's process keeps what glibc caches. Shared by every measuring worker."""
    from planner.measure.timing_lock import runs_alone

    with runs_alone() as alone:
        measured = _measure_runs(run, keep_first)
    measured.alone = alone
    return measured


def _measure_runs(run: Callable[[], Any], keep_first: Callable[[Any], None]) -> RunMeasurement:
    reset_peak()
    started = time.perf_counter()
    output = run()
    first_ms = (time.perf_counter() - started) * 1000
    first_peak = proc_status_bytes("VmHWM")
    keep_first(output)
    del output
    gc.collect()
    reset_peak()
    before_second = proc_status_bytes("VmRSS")
    started = time.perf_counter()
    run()
    latencies = [(time.perf_counter() - started) * 1000]
    second_peak = proc_status_bytes("VmHWM")
    reset_peak()
    budget_end = time.perf_counter() + LATENCY_BUDGET_S
    while len(latencies) < LATENCY_MAX_RUNS and time.perf_counter() < budget_end and first_ms < 5000:
        started = time.perf_counter()
        run()
        latencies.append((time.perf_counter() - started) * 1000)
    repeat_peak = proc_status_bytes("VmHWM") if len(latencies) > 1 else second_peak
    return RunMeasurement(first_ms, first_peak, second_peak, repeat_peak, second_peak - before_second,
                          statistics.median(latencies), len(latencies))


def lifetime_fields(baseline: int, load_peak: int, measured: RunMeasurement) -> dict[str, int]:
    """The peaks of load, first and second forward over the fresh process's baseline, and the largest of them
    (the verified runtime: what a device must hold at once to load the model and run it). The latency runs' peak
    is reported beside it: glibc's cache of freed blocks can grow it over many runs."""
    lifetime = {"verified_load_peak_bytes": load_peak - baseline,
                "verified_first_forward_peak_bytes": measured.first_peak - baseline,
                "verified_steady_peak_bytes": measured.second_peak - baseline}
    return {**lifetime, "verified_runtime_bytes": max(lifetime.values()),
            "verified_repeat_peak_bytes": measured.repeat_peak - baseline}


@dataclass
class LoadMeasurement:
    """One artifact's load in a worker: the baseline before it, the high-water mark during it, what stayed."""

    baseline: int  # resident bytes right before loading
    peak: int  # the high-water mark after loading
    weights: int  # resident growth the loaded model keeps (file-backed pages excluded where the worker can)
    exact_peak: bool  # reset_peak() worked, so the peak is this phase's own
    load_s: float


def verified_fields(load: LoadMeasurement, measured: RunMeasurement, activation_bytes: int | None = None
                    ) -> dict[str, Any]:
    """The result fields every worker reports from its load and runs (planner.runtimes.rows reads them). Activations
    default to the steady peak beyond the weights (the runtime's arena keeps the first run's memory)."""
    lifetime = lifetime_fields(load.baseline, load.peak, measured)
    if activation_bytes is None:
        activation_bytes = max(0, lifetime["verified_steady_peak_bytes"] - load.weights)
    return {**lifetime, "verified_weight_resident_bytes": load.weights, "verified_activation_bytes": activation_bytes,
            "baseline_rss_bytes": load.baseline, "peak_is_exact": load.exact_peak, "load_s": load.load_s,
            **measured.timing_fields()}


def quality_fields(reference: list[Any], outputs: list[Any]) -> dict[str, Any]:
    """compare_outputs against the float32 reference, and the output shapes."""
    return {**compare_outputs(reference, outputs), "output_shapes": [list(t.shape) for t in outputs]}


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
