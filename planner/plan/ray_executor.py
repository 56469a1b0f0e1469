"""--executor ray: a plan's row jobs as Ray tasks (Ray is an optional extra: pip install 'planner[ray]').

The cluster is --ray-address, else RAY_ADDRESS; with neither, a private instance on this machine
(address="local": never someone else's through /tmp/ray/ray_current_cluster), with an explicit object store (the
default, 30% of memory, fails under a memory cap), no dashboard and token authentication off (it would write
~/.ray/auth_token), shut down at the end. ray.init costs 6-8 s and about 620 MB over 9 processes here.

Each job is one task: `num_cpus=1`, and `memory=` its predicted peak (planner.plan.schedule), which Ray uses only to
schedule (it enforces nothing: the job's isolated processes keep their own --memory-cap). Inside the task the same
isolated build and measuring processes run as on the local executor, so a recipe that crashes costs its row only;
a task that dies (Ray's out-of-memory killer) is a failed row too. Artifacts go through the plan's work directory,
which every node must see: on a multi-node cluster put it on shared storage (TMPDIR, under which the planner makes
it). A task that cannot see it stops the plan with one line. Each node's measuring workers time their runs alone
on that node (planner.measure.timing_lock, in the node's temporary folder).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from planner.core.errors import PlannerError
from planner.measure import timing_lock
from planner.measure.isolation import STAGE_FILE_ENV, jobs_running
from planner.plan.executor_base import RAY_INSTALL, TIMING_WAIT_SHARE, Executor, Progress, running_words
from planner.plan.jobs import RowJob, RowOutcome, missing_shared_files, run_job

OBJECT_STORE_BYTES = 256 * 1024**2  # jobs pass paths and small dicts; artifacts go through the work directory
# Ray's session folders hold Unix sockets (at most 107 bytes of path; the session's own part takes about 65): a
# deeper TMPDIR than this gets its folder in /tmp instead.
RAY_TEMP_MAX_CHARS = 28
POLL_S = 1.0
# A job is a build, a measurement and --eval, each under --timeout: the supervisor waits that long for a task.
WORKERS_PER_JOB = 3


class WorkdirNotVisible(Exception):
    pass


THREAD_ENV = ("OMP_NUM_THREADS",)  # Ray sets it to the task's num_cpus; the workers keep the planner's


def run_in_task(job: RowJob, thread_env: dict[str, str]) -> RowOutcome:
    """The body of one Ray task (on any node): the job, as the local executor runs it, its workers with the
    planner's thread settings (a forward on 1 thread would be timed, and hold memory, unlike the local rows)."""
    for key in THREAD_ENV:
        os.environ.pop(key, None)
    os.environ.update(thread_env)
    missing = missing_shared_files(job.workdir)
    if missing:
        raise WorkdirNotVisible(f"{job.workdir} lacks {', '.join(missing)} on {os.uname().nodename}")
    # A private instance inherits the supervised planner's environment: the stage file is the planner's own.
    os.environ.pop(STAGE_FILE_ENV, None)
    timeout_s = float(job.options.get("timeout_s", 900.0))
    os.environ[timing_lock.LOCK_ENV] = timing_lock.lock_path(Path(tempfile.gettempdir()), Path(job.workdir).name)
    os.environ[timing_lock.WAIT_ENV] = str(timeout_s * TIMING_WAIT_SHARE)
    return run_job(job)


def task_failure_note(error: BaseException) -> str:
    """A task that raised or died: the row's reason, one line."""
    cause = getattr(error, "cause", None) or error
    text = (str(cause).strip().splitlines() or [type(cause).__name__])[-1][:300]
    return f"the Ray task failed: {type(cause).__name__}: {text}"


