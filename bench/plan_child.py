"""Child process of bench/run.py: `planner plan ARGS...` in-process, then its own peak RSS.

Usage: plan_child.py RESULT_JSON PLANNER_ARGS...  The result file gets the exit code and this process's peak
resident set size (RUSAGE_SELF: the planner process alone, without its verification workers).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path


def main() -> None:
    out, args = Path(sys.argv[1]), sys.argv[2:]
    started = time.perf_counter()
    from planner.cli.commands import main as planner_main

    code = planner_main(args)
    out.write_text(json.dumps({"rc": code, "seconds": time.perf_counter() - started,
                               "self_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


if __name__ == "__main__":
    main()
