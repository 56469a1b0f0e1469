"""Benchmark of `planner`'s training mode: the analytic training step against one measured in a fresh process.

    .venv/bin/python bench/training.py                 # writes results/bench/training.{md,csv}
    .venv/bin/python bench/training.py --no-inference  # training cases only

Each (model, batch) case runs in its own child (bench/training_child.py), which runs the measured steps in a fresh
grandchild (planner.analysis.train_verify). With inference on (the default), the inference accuracy cases bench/run.py
does
not cover (batch 64 of the zoo, the 100 MB MLP at every batch) run through bench/run.py's own accuracy code.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from run import (
    BENCH,
    PYTHON,
    RESOLUTION_BYTES,
    ROOT,
    accuracy_sections,
    machine_header,
    markdown_table,
    mb,
    model_label,
    pct,
    relative,
    run_accuracy,
    run_measured,
    summarize,
    tail,
    write_csv,
    write_header_csv,
    write_markdown,
)

from planner.analysis.training import SGD_MOMENTUM

MLP = "examples/training_models.py:mlp_100m"
BATCHES = (1, 8, 64)
TRAINING_CASES: list[tuple[str, int]] = [
    *[(spec, batch) for spec in ("zoo:simplenet", "zoo:convnet", "zoo:tinylm", "zoo:lstm", MLP,
                                 "examples/public_models.py:bert_tiny", "examples/public_models.py:resnet50")
      for batch in BATCHES],
]
OPTIMIZERS = "sgd,adamw"
# Optimizer state per parameter in the rule of thumb: SGD's momentum buffer, Adam(W)'s two moments.
STATE_COPIES = {"sgd": 1, "adamw": 2}
# A case whose analytic peak is above this is not measured (the machine is shared with other jobs).
MEMORY_LIMIT_BYTES = 4 * 1000**3
CASE_TIMEOUT_S = 1800
INFERENCE_CASES: list[tuple[str, int, str]] = [
    *[(f"zoo:{name}", 64, "fp32") for name in ("simplenet", "convnet", "tinylm", "lstm")],
    *[(MLP, batch, "fp32") for batch in BATCHES],
]

RULES = f"""\
One training step = `optimizer.zero_grad(set_to_none=True)`, forward, loss = sum of the output means, backward,
`optimizer.step()`, float32, random weights; `sgd` is SGD with momentum {SGD_MOMENTUM}, `adamw` torch's AdamW. The
measured figure is the peak resident memory of a real step in a fresh process (planner.analysis.train_verify): resident
parameters + (peak RSS during the step - baseline RSS), steps 1 (creates the optimizer state) and 2 (steady state).
The baseline is taken after imports, a tiny warm-up of the framework's kernels (convolution, attention, LSTM, one
optimizer step), model load, optimizer construction and one forward without autograd: as in the torch worker,
first-use initialisation is kept out of the step and reported (`first_forward_kept_bytes` in the CSV). Each estimate
is compared with the larger of the two steps; error = (estimate - measured) / measured.

- **planner**: `planner inspect --mode train`'s analytic peak (planner.analysis.training: the step traced on fake
tensors,
  larger of its two steps); its per-step errors are in the CSV.
- **torchinfo**: `torchinfo.summary(...)`'s "Estimated Total Size" as printed: input + forward/backward pass size +
  parameters.
- **params×bytes**: the common rule of thumb, parameters × 4 bytes × (1 weight + 1 gradient + optimizer states:
  1 for SGD with momentum, 2 for AdamW).
- **rule+torchinfo**: the rule of thumb plus torchinfo's input and forward/backward pass size.

