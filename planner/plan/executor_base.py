"""What every executor (planner.plan.executors, planner.plan.ray_executor) is and shares."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

from planner.plan.jobs import RowJob, RowOutcome

RAY_INSTALL = "pip install 'planner[ray]' (ray==2.60.0)"
# A measuring worker waits at most this share of --timeout for the machine before it times its runs anyway.
TIMING_WAIT_SHARE = 0.5

Progress = Callable[[str, int], None]  # (message, jobs done)


class Executor(ABC):
    @abstractmethod
    def run(self, jobs: list[RowJob], progress: Progress) -> list[RowOutcome]:
        """Every job's outcome, in the jobs' order."""

    def close(self) -> None:
        """Give back what the executor started (a Ray instance)."""
        return None


def running_words(jobs: list[RowJob], running: list[int]) -> str:
    """The progress bar's words while several jobs run."""
    if len(running) == 1:
        return jobs[running[0]].label
    return f"{len(running)} rows at once: " + "; ".join(jobs[index].label for index in running)
