"""Child process of bench/run.py: one (model, batch) case of the accuracy table.

Runs torchinfo on the float32 model, then a real `planner plan` (planner.plan.pipeline.run_plan, torch backend) over
the requested recipes, and writes one JSON file with both. Each case runs in its own process so that one model's
memory (ComplexNet is 2.1 GB in float32) never stays behind for the next.

Usage: case_child.py SPEC BATCH RECIPES OUT_JSON
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path

import torch
import torchinfo
from accelerate.utils import calculate_maximum_sizes

from planner.models.sources import resolve_source
from planner.plan.pipeline import PlanOptions, run_plan
from planner.recipes.recipe import default_recipes, select_recipes
from planner.report import plan_json

# The budget does not matter here (nothing is ranked or exported). One byte fits nothing, so the planner deletes
# each artifact as soon as it is verified (it can be gigabytes) instead of keeping it for an export.
BUDGET_BYTES = 1


def torchinfo_figures(source) -> dict[str, int]:
    """torchinfo's estimate on the float32 model, as its "Estimated Total Size" defines it."""
    model = source.build("cpu")
    inputs = list(source.example_inputs())
    stats = torchinfo.summary(model, input_data=inputs, verbose=0, device="cpu", mode="eval")
    params = sum(p.numel() for p in model.parameters())  # tied weights counted once
    accelerate_total, _largest_layer = calculate_maximum_sizes(model)  # what `accelerate estimate-memory` sums
    figures = {
        "accelerate_total_bytes": int(accelerate_total),
        "params": params,
        "torchinfo_params": int(stats.total_params),
        "torchinfo_input_bytes": int(stats.total_input),
        "torchinfo_output_bytes": int(stats.total_output_bytes),
        "torchinfo_param_bytes": int(stats.total_param_bytes),
    }
    del model, inputs, stats
    gc.collect()
    return figures


def main() -> None:
    spec, batch, names, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
    started = time.perf_counter()
    source = resolve_source(spec, batch_size=batch)
    recipes = select_recipes(default_recipes(), names)
    with torch.no_grad():
        info = torchinfo_figures(source)
    options = PlanOptions(budget_bytes=BUDGET_BYTES, backends=("torch",))
    result = run_plan(source, recipes, options)
    try:
        plan = plan_json(result)
    finally:
        result.cleanup()
    recipe_table = {recipe.name: recipe.to_json() for recipe in recipes}
    out.write_text(json.dumps({"spec": spec, "batch": batch, "input_shapes": plan["input_shapes"],
                               "torchinfo": info, "recipes": recipe_table, "rows": plan["rows"],
                               "seconds": time.perf_counter() - started}, indent=1))


if __name__ == "__main__":
    main()
