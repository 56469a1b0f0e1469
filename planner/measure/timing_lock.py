"""Timed runs alone on the machine while other jobs run: a machine-wide readers-writer lock over files.

When an executor runs several rows at once (planner.plan.executors), their workers share the CPU. Peak memory of
one process is its own (VmHWM), but a forward timed while a neighbour imports torch or quantizes a layer is slower
than it would be alone, so latencies would depend on the schedule. Every worker therefore holds the lock
*shared* for its whole life (taken by its parent before it starts: imports count), and a measuring worker converts
to *exclusive* around its runs (planner.measure.library.measure_runs: the first forward, the second, the timed
loop): they start once every other worker running then has finished, and no new worker starts until they end.
Loading, imports and builds overlap; forwards and timing never do. A plan run one job at a time sets no lock.

Writers cannot starve: a turnstile file is taken before either kind of lock, so a worker waiting to time blocks
new workers from starting. A writer gives up its shared lock before taking the turnstile (two writers each
holding one could otherwise wait on each other forever). The lock is fcntl.flock on files in a node-local folder:
a Ray cluster times each node's runs alone on that node.

A timing worker waits at most PLANNER_TIMING_WAIT_S for the machine; past that it times anyway and its result
says so (`latency_shared`), rather than running into its --timeout.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no lock; jobs then run one at a time (planner.plan.executors)
    fcntl = None  # type: ignore[assignment]

LOCK_ENV = "PLANNER_TIMING_LOCK"  # the lock file's path; set by an executor that runs jobs at once
FD_ENV = "PLANNER_TIMING_FD"  # in a worker: the inherited descriptor that holds its shared lock
WAIT_ENV = "PLANNER_TIMING_WAIT_S"  # how long a worker waits for the machine before timing anyway
POLL_S = 0.05


def enabled() -> bool:
    return fcntl is not None and bool(os.environ.get(LOCK_ENV))


def _turnstile(path: str) -> int:
    return os.open(f"{path}.turnstile", os.O_RDWR | os.O_CREAT, 0o600)


def hold_shared(path: str) -> int:
    """A descriptor holding the shared lock on `path` (blocking while a worker times its runs); the caller passes
    it to the worker it starts and closes its own copy. The turnstile first: a waiting writer goes before."""
    assert fcntl is not None
    turnstile = _turnstile(path)
    try:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(descriptor, fcntl.LOCK_SH)
    finally:
        os.close(turnstile)  # closing releases the turnstile
    return descriptor


@contextlib.contextmanager
def shared_for_child(env: dict[str, str]) -> Iterator[tuple[int, ...]]:
    """Around starting a worker: the shared lock, held by the descriptor the worker inherits (its number in
    FD_ENV of `env`, which this updates). Yields the descriptors to pass; nothing when no lock is set."""
    path = env.get(LOCK_ENV)
    if fcntl is None or not path:
        yield ()
        return
    descriptor = hold_shared(path)
    env[FD_ENV] = str(descriptor)
    try:
        yield (descriptor,)
    finally:
        os.close(descriptor)  # the worker's inherited copy keeps the lock until it exits


def hold_shared_here() -> None:
    """In a worker started without an inherited lock (from the fork server): take the shared lock now, for the
    rest of the process's life."""
    path = os.environ.get(LOCK_ENV)
    if fcntl is None or not path or os.environ.get(FD_ENV):
        return
    os.environ[FD_ENV] = str(hold_shared(path))


def wait_for_exclusive(descriptor: int, path: str, wait_s: float) -> bool:
    """Convert this worker's shared lock to exclusive, waiting at most wait_s; False: not alone (still shared)."""
    assert fcntl is not None
    fcntl.flock(descriptor, fcntl.LOCK_UN)  # a writer holding a shared lock would deadlock with another writer
    deadline = time.monotonic() + wait_s
    turnstile = _turnstile(path)
    try:
        if not _poll_lock(turnstile, fcntl.LOCK_EX, deadline):
            fcntl.flock(descriptor, fcntl.LOCK_SH)
            return False
        if _poll_lock(descriptor, fcntl.LOCK_EX, deadline):
            return True
        fcntl.flock(descriptor, fcntl.LOCK_SH)  # holding the turnstile: no writer can be waiting for it
        return False
    finally:
        os.close(turnstile)


def _poll_lock(descriptor: int, kind: int, deadline: float) -> bool:
    assert fcntl is not None
    while True:
        try:
            fcntl.flock(descriptor, kind | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(POLL_S)


@contextlib.contextmanager
def runs_alone() -> Iterator[bool]:
    """In a measuring worker, around its forwards and timed runs: exclusive while they run. Yields whether they
    run alone (True also when no lock is set: the plan runs one job at a time)."""
    descriptor, path = os.environ.get(FD_ENV), os.environ.get(LOCK_ENV)
    if fcntl is None or not descriptor or not path:
        yield True
        return
    alone = wait_for_exclusive(int(descriptor), path, float(os.environ.get(WAIT_ENV, "600")))
    try:
        yield alone
    finally:
        if alone:
            fcntl.flock(int(descriptor), fcntl.LOCK_SH)  # back to shared for the rest of the worker's life


def lock_path(folder: Path, plan_id: str) -> str:
    """The lock file of one plan's jobs in a node-local folder."""
    return str(folder / f"planner-timing-{plan_id}.lock")
