"""The framework's own resident memory: interpreter, runtime library and allocator, before any model.

A verified runtime figure is what the model adds on top of this baseline, so a user who deploys on another
runtime (ExecuTorch, a C++ ONNX Runtime build) can use it as is; a user who deploys this very stack needs the
baseline too (`--budget-on device`). It is measured once per machine and library versions, in a fresh
process that does what a verification worker does before its own baseline (the imports, nothing run: first-use
costs are in the verified runtime's first-forward peak), so verified runtime + framework = the process's peak
(less the model's own Python code, e.g. transformers, which a worker imports to build the structure), and
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

BACKEND_LIBRARIES = {"torch": ("torch", "torchao"), "onnxruntime": ("onnxruntime", "onnx", "numpy")}
# v2: no warm-up before the figure (the first-use costs moved into the verified runtime)
CACHE_FILE = "framework-baseline-v2.json"
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
    from planner.verify import MEASUREMENT_ENV

    with tempfile.TemporaryDirectory(prefix="planner-baseline-") as folder:
        result = Path(folder) / "baseline.json"
        outcome = run_isolated([sys.executable, "-m", "planner.baseline", backend, str(result)],
                               timeout_s=MEASURE_TIMEOUT_S, memory_cap_bytes=None,
                               env=dict(os.environ, **MEASUREMENT_ENV))
        if outcome.returncode != 0 or not result.exists():
            return None
        return int(json.loads(result.read_text())["rss_bytes"])


# ---- the framework's first-use costs, for the analytic lifetime peak ----
#
# A device pays the framework's first use of each kernel family (library code paged in, oneDNN primitives and
# JIT kernels, thread pool) during the model's first forward, and most of it stays resident. The verified runtime
# counts it (planner.verify takes its baseline before anything runs), so the analytic runtime adds it: measured
# once per machine, library versions, dtype, scheme and kernel families, on a tiny model with those families,
# in a fresh process that does what a verification worker does, and cached beside the framework baseline.

FIRST_USE_VERSION = "first-use v2"
# Layer class names (any module in the model) -> the kernel family a forward through it uses.
_FAMILY_MARKERS = (("rnn", ("LSTM", "GRU", "RNN")), ("attention", ("Attention", "Transformer")),
                   ("norm", ("Norm",)), ("embedding", ("Embedding",)), ("linear", ("Linear", "Conv1D")),
                   ("conv", ("Conv",)))
# The recipe fields that choose kernels (pruning and its sparse storage do not: a sparse artifact loads dense).
_KERNEL_FIELDS = ("dtype", "quantize", "bits", "group_size", "mapping")


def layer_families(type_names: set[str]) -> tuple[str, ...]:
    """The kernel families of a model from its module class names: transformers' Conv1D is a matmul (linear),
    other Conv* are convolutions; attention also covers fused transformer layers."""
    families = set()
    for name in type_names:
        for family, markers in _FAMILY_MARKERS:
            if any(marker in name for marker in markers) and not (family == "conv" and name == "Conv1D"):
                families.add(family)
                break
    return tuple(sorted(families))


def first_use_key(recipe_json: dict[str, Any], families: tuple[str, ...]) -> str:
    kernel = ",".join(f"{name}={recipe_json.get(name)}" for name in _KERNEL_FIELDS)
    return "|".join([cache_key("torch"), FIRST_USE_VERSION, kernel, "+".join(families)])


def first_use_costs(recipe_json: dict[str, Any], families: tuple[str, ...], measure: bool = True
                    ) -> dict[str, int] | None:
    """{"first_forward": bytes, "steady": bytes}: what a first forward through these kernel families adds at its
    peak, and what stays resident for later forwards, at the recipe's dtype and scheme. Cached, else measured now
    in a child (a few seconds, once) unless measure is off; None when unknown."""
    kernel_recipe = {name: recipe_json.get(name) for name in _KERNEL_FIELDS}
    key = first_use_key(kernel_recipe, families)
    path = cache_dir() / CACHE_FILE
    cached = _read_cache(path)
    known = cached.get(key)
    if isinstance(known, dict) and all(isinstance(known.get(name), int) for name in ("first_forward", "steady")):
        return known
    if not measure:
        return None
    measured = _measure_first_use(kernel_recipe, families)
    if measured is not None:
        _write_cache(path, {**_read_cache(path), key: measured})
    return measured


def _measure_first_use(kernel_recipe: dict[str, Any], families: tuple[str, ...]) -> dict[str, int] | None:
    """Two fresh processes, as a plan does: one applies the recipe to the tiny model and saves it (quantizing runs
    kernels of its own, which must not be paged in before the measurement), one loads and runs it."""
    from planner.isolation import run_isolated
    from planner.verify import MEASUREMENT_ENV

    with tempfile.TemporaryDirectory(prefix="planner-first-use-") as folder:
        job, result = Path(folder) / "job.json", Path(folder) / "result.json"
        job.write_text(json.dumps({"recipe": dict(kernel_recipe, name="first-use"), "families": list(families),
                                   "artifact": str(Path(folder) / "tiny.pt")}))
        for step in ("first-use-build", "first-use"):
            outcome = run_isolated([sys.executable, "-m", "planner.baseline", step, str(job), str(result)],
                                   timeout_s=MEASURE_TIMEOUT_S, memory_cap_bytes=None,
                                   env=dict(os.environ, **MEASUREMENT_ENV))
            if outcome.returncode != 0:
                return None
        if not result.exists():
            return None
        data = json.loads(result.read_text())
        return {"first_forward": int(data["first_forward"]), "steady": int(data["steady"])}


def first_use_model(families: tuple[str, ...]) -> tuple[Any, tuple[Any, ...]]:
    """A tiny model that runs each kernel family once, and its inputs (float32; the recipe casts them). Builds
    on the current default device (meta for a weightless structure)."""
    import math

    import torch
    from torch import nn

    width = 128  # int4 needs in_features divisible by its group (128) and out_features by 16
    uses_matmul = bool({"linear", "attention"} & set(families))

    class FirstUse(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding = nn.Embedding(64, width) if "embedding" in families else None
            self.linear = nn.Linear(width, width) if uses_matmul else None
            # Models keep some layers float beside quantized ones (a vocabulary head whose size int4 refuses,
            # the classifier): 72 is not a multiple of 16, so int4 leaves this one in the recipe's dtype.
            self.head = nn.Linear(width, 72) if uses_matmul else None
            self.norm = nn.LayerNorm(width) if "norm" in families else None
            self.conv = nn.Conv2d(3, 8, 3, padding=1) if "conv" in families else None
            self.batch_norm = nn.BatchNorm2d(8) if "conv" in families and "norm" in families else None
            self.rnn = nn.LSTM(16, 16, batch_first=True) if "rnn" in families else None

        def forward(self, ids: Any, hidden: Any, image: Any, sequence: Any) -> list[Any]:
            outputs = []
            if self.embedding is not None:
                hidden = hidden + self.embedding(ids)
            if self.norm is not None:
                hidden = self.norm(hidden)
            if self.linear is not None:
                hidden = self.linear(hidden) + self.linear(hidden.view(-1, width)).view_as(hidden)  # 3-D and 2-D
            if "attention" in families:
                hidden = self._attention(hidden)
            if self.head is not None:
                outputs.append(self.head(hidden))
            outputs.append(hidden)
            if self.conv is not None:
                image = nn.functional.relu(self.conv(image))
                image = self.batch_norm(image) if self.batch_norm is not None else image
                outputs.append(nn.functional.adaptive_avg_pool2d(nn.functional.max_pool2d(image, 2), 1).flatten(1))
            if self.rnn is not None:
                outputs.append(self.rnn(sequence)[0])
            return outputs

        def _attention(self, hidden: Any) -> Any:
            # The fused kernel and the explicit path (masked scores, float32 softmax, tanh GELU) models write out.
            heads = hidden.view(1, 8, 2, width // 2).transpose(1, 2)
            fused = nn.functional.scaled_dot_product_attention(heads, heads, heads, is_causal=True)
            scores = torch.matmul(heads, heads.transpose(-1, -2)) / math.sqrt(width // 2)
            causal = torch.tril(torch.ones(8, 8, dtype=torch.bool, device=hidden.device))
            scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
            weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(hidden.dtype)
            mixed = (fused + torch.matmul(weights, heads)).transpose(1, 2).reshape(1, 8, width)
            cubic = mixed + 0.044715 * torch.pow(mixed, 3.0)
            return 0.5 * mixed * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * cubic)) + nn.functional.gelu(mixed)

    generator = torch.Generator().manual_seed(0)
    inputs = (torch.randint(0, 64, (1, 8), generator=generator), torch.randn(1, 8, width, generator=generator),
              torch.randn(1, 3, 16, 16, generator=generator), torch.randn(1, 4, 16, generator=generator))
    return FirstUse().eval(), inputs


def first_use_extras(baseline: int, first_peak: int, warm_peak: int, warm_growth: int, weights: int
                     ) -> dict[str, int]:
    """From the tiny model's measurement (high-water marks over a baseline taken before its load): what its first
    forward added at its peak beyond its own weights and the warm forward's growth (its activations), and what
    stayed resident for the warm forward (which starts from it)."""
    return {"first_forward": max(0, first_peak - baseline - weights - warm_growth),
            "steady": max(0, warm_peak - baseline - weights - warm_growth)}


def build_first_use_artifact(job: dict[str, Any]) -> None:
    """In a fresh process: the tiny model with the recipe applied, saved as a plan saves a torch artifact."""
    import torch

    from planner.pruning import artifact_state
    from planner.recipes import Recipe, apply_recipe

    recipe = Recipe.from_json(job["recipe"])
    model, _inputs = first_use_model(tuple(job["families"]))
    model, _notes = apply_recipe(model, recipe)
    torch.save(artifact_state(model, recipe, None), job["artifact"])


def measure_first_use_here(job: dict[str, Any]) -> dict[str, int]:
    """In a fresh process, what planner.verify does: the imports, the weightless structure and the inputs, the
    baseline, then load the artifact and run it twice."""
    import torch

    from planner.artifact import load_weights_into
    from planner.pruning import unpack_artifact_state
    from planner.recipes import Recipe
    from planner.verify import (
        _proc_status_kib,
        measure_runs,
        private_resident_bytes,
        release_freed_memory,
        reset_peak,
        worker_imports,
    )

    worker_imports()
    recipe = Recipe.from_json(job["recipe"])
    with torch.device("meta"):
        model, _ = first_use_model(tuple(job["families"]))
    _, inputs = first_use_model(())
    inputs = tuple(t.to(recipe.torch_dtype) if t.is_floating_point() else t for t in inputs)
    release_freed_memory()
    reset_peak()
    baseline, private_baseline = _proc_status_kib("VmRSS"), private_resident_bytes()
    load_weights_into(model, unpack_artifact_state(model, torch.load(job["artifact"], weights_only=True)))
    model.eval()
    weights = private_resident_bytes() - private_baseline
    with torch.inference_mode():
        measured = measure_runs(lambda: model(*inputs))
    return first_use_extras(baseline, measured.first_peak, measured.warm_peak, measured.warm_growth, weights)


def measure_here(backend: str) -> int:
    """In this fresh process: the worker's imports (and nothing run), then the resident set."""
    from planner.verify import _proc_status_kib, release_freed_memory

    if backend == "torch":
        from planner.verify import worker_imports

        worker_imports()
    elif backend == "onnxruntime":
        import onnxruntime  # noqa: F401
    else:
        raise ValueError(f"unknown backend {backend!r}")
    release_freed_memory()
    return _proc_status_kib("VmRSS")


if __name__ == "__main__":
    from planner import quiet_library_noise

    quiet_library_noise()
    if sys.argv[1] == "first-use-build":  # python -m planner.baseline first-use-build JOB.json RESULT.json
        build_first_use_artifact(json.loads(Path(sys.argv[2]).read_text()))
    elif sys.argv[1] == "first-use":  # python -m planner.baseline first-use JOB.json RESULT.json
        figures = measure_first_use_here(json.loads(Path(sys.argv[2]).read_text()))
        Path(sys.argv[3]).write_text(json.dumps(figures))
    else:
        Path(sys.argv[2]).write_text(json.dumps({"rss_bytes": measure_here(sys.argv[1])}))
