"""How long a user waits: time to the analytic table, to the verified pick (--verify needed, the default), and
for --verify all (every row verified, the behaviour before issue 16), with the planner process's own peak.

    .venv/bin/python bench/answer_time.py                 # GPT-2 small (needed, then all) and ComplexNet (needed)
    .venv/bin/python bench/answer_time.py --needed-only   # skip the --verify all runs
    .venv/bin/python bench/answer_time.py --needed-only --jobs 1,2 --executor local,ray   # executors side by side
    .venv/bin/python bench/answer_time.py --model zoo:simplenet --budget 5MB --jobs 1,2 --executor local,ray \
        --plan-args="--backend torch --recipes fp32,int8-dynamic,int4-g128"       # one plan of your own

Each plan runs in its own process (bench/answer_child.py: the planner in-process, so RUSAGE_SELF is the planner
without its verification workers, and without Ray's processes for --executor ray). Every variant after the first
of a case is compared with it (same pick, same verified disk bytes, runtime within the noise). Writes
results/bench/answer-time.md (the default cases; --model writes nothing, it prints).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = [
    # name, model, budget, whether to run --verify all too; the default recipes and every installed runtime, as
    # the README runs them. ComplexNet's --verify all takes 45+ minutes on 2 cores (results/complexnet-512MB/).
    ("GPT-2 small", "examples/public_models.py:gpt2_small", "512MB", True),
    ("ComplexNet", "zoo:complexnet", "512MB", False),
]


def run_case(model: str, budget: str, verify: str, folder: Path, jobs: str | None = None, executor: str = "local",
             plan_args: list[str] | None = None) -> dict:
    name = f"{verify}-{executor}-jobs{jobs or 'default'}"
    result = folder / f"{name}.json"
    out = folder / f"out-{name}"
    chosen = ["--executor", executor] + (["--jobs", jobs] if jobs else [])
    subprocess.run([sys.executable, str(ROOT / "bench" / "answer_child.py"), str(result), "plan", model,
                    "--budget", budget, "--verify", verify, "--out", str(out), *chosen, *(plan_args or [])],
                   cwd=ROOT, check=False)
    measured = json.loads(result.read_text())
    plan = json.loads((out / "plan.json").read_text()) if (out / "plan.json").exists() else {"rows": []}
    measured["pick"] = f"{plan.get('pick')} on {plan.get('pick_backend')}" if plan.get("pick") else "nothing fits"
    measured["verified_rows"] = sum(row["status"] == "verified" for row in plan["rows"])
    measured["rows"] = len(plan["rows"])
    measured["plan"] = plan
    measured["out"] = out
    return measured


def same_answer(needed: dict, everything: dict) -> str:
    """Whether --verify needed picked what --verify all picked (or one executor what another did), and its rows'
    verified figures agree (disk exactly; runtime within the noise of identical processes)."""
    if needed["pick"] != everything["pick"]:
        return f"no: {needed['pick']} vs {everything['pick']}"
    rows = {(r["recipe"], r["backend"]): r for r in everything["plan"]["rows"]}
    worst = 0.0
    for row in needed["plan"]["rows"]:
        other = rows.get((row["recipe"], row["backend"]))
        if row["status"] == "verified" and other and other["status"] == "verified" and other["verified_runtime_bytes"]:
            if row["verified_disk_bytes"] != other["verified_disk_bytes"]:
                return f"no: {row['recipe']} on {row['backend']} disk differs"
            worst = max(worst, abs(row["verified_runtime_bytes"] / other["verified_runtime_bytes"] - 1))
    return f"yes (verified runtime of shared rows within {worst:.1%})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--needed-only", action="store_true")
    parser.add_argument("--case", action="append", help="run only these cases (by name)")
    parser.add_argument("--keep", type=Path, help="copy each plan's --out folder here (CASE-MODE/)")
    parser.add_argument("--jobs", help="comma-separated --jobs values to time side by side (default: the planner's)")
    parser.add_argument("--executor", default="local", help="comma-separated executors: local, ray")
    parser.add_argument("--model", help="time this model instead of the default cases (with --budget)")
    parser.add_argument("--budget", default="512MB")
    parser.add_argument("--plan-args", default="", help="more planner arguments, e.g. '--backend torch'")
    args = parser.parse_args()
    variants = [(executor, jobs) for executor in args.executor.split(",")
                for jobs in (args.jobs.split(",") if args.jobs else [None])]
    cases = [(args.model, args.model, args.budget, False)] if args.model else CASES
    lines = [f"# Time to an answer ({datetime.now(UTC):%Y-%m-%d}, {platform.node()}, "
             f"{subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} cores)", "",
             "| model | --verify | executor | --jobs | analytic table | answer | rows verified | pick | planner peak "
             "| same as the first |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    with tempfile.TemporaryDirectory(prefix="answer-time-") as scratch:
        for name, model, budget, run_all in cases:
            if args.case and name not in args.case:
                continue
            folder = Path(scratch) / name.replace(" ", "_").replace(":", "_").replace("/", "_")
            folder.mkdir()
            modes = ("needed",) if args.needed_only or not run_all else ("needed", "all")
            results = [(mode, executor, jobs, run_case(model, budget, mode, folder, jobs, executor,
                                                       args.plan_args.split()))
                       for mode in modes for executor, jobs in (variants if mode == "needed" else variants[:1])]
            if args.keep:
                for _, _, _, measured in results:
                    shutil.copytree(measured["out"], args.keep / f"{folder.name}-{measured['out'].name}",
                                    dirs_exist_ok=True)
            first = results[0][3]
            for index, (mode, executor, jobs, measured) in enumerate(results):
                agree = same_answer(first, measured) if index else "-"
                lines.append(f"| {name} at {budget} | {mode} | {executor} | {jobs or 'default'} "
                             f"| {measured.get('analytic_table_s', float('nan')):.1f} s "
                             f"| {measured['seconds']:.0f} s | {measured['verified_rows']} of {measured['rows']} "
                             f"| {measured['pick']} | {measured['self_maxrss_bytes'] / 1e9:.2f} GB | {agree} |")
                print(lines[-1], flush=True)
    if not args.model:
        lines += ["", "ComplexNet's `--verify all` is not rerun here: the committed run (results/complexnet-512MB/, "
                  "every row verified, 47 min on a loaded 2-core machine) picked the same struct50-int4-g128 on "
                  "onnxruntime."]
    text = "\n".join(lines) + "\n"
    print(text)
    target = ROOT / "results" / "bench" / "answer-time.md"
    if not args.case and not args.model:
        target.write_text(text)


if __name__ == "__main__":
    main()
