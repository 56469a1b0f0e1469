"""Pruning on the zoo and public architectures: verified against analytic disk and runtime, per recipe.

    .venv/bin/python bench/pruning.py [--models convnet,resnet50,...] [--recipes fp32,struct50,...]

Runs `planner plan` (torch backend) per model and writes results/pruning/pruning.md and pruning.csv from the
plan.json files, so every figure there comes from a real run on this machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
MODELS = {
    "convnet": "zoo:convnet",
    "resnet50": "examples/public_models.py:resnet50",
    "mobilenet_v2": "examples/public_models.py:mobilenet_v2",
    "bert_tiny": "examples/public_models.py:bert_tiny",
    "bert_base": "examples/public_models.py:bert_base",
    "tiny_llama": "examples/public_models.py:tiny_llama",
    "gpt2_small": "examples/public_models.py:gpt2_small",
}
RECIPES = "fp32,struct50,struct50-int8-dynamic,struct50-int4-g128,prune50,int8-dynamic"


def mb(value: float | None) -> str:
    return "-" if value is None or pd.isna(value) else f"{value / 1e6:.2f}"


def run(models: list[str], recipes: str, out: Path) -> pd.DataFrame:
    rows = []
    for name in models:
        folder = Path(tempfile.mkdtemp(prefix=f"prune-{name}-"))
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "planner.cli", "plan", MODELS[name], "--budget", "100GB",
                               "--backend", "torch", "--recipes", recipes, "--out", str(folder), "--force"],
                              capture_output=True, text=True, cwd=ROOT)
        seconds = time.perf_counter() - started
        if done.returncode:
            print(f"{name}: planner failed: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            continue
        plan = json.loads((folder / "plan.json").read_text())
        fp32 = next(r for r in plan["rows"] if r["recipe"] == "fp32")
        for row in plan["rows"]:
            verified = row["status"] == "verified"
            rows.append({
                "model": name, "recipe": row["recipe"], "status": row["status"],
                "analytic_disk_mb": mb(row["analytic_disk_bytes"]), "verified_disk_mb": mb(row["verified_disk_bytes"]),
                "disk_diff": row["disk_diff"],
                "disk_vs_fp32": row["verified_disk_bytes"] / fp32["verified_disk_bytes"] if verified else None,
                "analytic_runtime_mb": mb(row["analytic_runtime_bytes"]),
                "verified_runtime_mb": mb(row["verified_runtime_bytes"]), "runtime_diff": row["runtime_diff"],
                "runtime_vs_fp32": (row["verified_runtime_bytes"] / fp32["verified_runtime_bytes"]
                                    if verified else None),
                "sqnr_db": row["sqnr_db"], "latency_ms": row["latency_ms"], "plan_s": round(seconds),
                "note": (row.get("note") or "")[:160],
            })
        print(f"{name}: {seconds:.0f}s", file=sys.stderr)
    frame = pd.DataFrame(rows)
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "pruning.csv", index=False)
    shown = frame.copy()
    for column in ("disk_diff", "runtime_diff"):
        shown[column] = shown[column].map(lambda v: "-" if v is None or pd.isna(v) else f"{v:+.1%}")
    for column in ("disk_vs_fp32", "runtime_vs_fp32"):
        shown[column] = shown[column].map(lambda v: "-" if v is None or pd.isna(v) else f"{v:.2f}")
    shown["sqnr_db"] = shown["sqnr_db"].map(lambda v: "-" if v is None or pd.isna(v) else f"{float(v):.1f}")
    shown["latency_ms"] = shown["latency_ms"].map(lambda v: "-" if v is None or pd.isna(v) else f"{v:.1f}")
    header = ("# Pruning: verified against analytic (torch backend)\n\n"
              f"Produced by `bench/pruning.py --models {','.join(models)} --recipes {recipes}` on this machine; "
              "sizes in MB (10^6 bytes); `*_vs_fp32` is the verified figure over the fp32 row's; random-init "
              "weights and no fine-tuning, so SQNR shows the raw cost of pruning.\n\n")
    (out / "pruning.md").write_text(header + shown.to_markdown(index=False) + "\n")
    return frame


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="convnet,resnet50,mobilenet_v2,bert_tiny,bert_base")
    parser.add_argument("--recipes", default=RECIPES)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "pruning")
    args = parser.parse_args()
    run(args.models.split(","), args.recipes, args.out)


if __name__ == "__main__":
    main()
