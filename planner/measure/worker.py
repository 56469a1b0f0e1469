"""The worker protocol, child side: `python -m planner.WORKER JOB.json RESULT.json` reads a JSON job, runs it and
writes a JSON result atomically. The parent side (start it isolated, read the result) is
planner.measure.isolation.run_worker.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from planner import quiet_library_noise


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "inf" / "-inf" / "nan": strict JSON has no infinities
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    return value


def worker_main(argv: list[str], run: Callable[[dict[str, Any]], dict[str, Any]]) -> int:
    """`python -m planner.WORKER JOB.json RESULT.json`: run the job, write the result atomically.
    A failure is a result too ({"error": "Type: first line"}, exit 1): the parent turns it into a row."""
    quiet_library_noise()
    job_path, result_path = Path(argv[0]), Path(argv[1])
    job = json.loads(job_path.read_text())
    try:
        result = run(job)
    except Exception as error:
        first_line = (str(error).strip().splitlines() or [""])[0][:300]
        result = {"error": f"{type(error).__name__}: {first_line}"}
    temporary = result_path.with_suffix(".tmp")
    temporary.write_text(json.dumps(_json_safe(result)))
    temporary.replace(result_path)
    return 1 if "error" in result else 0
