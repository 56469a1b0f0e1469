"""The framework's own resident memory: interpreter, runtime library and allocator, before any model.

A verified runtime figure is what the model adds on top of this baseline, so a user who deploys on another
runtime (ExecuTorch, a C++ ONNX Runtime build) can use it as is; a user who deploys this very stack needs the
baseline too (`--budget-on device`). It is measured once per machine and library versions, in a fresh
process that does exactly what a verification worker does before its own baseline (imports, warm-up), and
cached on disk: `python -m planner.baseline torch|onnxruntime RESULT.json` is that process.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from planner.runtimes.onnxruntime import worker as onnxruntime_worker
from planner.runtimes.torch_cpu import worker as torch_worker

# Each runtime's worker warm-up (light modules: the libraries are imported inside, in the measured process).
WARM_UPS = {"torch": torch_worker.warm_up_framework, "onnxruntime": onnxruntime_worker.warm_up_framework}
BACKEND_LIBRARIES = {"torch": ("torch", "torchao"), "onnxruntime": ("onnxruntime", "onnx", "numpy")}
CACHE_FILE = "framework-baseline.json"
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
    """Resident bytes of a warmed-up `backend` process with no model: cached, else measured now (a few
    seconds, once). None when the measurement fails; the plan goes on without the column."""
    key = cache_key(backend)
    path = cache_dir() / CACHE_FILE
    cached = _read_cache(path)
    if isinstance(cached.get(key), int):
        return cached[key]
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


def _measure(backend: str) -> int | None:
    from planner.isolation import run_isolated
    from planner.measure import MEASUREMENT_ENV

    with tempfile.TemporaryDirectory(prefix="planner-baseline-") as folder:
        result = Path(folder) / "baseline.json"
        outcome = run_isolated([sys.executable, "-m", "planner.baseline", backend, str(result)],
                               timeout_s=MEASURE_TIMEOUT_S, memory_cap_bytes=None,
                               env=dict(os.environ, **MEASUREMENT_ENV))
        if outcome.returncode != 0 or not result.exists():
            return None
        return int(json.loads(result.read_text())["rss_bytes"])


def measure_here(backend: str) -> int:
    """In this fresh process: the worker's imports and warm-up, then the resident set."""
    from planner.measure import proc_status_bytes, release_freed_memory

    if backend not in WARM_UPS:
        raise ValueError(f"unknown backend {backend!r}")
    WARM_UPS[backend]()
    release_freed_memory()
    return proc_status_bytes("VmRSS")


if __name__ == "__main__":
    from planner import quiet_library_noise

    quiet_library_noise()
    Path(sys.argv[2]).write_text(json.dumps({"rss_bytes": measure_here(sys.argv[1])}))
