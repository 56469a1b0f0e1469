"""Verification of one ONNX artifact in a fresh process: `python -m planner.onnx_verify JOB.json RESULT.json`.

The ONNX counterpart of planner.verify, with the same measurements and result keys so a row can show either:

1. imports onnxruntime, creates and runs a tiny session once (the runtime's global state, allocator and
   kernel registry belong to the baseline), loads the example inputs;
2. resets the resident-memory high-water mark (/proc/self/clear_refs) and takes the baseline;
3. creates an InferenceSession (CPUExecutionProvider, default options): resident weights = RSS after - baseline
   (this includes what ONNX Runtime keeps per session: optimized graph, pre-packed weights);
4. runs the inputs once, then resets the high-water mark and runs them again. ONNX Runtime's default CPU
   arena keeps the first run's activation memory, so the warm peak is taken from the baseline:
   verified runtime = warm peak - baseline, activations = runtime - weights;
5. times further runs (median) and only then imports torch to compare the floating outputs with the float32
   torch reference (planner.verify.compare_outputs), so torch is not in the measured process state.

The job is JSON: {"artifact": ".onnx path", "inputs": ".npz (input_0, input_1, ...) or torch.save'd tuple",
"reference": "torch.save'd list of float32 tensors"}. Run it with planner.verify.MEASUREMENT_ENV, as the parent
does for planner.verify, so freed blocks go back to the OS and the high-water mark means what was alive at once.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from planner.verify import (
    LATENCY_BUDGET_S,
    LATENCY_MAX_RUNS,
    MEASUREMENT_ENV,
    _json_safe,
    _proc_status_kib,
    compare_outputs,
    release_freed_memory,
    reset_peak,
)

FLOAT_ELEMENT_TYPES = ("tensor(float)", "tensor(float16)", "tensor(double)", "tensor(bfloat16)")


def save_inputs_npz(inputs: tuple[Any, ...], path: Path) -> None:
    """The example inputs as input_0, input_1, ... in an .npz, so the worker needs no torch to read them."""
    import numpy as np

    np.savez(path, **{f"input_{i}": tensor.detach().cpu().numpy() for i, tensor in enumerate(inputs)})


def make_job(artifact: Path, inputs: Path, reference: Path) -> dict[str, Any]:
    return {"artifact": str(artifact), "inputs": str(inputs), "reference": str(reference), "backend": "onnxruntime"}


def load_inputs(path: str) -> list[Any]:
    """Inputs as numpy arrays in positional order, from an .npz (preferred) or a torch.save'd tuple."""
    import numpy as np

    if path.endswith(".npz"):
        with np.load(path) as archive:
            return [archive[f"input_{i}"] for i in range(len(archive.files))]
    import torch  # a .pt input file needs torch; imported before the baseline, so it is not measured

    return [tensor.numpy() for tensor in torch.load(path, weights_only=True)]


def _warm_up(ort: Any) -> None:
    # The first session of a process creates ORT's environment (logging, thread pool factory, kernel registry):
    # a cost of the runtime, not of the model, so it belongs to the baseline.
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "warm_up",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 32])],
                              [helper.make_tensor("w", TensorProto.FLOAT, [64, 32], [0.0] * 64 * 32)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 10)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    session.run(None, {"x": np.ones((4, 64), dtype=np.float32)})
    del session, model, graph, onnx


def _feeds(session: Any, inputs: list[Any]) -> dict[str, Any]:
    names = [meta.name for meta in session.get_inputs()]
    if len(names) != len(inputs):
        raise RuntimeError(f"the ONNX graph takes {len(names)} input(s) but the job has {len(inputs)}")
    return dict(zip(names, inputs, strict=True))


