"""Child process of bench/run.py: the analytic-only footprint of a Llama-shaped model built on the meta device.

Usage: analytic_child.py LAYERS MODE RECIPES, MODE being ``weight`` (weight_footprint only) or ``analytic``
(analytic_footprint with a 1x128 int64 input). Prints one JSON line per step, so a parent that times out still
has the steps that finished.
"""

from __future__ import annotations

import json
import sys
import time

START = time.perf_counter()

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from planner.analysis.footprint import analytic_footprint, weight_footprint  # noqa: E402
from planner.recipes.recipe import default_recipes, select_recipes  # noqa: E402


def emit(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def main() -> None:
    layers, mode, names = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    emit(step="imports", seconds=time.perf_counter() - START)
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                         num_attention_heads=32, vocab_size=32000)
    config.use_cache = False
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = LlamaForCausalLM(config).eval()
    params = sum(p.numel() for p in model.parameters())
    emit(step="build", seconds=time.perf_counter() - t0, params=params)
    inputs = (torch.zeros(1, 128, dtype=torch.int64),)
    for recipe in select_recipes(default_recipes(), names):
        t0 = time.perf_counter()
        if mode == "weight":
            footprint = weight_footprint(model, recipe)
        else:
            footprint = analytic_footprint(model, inputs, recipe)
        emit(step=recipe.name, seconds=time.perf_counter() - t0, weight_bytes=footprint.weight_bytes,
             disk_bytes=footprint.disk_bytes, activation_bytes=footprint.activation_bytes,
             runtime_bytes=footprint.runtime_bytes, notes=footprint.notes[:3])
    emit(step="total", seconds=time.perf_counter() - START)


if __name__ == "__main__":
    main()
