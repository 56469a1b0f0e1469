"""Compare each exported row's verified runtime with scripts/measure_lifetime.py run in a fresh process.

    python scripts/compare_lifetime.py PLAN_OUT_DIR EXPORT_DIR [--runs N]

PLAN_OUT_DIR holds plan.json (planner plan --out), EXPORT_DIR the folders of planner plan --export --export-all.
Prints one line per recipe: verified runtime, its load / first-forward / steady peaks, the independent lifetime
peak (median of N fresh processes), and the relative difference.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

MEASURER = Path(__file__).with_name("measure_lifetime.py")


def independent(folder: Path, env: dict[str, str]) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".json") as handle:
        subprocess.run([sys.executable, str(MEASURER), str(folder), "--json", handle.name], check=True, env=env,
                       stdout=subprocess.DEVNULL)
        return json.loads(Path(handle.name).read_text())


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("plan_dir", type=Path)
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--plain-malloc", action="store_true", help="run the measurer without the planner's "
                                                                     "MALLOC_* settings (glibc defaults)")
    args = parser.parse_args(argv)
    rows = json.loads((args.plan_dir / "plan.json").read_text())["rows"]
    env = dict(os.environ)
    if not args.plain_malloc:
        env.update({"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"})
    mb = 1e6
    print(f"{'recipe':22} {'verified':>9} {'load':>8} {'first':>8} {'steady':>8} {'analytic':>9} "
          f"{'indep.':>8} {'i.load':>8} {'i.1st':>8} {'diff':>7}")
    for row in rows:
        folder = args.export_dir / (row["recipe"] if row["backend"] == "torch" else f"{row['recipe']}-{row['backend']}")
        if row["status"] != "verified" or not folder.exists():
            continue
        runs = [independent(folder, env) for _ in range(args.runs)]
        lifetime = statistics.median(run["lifetime_peak_bytes"] for run in runs)
        verified = row["verified_runtime_bytes"]

        def show(key: str, source: dict) -> str:
            value = source.get(key)
            return f"{value / mb:8.1f}" if isinstance(value, int | float) else f"{'-':>8}"

        print(f"{row['recipe'] + ('' if row['backend'] == 'torch' else ' ort'):22} {verified / mb:9.1f} "
              f"{show('verified_load_peak_bytes', row)} {show('verified_first_forward_peak_bytes', row)} "
              f"{show('verified_steady_peak_bytes', row)} {show('analytic_runtime_bytes', row)}"
              f" {lifetime / mb:8.1f} {show('load_peak_bytes', runs[0])} "
              f"{show('through_first_forward_peak_bytes', runs[0])} {(verified - lifetime) / lifetime:+7.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
