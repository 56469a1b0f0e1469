"""The framework's own resident memory: interpreter, runtime library and allocator, before any model.

A verified runtime figure is what the model adds on top of this baseline, so a user who deploys on another
runtime (ExecuTorch, a C++ ONNX Runtime build) can use it as is; a user who deploys this very stack needs the
baseline too (`--budget-on device`). It is measured once per machine and library versions, in a fresh
process that does exactly what a verification worker does before its own baseline (the imports, nothing run),
and cached on disk: `python -m planner.runtimes.baseline BACKEND RESULT.json FOLDER` is that process.

The same process then runs a tiny forward and records the framework's first-use cost: thread pools, the kernel
libraries' pages and primitive caches that the first forward of any model pays. A verified runtime includes it
(the worker runs nothing before its baseline, as a user's process does), so the analytic runtime adds it too.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from planner.runtimes.executorch import worker as executorch_worker
from planner.runtimes.onnxruntime import worker as onnxruntime_worker
from planner.runtimes.torch_cpu import worker as torch_worker

# Each runtime's imports and first tiny forward (light modules: the libraries are imported inside, in the
# measured process). The forward gets the measurement's folder, where PREPARED wrote what it needs first, and may
# return the resident bytes its first-use cost is measured from (after loading a program, for ExecuTorch).
IMPORTS = {"torch": torch_worker.import_framework, "onnxruntime": onnxruntime_worker.import_framework,
           "executorch": executorch_worker.import_framework}
FIRST_FORWARDS: dict[str, Callable[[Path], int | None]] = {
    "torch": lambda folder: torch_worker.first_tiny_forward(),
    "onnxruntime": lambda folder: onnxruntime_worker.first_tiny_forward(),
    "executorch": executorch_worker.first_tiny_forward,
}
# A runtime that runs only programs lowered ahead of time gets its tiny program from this module's `--tiny FOLDER`,
# in a process of its own (lowering imports what the measured process must not hold).
PREPARED = {"executorch": "planner.runtimes.executorch.lower"}
MEASURED_KEYS = ("rss_bytes", "first_use_bytes")
BACKEND_LIBRARIES = {"torch": ("torch", "torchao"), "onnxruntime": ("onnxruntime", "onnx", "numpy"),
                     "executorch": ("executorch", "torch")}
CACHE_FILE = "framework-baseline-v3.json"  # v3: the median of MEASURE_SAMPLES processes (v2 kept one)
# One process's first-use cost is not reliable: right after an install torch's measured 20.2 MB where later
# processes on the same machine measured 5.5 MB (the kernel maps library pages around each fault differently),
# and the cached outlier put every small model's analytic runtime 15 MB over its verified one. The median of
# three fresh processes (once per machine and versions) drops such an outlier.
MEASURE_SAMPLES = 3
MEASURE_TIMEOUT_S = 300.0


def cache_dir() -> Path:
    return Path(os.environ.get("PLANNER_CACHE_DIR") or Path.home() / ".cache" / "planner")


def cache_key(backend: str) -> str:
    """Machine and versions: a new library or another host is a new measurement."""
    versions = []
    for name in BACKEND_LIBRARIES[backend]:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name} missing")
    return "|".join([backend, platform.node(), platform.machine(), f"python {platform.python_version()}", *versions])


def framework_baseline(backend: str) -> int | None:
    """Resident bytes of a `backend` process with its libraries imported and no model: cached, else measured now
    (a few seconds, once). None when the measurement fails; the plan goes on without the column."""
    measured = _measurement(backend)
    return measured["rss_bytes"] if measured else None


def first_use_bytes(backend: str) -> int | None:
    """Peak resident growth of the first tiny forward in a fresh `backend` process (see the module docstring)."""
    measured = _measurement(backend)
    return measured["first_use_bytes"] if measured else None


def _measurement(backend: str) -> dict[str, int] | None:
    key = cache_key(backend)
    path = cache_dir() / CACHE_FILE
    cached = _read_cache(path)
    entry = cached.get(key)
    if isinstance(entry, dict) and all(isinstance(entry.get(name), int) for name in MEASURED_KEYS):
        return {name: entry[name] for name in MEASURED_KEYS}
    measured = _measure(backend)
    if measured is not None:
        _write_cache(path, {**cached, key: measured})
    return measured


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # absent or damaged: measure again
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path, data: dict[str, Any]) -> None:
    try:  # a cache that cannot be written only costs a measurement next time
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
            json.dump(data, handle, indent=1, sort_keys=True)
        Path(handle.name).replace(path)
    except OSError:
        pass


def _measure(backend: str) -> dict[str, int] | None:
    from planner.measure.isolation import run_isolated

    with tempfile.TemporaryDirectory(prefix="planner-baseline-") as folder:
        result = Path(folder) / "baseline.json"
        if backend in PREPARED:
            prepared = run_isolated([sys.executable, "-P", "-m", PREPARED[backend], "--tiny", folder],
                                    timeout_s=MEASURE_TIMEOUT_S, memory_cap_bytes=None, env=dict(os.environ))
            if prepared.returncode != 0:
                return None
        samples = []
        for _ in range(MEASURE_SAMPLES):
            # glibc's default settings, as in a verification worker and a user's process.
            result.unlink(missing_ok=True)
            outcome = run_isolated([sys.executable, "-P", "-m", "planner.runtimes.baseline", backend, str(result),
                                    folder], timeout_s=MEASURE_TIMEOUT_S, memory_cap_bytes=None, env=dict(os.environ))
            if outcome.returncode != 0 or not result.exists():
                return None
            samples.append(json.loads(result.read_text()))
        return {name: int(statistics.median(int(sample[name]) for sample in samples)) for name in MEASURED_KEYS}


def measure_here(backend: str, folder: Path) -> dict[str, int]:
    """In this fresh process: the worker's imports, the resident set, then the first tiny forward's peak growth
    (`folder`: where PREPARED wrote the runtime's tiny program)."""
    import gc

    from planner.measure.library import proc_status_bytes, reset_peak

    if backend not in IMPORTS:
        raise ValueError(f"unknown backend {backend!r}")
    IMPORTS[backend]()
    gc.collect()
    rss = proc_status_bytes("VmRSS")
    reset_peak()
    before_forward = FIRST_FORWARDS[backend](folder) or rss
    return {"rss_bytes": rss, "first_use_bytes": proc_status_bytes("VmHWM") - before_forward}


if __name__ == "__main__":
    from planner import quiet_library_noise

    quiet_library_noise()
    Path(sys.argv[2]).write_text(json.dumps(measure_here(sys.argv[1], Path(sys.argv[3]))))
