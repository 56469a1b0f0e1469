"""Running one verification in its own process, under a wall-clock timeout and a resident-memory cap.

A recipe that crashes, exhausts memory or hangs must cost only its own row. The child's resident memory
is polled from /proc (a cap on address space would also count the gigabytes of virtual memory torch
reserves without touching); past the cap the child is killed and the row says so. Any exception in the
parent, Ctrl-C included, kills the child before it propagates.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from dataclasses import dataclass

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
        failure = None
        peak = 0
        deadline = time.monotonic() + timeout_s
        try:
            while process.poll() is None:
                rss = _rss_bytes(process.pid)
                peak = max(peak, rss)
                if memory_cap_bytes is not None and rss > memory_cap_bytes:
                    failure = f"exceeded the memory cap of {memory_cap_bytes / 1e6:,.0f} MB (--memory-cap)"
                elif time.monotonic() > deadline:
                    failure = f"timed out after {timeout_s:.0f} s (--timeout)"
                if failure:
                    process.kill()
                    process.wait()
                    break
                time.sleep(POLL_S)
        except BaseException:
            process.kill()
            process.wait()
            raise
        stderr.seek(0)
        return Outcome(process.returncode, stderr.read(), failure, peak)


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
