"""Running one verification in its own process, under a wall-clock timeout and a resident-memory cap.

A recipe that crashes, exhausts memory or hangs must cost only its own row. The child's resident memory
is polled from /proc (a cap on address space would also count the gigabytes of virtual memory torch
reserves without touching); past the cap the child is killed and the row says so. Any exception in the
parent, Ctrl-C included, kills the child before it propagates.

Workers that import torch anyway start from a fork server that has imported torch and torchao once
(multiprocessing's forkserver with a preload list): each is still a new process that loads its artifact
from disk, but it skips the 3-5 s of imports, a third of a small model's verification. The fork server
runs no torch op before forking, so no thread pool is inherited; it is started with the measurement
environment, so its children allocate as a freshly started worker does.
"""

from __future__ import annotations

import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

POLL_S = 0.02


@dataclass
class Outcome:
    returncode: int | None
    stderr: str
    failure: str | None  # why the run was stopped by us, if it was
    peak_rss_bytes: int


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where there is no such file)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def default_memory_cap() -> int | None:
    """Nine tenths of what the machine can give now: the planner itself keeps the rest."""
    available = available_memory_bytes()
    return int(available * 0.9) if available else None


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_isolated(argv: list[str], *, timeout_s: float, memory_cap_bytes: int | None,
                 env: dict[str, str]) -> Outcome:
    with tempfile.TemporaryFile(mode="w+") as stderr:
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=stderr, env=env)

        def stop() -> None:
            process.kill()
            process.wait()

        failure, peak = _supervise(process.pid, process.poll, stop, timeout_s, memory_cap_bytes)
        stderr.seek(0)
        return Outcome(process.returncode, stderr.read(), failure, peak)


FORKSERVER_PRELOAD = ["planner.preload"]
# Workers started from the fork server. Not planner.onnx_verify: an ONNX Runtime measurement has no torch in it.
PRELOADED_WORKERS = frozenset({"planner.verify", "planner.onnx_backend"})
_forkserver: Any = None


def run_module_isolated(module: str, args: list[str], *, timeout_s: float, memory_cap_bytes: int | None,
                        env: dict[str, str]) -> Outcome:
    """`python -m MODULE ARGS` under run_isolated's limits; from the fork server where MODULE allows it."""
    if (module not in PRELOADED_WORKERS or "forkserver" not in multiprocessing.get_all_start_methods()
            or os.environ.get("PLANNER_NO_FORKSERVER")):  # the plain way, e.g. to compare the two
        return run_isolated([sys.executable, "-m", module, *args], timeout_s=timeout_s,
                            memory_cap_bytes=memory_cap_bytes, env=env)
    with tempfile.NamedTemporaryFile(mode="w+", prefix="planner-stderr-") as stderr:
        process = _forkserver_context(env).Process(target=_run_module, args=(module, args, stderr.name, env))
        process.start()

        def stop() -> None:
            process.kill()
            process.join()

        def poll() -> int | None:
            return process.exitcode

        failure, peak = _supervise(process.pid, poll, stop, timeout_s, memory_cap_bytes)
        process.join()
        stderr.seek(0)
        return Outcome(process.exitcode, stderr.read(), failure, peak)


def _forkserver_context(env: dict[str, str]) -> Any:
    """The fork server, started once per planner process with `env` (malloc settings are read at start)."""
    global _forkserver
    if _forkserver is None:
        from multiprocessing import forkserver

        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(FORKSERVER_PRELOAD)
        saved = dict(os.environ)
        os.environ.update(env)
        try:
            forkserver.ensure_running()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        _forkserver = context
    return _forkserver


def _run_module(module: str, args: list[str], stderr_path: str, env: dict[str, str]) -> None:
    """In the forked child: what `python -m module args` would do, stderr to the parent's file."""
    os.environ.clear()
    os.environ.update(env)
    os.dup2(os.open(stderr_path, os.O_WRONLY | os.O_TRUNC), 2)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def _supervise(pid: int, poll: Callable[[], int | None], stop: Callable[[], None], timeout_s: float,
               memory_cap_bytes: int | None) -> tuple[str | None, int]:
    """Poll the child's resident memory until it exits; stop it past the cap or the deadline, or when the
    parent is interrupted. Returns (why it was stopped, or None; its peak resident bytes)."""
    failure = None
    peak = 0
    deadline = time.monotonic() + timeout_s
    try:
        while poll() is None:
            rss = _rss_bytes(pid)
            peak = max(peak, rss)
            if memory_cap_bytes is not None and rss > memory_cap_bytes:
                failure = f"exceeded the memory cap of {memory_cap_bytes / 1e6:,.0f} MB (--memory-cap)"
            elif time.monotonic() > deadline:
                failure = f"timed out after {timeout_s:.0f} s (--timeout)"
            if failure:
                stop()
                break
            time.sleep(POLL_S)
    except BaseException:
        stop()
        raise
    return failure, peak


def describe_exit(outcome: Outcome) -> str:
    """One line on why a child failed: our own stop, a signal, or the last line it printed."""
    if outcome.failure:
        return outcome.failure
    code = outcome.returncode or 0
    if code < 0:
        reason = f"killed by signal {-code}"
        return reason + " (the system ran out of memory?)" if code == -9 else reason
    lines = [line for line in outcome.stderr.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else f"exit status {code}"