class RayExecutor(Executor):
    def __init__(self, address: str | None, jobs: int | None, memory_cap_bytes: int | None, workdir: Path) -> None:
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self.jobs = jobs
        self.memory_cap_bytes = memory_cap_bytes
        self.workdir = workdir
        self.started_here = False
        self.temp_dir: Path | None = None
        self.ray: Any = None

    def _connect(self) -> None:
        try:
            import ray
        except ImportError:
            raise PlannerError(f"--executor ray needs Ray, which is not installed here: {RAY_INSTALL}") from None
        self.ray = ray
        try:
            if self.address:
                ray.init(address=self.address, log_to_driver=False, configure_logging=False)
                return
            os.environ["RAY_AUTH_MODE"] = "disabled"  # else Ray writes a token under ~/.ray
            self.temp_dir = self._short_temp_dir()
            ray.init(address="local", num_cpus=os.cpu_count() or 1, object_store_memory=OBJECT_STORE_BYTES,
                     include_dashboard=False, log_to_driver=False, configure_logging=False,
                     _temp_dir=str(self.temp_dir), **({"_memory": self.memory_cap_bytes}
                                                       if self.memory_cap_bytes else {}))
            self.started_here = True
        except (ConnectionError, RuntimeError, ValueError, OSError) as error:
            where = self.address or "a private local instance"
            raise PlannerError(f"--executor ray: could not start or reach Ray ({where}): "
                               f"{(str(error).strip().splitlines() or [''])[0][:200]}") from None

    @staticmethod
    def _short_temp_dir() -> Path:
        root = Path(tempfile.gettempdir())
        if len(str(root)) > RAY_TEMP_MAX_CHARS:
            root = Path("/tmp")
        return Path(tempfile.mkdtemp(prefix="ray", dir=root))

    def _largest_node_memory(self) -> int | None:
        sizes = [node.get("Resources", {}).get("memory") for node in self.ray.nodes() if node.get("Alive")]
        sizes = [int(size) for size in sizes if size]
        return max(sizes) if sizes else None

    def run(self, jobs: list[RowJob], progress: Progress) -> list[RowOutcome]:
        if not jobs:
            return []
        if self.ray is None:
            progress("starting Ray" if not self.address else f"connecting to Ray at {self.address}", 0)
            self._connect()
        ray = self.ray
        largest = self._largest_node_memory()
        task = ray.remote(run_in_task)
        thread_env = {key: os.environ[key] for key in THREAD_ENV if key in os.environ}
        limit = self.jobs or len(jobs)
        timeout_s = float(jobs[0].options.get("timeout_s", 900.0)) * WORKERS_PER_JOB
        outcomes: list[RowOutcome | None] = [None] * len(jobs)
        pending, running = list(range(len(jobs))), {}
        shown: tuple[int, int] | None = None
        with jobs_running(timeout_s):
            while pending or running:
                while pending and len(running) < limit:
                    index = pending.pop(0)
                    # memory= only schedules; more than any node has would never be scheduled
                    memory = min(jobs[index].predicted_bytes, largest) if largest else jobs[index].predicted_bytes
                    running[task.options(num_cpus=1, memory=memory, max_retries=0).remote(
                        jobs[index], thread_env)] = index
                # On a change only: each progress call restarts the supervisor's clock for the jobs.
                if (state := (len(pending), len(running))) != shown:
                    progress(running_words(jobs, sorted(running.values())), len(jobs) - len(pending) - len(running))
                    shown = state
                ready, _ = ray.wait(list(running), num_returns=1, timeout=POLL_S)
                for reference in ready:
                    index = running.pop(reference)
                    outcomes[index] = self._outcome(reference, jobs[index])
        return [outcome for outcome in outcomes if outcome is not None]

    def _outcome(self, reference: Any, job: RowJob) -> RowOutcome:
        try:
            return self.ray.get(reference)
        except Exception as error:
            cause = getattr(error, "cause", None)
            if isinstance(cause, WorkdirNotVisible) or "WorkdirNotVisible" in str(error):
                raise PlannerError(f"--executor ray: a task cannot see the plan's work directory ({cause or error}); "
                                   "on a multi-node cluster set TMPDIR to a folder every node mounts") from None
            return RowOutcome({"status": "failed", "note": task_failure_note(error)})

    def close(self) -> None:
        if self.ray is not None:  # stops a private instance's processes; leaves a cluster it joined running
            self.ray.shutdown()
            self.ray = None
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