Rows whose measured peak is below the planner's 2 MB resolution are flagged `<2MB` (page and allocator noise);
the summary is given over all rows and over rows ≥ 2 MB.
"""

TRAINING_ESTIMATORS = (("planner", "planner_err"), ("torchinfo", "torchinfo_err"),
                       ("params×bytes", "params_x_bytes_err"), ("rule+torchinfo", "rule_torchinfo_err"))
TRAINING_COLUMNS = ["model", "batch", "recipe", "params", "measured_step1_bytes", "measured_step2_bytes",
                    "measured_bytes", "planner_step1_bytes", "planner_step2_bytes", "planner_bytes", "peak_phase",
                    "grad_bytes", "optimizer_state_bytes", "saved_activation_bytes", "torchinfo_bytes",
                    "params_x_bytes", "rule_torchinfo_bytes", "planner_err", "planner_step1_err",
                    "planner_step2_err", "torchinfo_err", "params_x_bytes_err", "rule_torchinfo_err",
                    "below_resolution", "first_forward_kept_bytes", "analytic_s", "note"]


def training_rows(case: dict[str, Any]) -> list[dict[str, Any]]:
    info = case["torchinfo"]
    param_bytes = info["params"] * 4
    activations = info["torchinfo_input_bytes"] + info["torchinfo_output_bytes"]
    rows = []
    for result in case["results"]:
        optimizer = result["optimizer"]
        measured_steps = result.get("measured_step_peaks") or [None, None]
        measured = max(measured_steps) if None not in measured_steps else None
        analytic_steps = result["analytic_step_peaks"]
        torchinfo_total = activations + info["torchinfo_param_bytes"]
        rule = param_bytes * (2 + STATE_COPIES[optimizer])
        note = result.get("skipped") or result.get("failure") or ""
        if result["fused_ops"]:
            note = "; ".join(filter(None, [note, "fused: " + ", ".join(result["fused_ops"])]))
        rows.append({
            "model": model_label(case["spec"]).removeprefix("examples/training_models.py:"),
            "batch": case["batch"], "recipe": f"fp32 {optimizer}", "params": info["params"],
            "measured_step1_bytes": measured_steps[0], "measured_step2_bytes": measured_steps[1],
            "measured_bytes": measured, "planner_step1_bytes": analytic_steps[0],
            "planner_step2_bytes": analytic_steps[1], "planner_bytes": max(analytic_steps),
            "peak_phase": result["peak_phase"], "grad_bytes": result["grad_bytes"],
            "optimizer_state_bytes": result["optimizer_state_bytes"],
            "saved_activation_bytes": result["saved_activation_bytes"], "torchinfo_bytes": torchinfo_total,
            "params_x_bytes": rule, "rule_torchinfo_bytes": rule + activations,
            "planner_err": relative(max(analytic_steps), measured),
            "planner_step1_err": relative(analytic_steps[0], measured_steps[0]),
            "planner_step2_err": relative(analytic_steps[1], measured_steps[1]),
            "torchinfo_err": relative(torchinfo_total, measured), "params_x_bytes_err": relative(rule, measured),
            "rule_torchinfo_err": relative(rule + activations, measured),
            "below_resolution": measured is not None and measured < RESOLUTION_BYTES,
            "first_forward_kept_bytes": result.get("first_forward_kept_bytes"),
            "analytic_s": round(result["analytic_s"], 2), "note": note[:200],
        })
    return rows


def run_training(cases: list[tuple[str, int]], work: Path) -> tuple[list[dict[str, Any]], list[str]]:
    rows: list[dict[str, Any]] = []
    failures: list[str] = []
    for index, (spec, batch) in enumerate(cases, 1):
        out = work / f"train{index}.json"
        print(f"[training {index}/{len(cases)}] {spec} batch {batch}: {OPTIMIZERS}", flush=True)
        run = run_measured([PYTHON, str(BENCH / "training_child.py"), spec, str(batch), OPTIMIZERS,
                            str(MEMORY_LIMIT_BYTES), str(out)], CASE_TIMEOUT_S, work / f"train{index}.log")
        if run["rc"] != 0 or not out.exists():
            why = "timed out" if run["timed_out"] else f"exit {run['rc']}: {tail(run['log'])}"
            failures.append(f"{spec} batch {batch}: {why}")
            print(f"    FAILED ({why})", flush=True)
            continue
        case_rows = training_rows(json.loads(out.read_text()))
        rows.extend(case_rows)
        for row in case_rows:
            print(f"    {row['recipe']}: measured {mb(row['measured_bytes'])} MB, planner {mb(row['planner_bytes'])} "
                  f"MB ({pct(row['planner_err'])}) {row['note']}", flush=True)
    return rows, failures


def training_sections(rows: list[dict[str, Any]], failures: list[str]) -> tuple[str, str]:
    headers = ["model", "batch", "recipe", "measured MB (step 1 / 2)", "planner MB (step 1 / 2)", "peak in",
               "planner err", "torchinfo err", "params×bytes err", "rule+torchinfo err", "note"]
    table = markdown_table(headers, [[
        r["model"], str(r["batch"]), r["recipe"] + (" <2MB" if r["below_resolution"] else ""),
        f"{mb(r['measured_step1_bytes'])} / {mb(r['measured_step2_bytes'])}",
        f"{mb(r['planner_step1_bytes'])} / {mb(r['planner_step2_bytes'])}", r["peak_phase"],
        pct(r["planner_err"]), pct(r["torchinfo_err"]), pct(r["params_x_bytes_err"]), pct(r["rule_torchinfo_err"]),
        r["note"]] for r in rows])
    measured = [r for r in rows if r["measured_bytes"] is not None]
    big = [r for r in measured if not r["below_resolution"]]
    summary = markdown_table(["rows", "estimator", "n", "median abs err", "worst err", "worst case"],
                             summarize(measured, TRAINING_ESTIMATORS, "all")
                             + summarize(big, TRAINING_ESTIMATORS, "measured ≥ 2 MB"))
    failed = "\n".join(f"- case failed: {failure}" for failure in failures)
    return table, "### Training peak: error summary\n\n" + summary + ("\n\n" + failed if failed else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-inference", action="store_true", help="skip the inference cases")
    args = parser.parse_args()
    started = datetime.now(UTC)
    clock = time.perf_counter()
    out_dir = ROOT / "results" / "bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    header = machine_header(started)
    print("\n".join(header), flush=True)
    with tempfile.TemporaryDirectory(prefix="planner-bench-train-") as tmp:
        work = Path(tmp)
        rows, failures = run_training(TRAINING_CASES, work)
        inference = run_accuracy(INFERENCE_CASES, work) if not args.no_inference else None
    header.append(f"Bench wall time: {time.perf_counter() - clock:.0f} s")
    if not rows:
        print("\n".join(["every training case failed; results/bench not written:", *failures]), file=sys.stderr)
        return 1
    table, summary = training_sections(rows, failures)
    sections = [RULES, "## Training: per case", table, summary]
    if inference is not None:
        inference_table, inference_summary, extra = accuracy_sections(*inference)
        sections += ["## Inference cases bench/run.py does not cover (its rules, see accuracy.md)", inference_table,
                     inference_summary, *([extra] if extra else [])]
        failures += inference[1]
    write_csv(out_dir / "training.csv", TRAINING_COLUMNS, rows)
    write_header_csv(out_dir / "training.csv", header)
    write_markdown(out_dir / "training.md", "planner benchmark: training-step memory", header, sections)
    print("\n\n".join(sections[1:]), flush=True)
    print(f"\nwrote {out_dir / 'training.md'}, {out_dir / 'training.csv'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
