"""Child process of bench/training.py: one (model, batch) case of the training table.

torchinfo's figures on the float32 model, then per optimizer the planner's analytic training step
(planner.analysis.training.training_footprint, weightless) and the measured twin (planner.analysis.train_verify, its
own fresh
process). A case whose analytic peak is above the bench's memory limit is not measured, and says so.

Usage: training_child.py SPEC BATCH OPTIMIZERS MEMORY_LIMIT_BYTES OUT_JSON
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from case_child import torchinfo_figures  # bench/ is this script's directory, hence on sys.path

from planner.analysis.train_verify import measure_training
from planner.analysis.training import TRACED_STEPS, training_footprint
from planner.models.sources import resolve_source


def main() -> None:
    spec, batch, optimizers, limit, out = (sys.argv[1], int(sys.argv[2]), sys.argv[3].split(","), int(sys.argv[4]),
                                           Path(sys.argv[5]))
    source = resolve_source(spec, batch_size=batch)
    with torch.no_grad():
        info = torchinfo_figures(source)
    results = []
    for optimizer in optimizers:
        started = time.perf_counter()
        report = training_footprint(source.build("meta"), source.example_inputs(), optimizer)
        analytic_s = time.perf_counter() - started
        entry = {"optimizer": optimizer, "analytic_step_peaks": report.step_peaks, "peak_phase": report.peak_phase,
                 "param_bytes": report.param_bytes, "grad_bytes": report.grad_bytes,
                 "optimizer_state_bytes": report.optimizer_state_bytes,
                 "saved_activation_bytes": report.saved_activation_bytes, "fused_ops": report.fused_ops,
                 "analytic_s": analytic_s}
        if report.peak_bytes > limit:
            entry["skipped"] = (f"not measured: the analytic peak {report.peak_bytes / 1e9:.1f} GB is above the "
                                f"bench's limit of {limit / 1e9:.1f} GB on this shared machine")
        else:
            started = time.perf_counter()
            measured = measure_training(source.to_json(), "float32", optimizer, TRACED_STEPS, timeout_s=1200)
            entry.update({"measured_step_peaks": measured.step_peaks, "failure": measured.failure,
                          "first_forward_kept_bytes": measured.first_forward_kept_bytes,
                          "measured_s": time.perf_counter() - started})
        results.append(entry)
        print(json.dumps({k: v for k, v in entry.items() if k != "fused_ops"}), flush=True)
    out.write_text(json.dumps({"spec": spec, "batch": batch, "torchinfo": info, "results": results}, indent=1))


if __name__ == "__main__":
    main()
