"""Executors: where and how many of a plan's row jobs (planner.plan.jobs) run at once.

- `LocalExecutor` (the default): jobs run on this machine, up to --jobs at once (default: schedule.default_jobs of
  the cores), each started only while the sum of the running jobs' predicted peaks stays under --memory-cap
  (schedule.next_admissible). A job is a thread of the planner that waits on the job's isolated processes; the
  planner itself does no heavy work, so threads are enough.
- `planner.plan.ray_executor.RayExecutor` (--executor ray): the same jobs as Ray tasks on a cluster.

Whatever the executor, rows come back in the plan's order with the same content as one at a time: the same
builds and the same measuring workers run, and peak memory is each process's own. Latency is not: a forward timed
while a neighbour imports torch is slower. Running jobs at once therefore sets a machine-wide timing lock
(planner.measure.timing_lock): every worker holds it shared, and a measuring worker's forwards and timed runs hold
it exclusively, so they run alone on the machine.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from planner.core.errors import PlannerError
from planner.measure import timing_lock
from planner.measure.isolation import start_forkserver
from planner.plan.executor_base import RAY_INSTALL, TIMING_WAIT_SHARE, Executor, Progress, running_words
from planner.plan.jobs import RowJob, RowOutcome, run_job
from planner.plan.schedule import default_jobs, next_admissible

EXECUTORS = ("local", "ray")
POLL_S = 0.5


@dataclass(frozen=True)
class ExecutorOptions:
    kind: str = "local"  # EXECUTORS
    jobs: int | None = None  # at most this many jobs at once; None: what the cores allow (local), the cluster (ray)
    ray_address: str | None = None  # --ray-address; else RAY_ADDRESS; else a private local Ray instance


def check_executor(options: ExecutorOptions) -> None:
    """Bad --executor, --jobs or --ray-address: one line (exit 2), before any work."""
    if options.kind not in EXECUTORS:
        raise PlannerError(f"--executor {options.kind!r}: use {' or '.join(EXECUTORS)}")
    if options.jobs is not None and options.jobs < 1:
        raise PlannerError(f"--jobs {options.jobs}: give how many rows may be verified at once, at least 1")
    if options.ray_address is not None and options.kind != "ray":
        raise PlannerError("--ray-address is the cluster of --executor ray: add --executor ray, or drop it")
    if options.kind == "ray":
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise PlannerError(f"--executor ray needs Ray, which is not installed here: {RAY_INSTALL}")


class LocalExecutor(Executor):
    def __init__(self, jobs: int | None, memory_cap_bytes: int | None, workdir: Path) -> None:
        self.jobs = jobs or default_jobs(os.cpu_count())
        self.memory_cap_bytes = memory_cap_bytes
        self.workdir = workdir

    def run(self, jobs: list[RowJob], progress: Progress) -> list[RowOutcome]:
        if self.jobs == 1 or len(jobs) <= 1:  # one at a time: no threads, no lock, as a plain loop
            outcomes = []
            for done, job in enumerate(jobs):
                progress(job.label, done)
                outcomes.append(run_job(job, lambda message, done=done: progress(message, done)))
            return outcomes
        with timing_lock_set(self.workdir, jobs):
            start_forkserver(self.workdir)  # before the threads: its start swaps the environment for a moment
            return self._run_at_once(jobs, progress)

    def _run_at_once(self, jobs: list[RowJob], progress: Progress) -> list[RowOutcome]:
        outcomes: list[RowOutcome | None] = [None] * len(jobs)
        pending = list(range(len(jobs)))
        running: list[int] = []
        finished: queue.Queue[tuple[int, RowOutcome | None, BaseException | None]] = queue.Queue()

        def work(index: int) -> None:
            try:
                finished.put((index, run_job(jobs[index]), None))
            except BaseException as error:  # re-raised by the planner's thread
                finished.put((index, None, error))

        while pending or running:
            while (choice := next_admissible([jobs[index].predicted_bytes for index in pending],
                                             [jobs[index].predicted_bytes for index in running],
                                             self.memory_cap_bytes, self.jobs)) is not None:
                index = pending.pop(choice)
                running.append(index)
                # A daemon thread: on an error or Ctrl-C the planner exits, and its workers die with it.
                threading.Thread(target=work, args=(index,), name=f"planner-job-{index}", daemon=True).start()
                progress(running_words(jobs, running), len(jobs) - len(pending) - len(running))
            try:
                index, outcome, error = finished.get(timeout=POLL_S)
            except queue.Empty:
                continue
            running.remove(index)
            if error is not None:
                raise error
            outcomes[index] = outcome
            if running:
                progress(running_words(jobs, running), len(jobs) - len(pending) - len(running))
        return [outcome for outcome in outcomes if outcome is not None]


@contextlib.contextmanager
def timing_lock_set(folder: Path, jobs: list[RowJob]) -> Iterator[None]:
    """This plan's timing lock in `folder` (node-local), in the environment every worker inherits, while jobs run
    at once."""
    timeout_s = float(jobs[0].options.get("timeout_s", 900.0)) if jobs else 900.0
    saved = {key: os.environ.get(key) for key in (timing_lock.LOCK_ENV, timing_lock.WAIT_ENV)}
    os.environ[timing_lock.LOCK_ENV] = timing_lock.lock_path(folder, folder.name)
    os.environ[timing_lock.WAIT_ENV] = str(timeout_s * TIMING_WAIT_SHARE)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def create_executor(options: ExecutorOptions, memory_cap_bytes: int | None, workdir: Path) -> Executor:
    if options.kind == "ray":
        from planner.plan.ray_executor import RayExecutor

        return RayExecutor(options.ray_address, options.jobs, memory_cap_bytes, workdir)
    return LocalExecutor(options.jobs, memory_cap_bytes, workdir)
