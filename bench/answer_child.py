"""Child process of bench/answer_time.py: `planner plan ARGS...` in-process; when the analytic table was printed,
when the plan ended, and this process's peak RSS (the planner alone, without its verification workers).

Usage: answer_child.py RESULT_JSON PLANNER_ARGS...
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
    from planner import report
    from planner.cli.commands import main as planner_main

    seen: dict[str, float] = {}
    print_estimates = report.print_estimates

    def timed(*call_args: object, **kwargs: object) -> None:
        print_estimates(*call_args, **kwargs)
        seen.setdefault("analytic_table_s", time.perf_counter() - started)

    report.print_estimates = timed  # the CLI looks it up on the module when it prints
    code = planner_main(args)
    out.write_text(json.dumps({"rc": code, "seconds": time.perf_counter() - started, **seen,
                               "self_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


if __name__ == "__main__":
    main()
