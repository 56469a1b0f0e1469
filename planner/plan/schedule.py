"""Scheduling a plan's row jobs: how much memory each is predicted to need, how many may run at once, and which
may start now. Pure arithmetic over plain numbers (planner.plan.executors applies it).

A job is one row's build and verification, run one after the other in isolated processes. Its predicted peak is
the larger of the two, each with the runtime's own process (the framework baseline measured once per machine):
- verifying: the row's analytic runtime figure, which is that process's model peak; for a runtime whose memory
  is not modelled (ONNX Runtime) UNMODELLED_FACTOR times its analytic file, else the float32 reference's;
- building: BUILD_FACTOR times the float32 reference's verified runtime (every build reads the reference and
  writes the recipe's copy; torchao's int8 quantization of ComplexNet's 2.1 GB layer holds about two float32
  copies of it besides the reference: a 6.8 GB process).
Jobs start while the sum of the running jobs' predictions stays under --memory-cap; one job alone always runs
(its processes are still held to the cap one by one, as in a serial plan).
"""

from __future__ import annotations

from collections.abc import Sequence

BUILD_FACTOR = 3
UNMODELLED_FACTOR = 3  # ONNX Runtime held up to 2.6x its file (GPT-2 int4: 537 MB for a 203 MB file)
DEFAULT_FRAMEWORK_BYTES = 500 * 1000**2  # a runtime whose baseline is unknown: about ExecuTorch's binding (430 MB)
# Below this many cores, rows verify one at a time by default: every worker's torch already uses all the cores
# for its forwards, so on 2 cores two jobs at once only overlap their imports and loads (docs/executors.md has
# the measurement behind it).
MIN_CORES_FOR_PARALLEL = 4
MAX_DEFAULT_JOBS = 4


def predicted_job_bytes(analytic_runtime: int | None, analytic_disk: int | None, reference_runtime: int | None,
                        framework: int | None) -> int:
    """The predicted peak of one row's job, in bytes (see the module's docstring)."""
    reference = reference_runtime or 0
    if analytic_runtime is not None:
        verifying = analytic_runtime
    elif analytic_disk is not None:
        verifying = UNMODELLED_FACTOR * analytic_disk
    else:
        verifying = reference
    return (DEFAULT_FRAMEWORK_BYTES if framework is None else framework) + max(verifying, BUILD_FACTOR * reference)


def default_jobs(cores: int | None) -> int:
    """How many jobs run at once when --jobs is not given: one below MIN_CORES_FOR_PARALLEL cores, else one per
    two cores (a forward uses several), at most MAX_DEFAULT_JOBS."""
    if not cores or cores < MIN_CORES_FOR_PARALLEL:
        return 1
    return min(MAX_DEFAULT_JOBS, cores // 2)


def next_admissible(pending: Sequence[int], running: Sequence[int], memory_cap: int | None, max_jobs: int
                    ) -> int | None:
    """The index in `pending` (predicted bytes of the jobs waiting, in row order) of the first job that may start
    beside `running` (the predictions of the jobs running), or None: at most max_jobs at once, and the sum of the
    predictions under memory_cap. A job too big to fit beside others starts once it would run alone, and smaller
    jobs after it may start first meanwhile (every job ends, so it waits only for those running)."""
    if not pending or len(running) >= max_jobs:
        return None
    if not running:
        return 0
    if memory_cap is None:
        return 0
    room = memory_cap - sum(running)
    return next((index for index, predicted in enumerate(pending) if predicted <= room), None)
