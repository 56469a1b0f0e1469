"""A plan's private work directory, which records its owner process, and the removal of those whose owner died
(a planner killed with kill -9 along with its children). Standard library only: the supervisor and the planner
both use it, and the supervisor must start fast.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

WORKDIR_PREFIX = "planner-"
OWNER_FILE = "owner"


def _process_start_ticks(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat: with the pid, it names one process even after the pid is reused."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()[19]


def owner_record() -> str:
    pid = os.getpid()
    return f"{pid} {_process_start_ticks(pid)}"


def owner_alive(record: str) -> bool:
    try:
        pid_text, ticks = record.split()
        pid = int(pid_text)
    except ValueError:
        return True  # not ours to judge: leave it
    return _process_start_ticks(pid) == ticks


def make_workdir(root: Path | None = None) -> Path:
    """A private work directory that records its owner, so a later start can tell it was abandoned."""
    workdir = Path(tempfile.mkdtemp(prefix=WORKDIR_PREFIX, dir=root))
    (workdir / OWNER_FILE).write_text(owner_record())
    (workdir / "tmp").mkdir()
    return workdir


def remove_stale_workdirs(root: Path | None = None) -> list[Path]:
    """Work directories whose owner process is gone (a planner killed with kill -9 along with its
    children). Only directories with our owner file are touched, and only ours (same uid)."""
    removed = []
    base = Path(root or tempfile.gettempdir())
    try:
        candidates = list(base.glob(WORKDIR_PREFIX + "*"))
    except OSError:
        return removed
    for candidate in candidates:
        try:
            if candidate.is_symlink() or not candidate.is_dir() or candidate.stat().st_uid != os.getuid():
                continue
            record = (candidate / OWNER_FILE).read_text()
        except OSError:
            continue
        if not owner_alive(record):
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate)
    return removed
