"""Verification of one ONNX artifact in a fresh process:
`python -m planner.runtimes.onnxruntime.worker JOB.json RESULT.json`.

The ONNX counterpart of planner.runtimes.torch_cpu.worker, with the same measurements and result keys so a row
can show either:

1. imports onnxruntime and loads the example inputs; nothing runs before the baseline, so the runtime's first-use
   costs (its environment, thread pools, kernel registry) count for the model, as in a user's process;
2. resets the resident-memory high-water mark (/proc/self/clear_refs) and takes the baseline;
3. creates an InferenceSession (CPUExecutionProvider, default options): load peak = high-water mark - baseline
   (the file's tensors and ORT's copies at once); resident weights = RSS after - baseline (this includes what
   ONNX Runtime keeps per session: optimized graph, pre-packed weights);
4. runs the inputs once (first-forward peak), then again (steady peak), then times further runs (median); ORT's
   default CPU arena keeps the first run's activation memory, so activations = steady peak - weights;
5. verified runtime = the lifetime peak, the largest of the three (planner.measure.library.lifetime_fields); only then
   imports torch to compare the floating outputs with the float32 torch reference
   (planner.measure.library.compare_outputs), so torch is not in the measured process state.

The job is JSON: {"artifact": ".onnx path", "inputs": ".npz (input_0, input_1, ...) or torch.save'd tuple",
"reference": "torch.save'd list of float32 tensors"}. It runs with glibc's default allocator settings, as a
user's process does.
"""

from __future__ import annotations

import functools
import gc
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from planner.measure.library import (
    LoadMeasurement,
    measure_runs,
    proc_status_bytes,
    quality_fields,
    reset_peak,
    verified_fields,
)
from planner.measure.worker import worker_main

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


def warm_up(ort: Any) -> None:
    # The first session of a process creates ORT's environment (logging, thread pool factory, kernel registry):
    # planner.runtimes.baseline's first-use figure for this runtime.
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


def import_framework() -> None:
    """What a worker imports before its baseline, for planner.runtimes.baseline."""
    import onnxruntime  # noqa: F401


def first_tiny_forward() -> None:
    """planner.runtimes.baseline's first-use figure: the first session and run of a process."""
    import onnxruntime

    warm_up(onnxruntime)


def _feeds(session: Any, inputs: list[Any]) -> dict[str, Any]:
    names = [meta.name for meta in session.get_inputs()]
    if len(names) != len(inputs):
        raise RuntimeError(f"the ONNX graph takes {len(names)} input(s) but the job has {len(inputs)}")
    return dict(zip(names, inputs, strict=True))


def _floating(session: Any, outputs: list[Any]) -> list[Any]:
    # The graph's outputs in pytree order; integer ones are dropped, as planner.measure.library.floating_tensors does.
    return [value for value, meta in zip(outputs, session.get_outputs(), strict=True)
            if meta.type in FLOAT_ELEMENT_TYPES]


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import onnxruntime as ort

    ort.set_default_logger_severity(3)  # constant-folding notices on stderr are not errors
    inputs = load_inputs(job["inputs"])
    gc.collect()  # no malloc_trim: the state a user's process is in after its imports
    exact_peak = reset_peak()
    baseline = proc_status_bytes("VmRSS")

    started = time.perf_counter()
    session = ort.InferenceSession(job["artifact"], providers=["CPUExecutionProvider"])
    load_s = time.perf_counter() - started
    loaded = proc_status_bytes("VmRSS")
    load_peak = proc_status_bytes("VmHWM")
    feeds = _feeds(session, inputs)

    # The first outputs wait on disk (the worker's TMPDIR, under the plan's work directory) during the later runs.
    with tempfile.TemporaryDirectory() as folder:
        first_outputs = Path(folder) / "first-outputs.npz"
        floating_outputs = functools.partial(_floating, session)

        def keep_first(output: list[Any]) -> None:
            np.savez(first_outputs, *floating_outputs(output))

        measured = measure_runs(functools.partial(session.run, None, feeds), keep_first)
        with np.load(first_outputs) as saved:
            outputs = [saved[f"arr_{index}"] for index in range(len(saved.files))]
    # Creating the session holds the file's tensors and ORT's copies at once: part of the lifetime peak.
    load = LoadMeasurement(baseline, load_peak, loaded - baseline, exact_peak, load_s)
    result: dict[str, Any] = {**verified_fields(load, measured), "backend": "onnxruntime",
                              "onnxruntime_version": ort.__version__, "providers": session.get_providers()}
    del session
    import torch

    candidate = [torch.from_numpy(value).float() for value in outputs]
    return {**result, **quality_fields(torch.load(job["reference"], weights_only=True), candidate)}


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:], run_job))
