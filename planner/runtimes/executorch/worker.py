"""Verification of one .pte in a fresh process: `python -m planner.runtimes.executorch.worker JOB.json RESULT.json`.

The ExecuTorch counterpart of planner.runtimes.torch_cpu.worker, with the same measurements and result keys:

1. imports the ExecuTorch Python runtime (`executorch.runtime.Runtime`, which imports torch: the binding takes
   torch tensors) and loads the example inputs; nothing runs before the baseline;
2. resets the resident-memory high-water mark and takes the baseline;
3. loads the program and its forward method: load peak = high-water mark - baseline. Loading the method is when
   XNNPACK packs the weights, so raw and packed copies coexist for a moment (about twice the weights);
4. runs the inputs once (first-forward peak), again (steady peak), then times further runs (median);
5. verified runtime = the lifetime peak, the largest of the three (planner.measure.library.lifetime_fields), and
   the outputs are compared with the float32 eager reference.

The job is JSON: {"artifact": ".pte path", "inputs": "torch.save'd tuple", "reference": "torch.save'd list of
float32 tensors", "dtype": the recipe's float dtype, which the program's floating inputs have}.
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
    measure_runs,
    proc_status_bytes,
    quality_fields,
    reset_peak,
    verified_fields,
)
from planner.measure.worker import worker_main


def import_framework() -> None:
    """What a worker imports before its baseline, for planner.runtimes.baseline."""
    from executorch.runtime import Runtime

    Runtime.get()


def first_tiny_forward(workdir: Path) -> int:
    """planner.runtimes.baseline's first-use figure: the first run of a process's first program (the tiny XNNPACK
    program planner.runtimes.executorch.lower.write_tiny_program wrote into `workdir`). Returns the resident bytes
    after loading it: loading is modelled on its own (XNNPACK packing), the first-use cost is what the run adds
    (its thread pool and workspace: 9.6 MB here)."""
    import torch
    from executorch.runtime import Runtime

    from planner.measure.library import proc_status_bytes, reset_peak

    method = Runtime.get().load_program(str(workdir / "tiny.pte")).load_method("forward")  # lower.TINY_PROGRAM
    loaded = proc_status_bytes("VmRSS")
    reset_peak()
    method.execute([torch.ones(4, 64)])
    return loaded


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    import torch
    from executorch.runtime import Runtime

    runtime = Runtime.get()
    dtype = getattr(torch, job.get("dtype", "float32"))
    inputs = [t.to(dtype) if t.is_floating_point() else t for t in torch.load(job["inputs"], weights_only=True)]
    gc.collect()  # no malloc_trim: the state a user's process is in after its imports
    exact_peak = reset_peak()
    baseline = proc_status_bytes("VmRSS")

    started = time.perf_counter()
    method = runtime.load_program(job["artifact"]).load_method("forward")
    load_s = time.perf_counter() - started
    loaded = proc_status_bytes("VmRSS")
    load_peak = proc_status_bytes("VmHWM")

    with tempfile.TemporaryDirectory() as folder:
        first_outputs = Path(folder) / "first-outputs.pt"

        def keep_first(output: list[Any]) -> None:
            torch.save([t for t in output if isinstance(t, torch.Tensor) and t.is_floating_point()], first_outputs)

        measured = measure_runs(lambda: method.execute(inputs), keep_first)
        outputs = [t.float() for t in torch.load(first_outputs, weights_only=True)]
    from importlib import metadata

    load = LoadMeasurement(baseline, load_peak, loaded - baseline, exact_peak, load_s)
    return {**verified_fields(load, measured), "backend": "executorch",
            "executorch_version": metadata.version("executorch"),
            **quality_fields(torch.load(job["reference"], weights_only=True), outputs)}


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:], run_job))
