"""Compare two sets of plans field by field: the before/after record of a refactor (issue 14).

    python bench/compare_plans.py BEFORE_ROOT AFTER_ROOT > results/redesign/before-after.md

Each root holds one folder per model with the `plan.json` that `planner plan MODEL --out ROOT/NAME` wrote. Every
field of every (recipe, backend) row is compared, except those measured at run time on a noisy machine (latency,
the framework baseline). A difference is listed with the explanation given for its field in EXPLAINED, or as
"unexplained": the record is only complete when that count is zero.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

RUN_DEPENDENT = {"framework_bytes", "latency_ms", "rank", "note", "analytic_first_use_bytes"}
# Fields that changed on purpose, and why.
EXPLAINED = {"fits": "follows the analytic runtime (issue 13)"}
FIRST_USE_SHIFT = ("issue 13: the analytic runtime targets the verified lifetime peak and adds the framework's "
                   "first-use cost (measured once per machine)")


def rows_by_key(plan: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(row["recipe"], row["backend"]): row for row in plan["rows"]}


def first_use_shift(field: str, before: Any, after_row: dict[str, Any]) -> bool:
    """The analytic runtime moved by exactly the first-use cost that the after row names."""
    after, first_use = after_row.get(field), after_row.get("analytic_first_use_bytes")
    return (field == "analytic_runtime_bytes" and isinstance(before, int) and isinstance(after, int)
            and isinstance(first_use, int) and after - before == first_use)


def compare(before: dict[str, Any], after: dict[str, Any]) -> tuple[list[str], list[str], list[str], int]:
    """(differences, rows only after, rows only before, rows whose analytic runtime moved by the first-use cost)."""
    old, new = rows_by_key(before), rows_by_key(after)
    differences = []
    shifted = 0
    for key, row in old.items():
        if key not in new:
            continue
        for field, value in row.items():
            if field in RUN_DEPENDENT or new[key].get(field) == value:
                continue
            if first_use_shift(field, value, new[key]):
                shifted += 1
                continue
            reason = EXPLAINED.get(field, "unexplained")
            differences.append(f"| {key[0]} | {key[1]} | `{field}` | {value!r} | {new[key].get(field)!r} | {reason} |")
    for field in ("pick", "budget_bytes", "budget_on"):
        if before.get(field) != after.get(field):
            differences.append(f"| (plan) | | `{field}` | {before.get(field)!r} | {after.get(field)!r} | "
                               f"{EXPLAINED.get(field, 'unexplained')} |")
    only_after = [f"{recipe} ({backend})" for recipe, backend in sorted(set(new) - set(old))]
    only_before = [f"{recipe} ({backend})" for recipe, backend in sorted(set(old) - set(new))]
    return differences, only_after, only_before, shifted


def main(before_root: Path, after_root: Path) -> int:
    print(f"# Plans before and after: `{before_root}` vs `{after_root}`\n")
    unexplained = 0
    for plan_path in sorted(before_root.glob("*/plan.json")):
        after_path = after_root / plan_path.parent.name / "plan.json"
        if not after_path.exists():
            print(f"## {plan_path.parent.name}\n\nno plan after\n")
            unexplained += 1
            continue
        before, after = json.loads(plan_path.read_text()), json.loads(after_path.read_text())
        differences, only_after, only_before, shifted = compare(before, after)
        unexplained += sum("unexplained" in line for line in differences) + len(only_before)
        print(f"## {before.get('model', plan_path.parent.name)}\n")
        print(f"{len(rows_by_key(before))} rows before, {len(rows_by_key(after))} after. {shifted} rows' analytic "
              f"runtime moved by exactly the first-use cost ({FIRST_USE_SHIFT}); {len(differences)} other field "
              "differences.")
        if only_after:
            print(f"New rows: {', '.join(only_after)}.")
        if only_before:
            print(f"Rows gone (unexplained): {', '.join(only_before)}.")
        if differences:
            print("\n| recipe | backend | field | before | after | why |\n| --- | --- | --- | --- | --- | --- |")
            print("\n".join(differences))
        print()
    print(f"Unexplained differences: {unexplained}")
    return 1 if unexplained else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