def _floating(session: Any, outputs: list[Any]) -> list[Any]:
    # The graph's outputs in pytree order; integer ones are dropped, as planner.verify.floating_tensors does.
    return [value for value, meta in zip(outputs, session.get_outputs(), strict=True)
            if meta.type in FLOAT_ELEMENT_TYPES]


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    import onnxruntime as ort

    ort.set_default_logger_severity(3)  # constant-folding notices on stderr are not errors
    _warm_up(ort)
    inputs = load_inputs(job["inputs"])
    release_freed_memory()
    exact_peak = reset_peak()
    baseline = _proc_status_kib("VmRSS")

    started = time.perf_counter()
    session = ort.InferenceSession(job["artifact"], providers=["CPUExecutionProvider"])
    load_s = time.perf_counter() - started
    loaded = _proc_status_kib("VmRSS")
    load_peak = _proc_status_kib("VmHWM")
    feeds = _feeds(session, inputs)

    # First run: includes one-time lazy initialisation (kernel selection, arena growth).
    reset_peak()
    started = time.perf_counter()
    outputs = _floating(session, session.run(None, feeds))
    first_ms = (time.perf_counter() - started) * 1000
    first_peak = _proc_status_kib("VmHWM")
    # Second run from a reset high-water mark: the warm peak, arena included.
    release_freed_memory()
    reset_peak()
    started = time.perf_counter()
    session.run(None, feeds)
    latencies = [(time.perf_counter() - started) * 1000]
    warm_peak = _proc_status_kib("VmHWM")
    budget_end = time.perf_counter() + LATENCY_BUDGET_S
    while len(latencies) < LATENCY_MAX_RUNS and time.perf_counter() < budget_end and first_ms < 5000:
        started = time.perf_counter()
        session.run(None, feeds)
        latencies.append((time.perf_counter() - started) * 1000)

    weights = loaded - baseline
    runtime = max(warm_peak - baseline, weights)
    result: dict[str, Any] = {
        "verified_runtime_bytes": runtime,
        "verified_weight_resident_bytes": weights,
        "verified_activation_bytes": runtime - weights,
        "verified_first_run_extra_bytes": max(0, first_peak - warm_peak),
        # Creating the session holds the file's tensors and ORT's copies at once; reported, not ranked.
        "verified_load_peak_bytes": load_peak - baseline,
        "baseline_rss_bytes": baseline,
        "peak_is_exact": exact_peak,
        "load_s": load_s,
        "first_forward_ms": first_ms,
        "latency_ms": statistics.median(latencies),
        "latency_runs": len(latencies),
        "backend": "onnxruntime",
        "onnxruntime_version": ort.__version__,
        "providers": session.get_providers(),
    }
    del session
    import torch

    candidate = [torch.from_numpy(value).float() for value in outputs]
    reference = torch.load(job["reference"], weights_only=True)
    result.update(compare_outputs(reference, candidate))
    result["output_shapes"] = [list(t.shape) for t in candidate]
    return result


def verify_in_subprocess(job: dict[str, Any], job_path: Path, result_path: Path, timeout_s: float) -> dict[str, Any]:
    """Run the worker as planner.pipeline runs planner.verify; the parsed result, or {"error": ...}."""
    job_path.write_text(json.dumps(job))
    result_path.unlink(missing_ok=True)
    env = dict(os.environ, **MEASUREMENT_ENV)
    try:
        done = subprocess.run([sys.executable, "-m", "planner.onnx_verify", str(job_path), str(result_path)],
                              capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"TimeoutExpired: verification took over {timeout_s:.0f} s"}
    if not result_path.exists():
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        return {"error": lines[-1][:300] if lines else f"exit {done.returncode}"}
    result = json.loads(result_path.read_text())
    if isinstance(result.get("sqnr_db"), str):
        result["sqnr_db"] = float(result["sqnr_db"])
    return result


def main(argv: list[str]) -> int:
    from planner import quiet_library_noise

    quiet_library_noise()
    job_path, result_path = Path(argv[0]), Path(argv[1])
    job = json.loads(job_path.read_text())
    try:
        result = run_job(job)
    except Exception as error:  # reported as the row's reason; the parent decides what to show
        first_line = (str(error).strip().splitlines() or [""])[0][:300]
        result = {"error": f"{type(error).__name__}: {first_line}"}
    temporary = result_path.with_suffix(".tmp")
    temporary.write_text(json.dumps(_json_safe(result)))
    temporary.replace(result_path)
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

