"""`--eval module:fn` / `--eval file.py:fn`: the user's own quality measure, run on every verified model.

The function is called with the reloaded model (eval mode, weights as the recipe stored them) and returns a
number, higher is better (accuracy, negative perplexity, ...):

    def evaluate(model: torch.nn.Module) -> float

It runs under torch.inference_mode(), in its own worker process after the row's verification (python -m
planner.analysis.evalhook JOB RESULT, under the same --timeout and --memory-cap): a function that fails, hangs, exits or
crashes costs only that row's eval figure, with a note naming --eval; the row's measured figures stay.
Importing it runs the user's code, which the user asked for by naming it on the command line (like a model
factory).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from planner.core.errors import PlannerError


def resolve_eval_spec(spec: str) -> str:
    """Check that the spec names an importable function now (PlannerError if not), and return it in a form
    a worker with another working directory can import (an absolute file path, or module:fn)."""
    from planner.models.sources import split_function_spec

    parts = split_function_spec(spec)
    if parts is None:
        raise PlannerError(f"--eval {spec}: name a function as module:fn or file.py:fn, e.g. my_eval.py:accuracy")
    target, attr = parts
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise PlannerError(f"--eval {spec}: no such file {target}; pass an existing .py file")
        spec = f"{path.resolve()}:{attr}"
    load_eval(spec)
    return spec


def load_eval(spec: str) -> Callable[[Any], Any]:
    from planner.models.sources import import_function

    target, attr = spec.rsplit(":", 1)
    return import_function(target, attr, f"--eval {spec}")


def run_eval(spec: str, model: Any) -> dict[str, Any]:
    """{"eval_score": float} or {"eval_error": "why"}: one row's user-defined quality."""
    import torch

    try:
        function = load_eval(spec)
        with torch.inference_mode():
            value = function(model)
        score = float(value)
    except Exception as error:  # the user's function failing is a fact about the row, not a planner crash
        first_line = (str(error).strip().splitlines() or [""])[0][:200]
        return {"eval_error": f"eval {spec.rsplit('/', 1)[-1]} failed: {type(error).__name__}: {first_line}"}
    if not math.isfinite(score):
        return {"eval_error": f"eval returned {score}", "eval_score": None}
    return {"eval_score": score}


def eval_job(job: dict[str, Any], spec: str) -> dict[str, Any]:
    """The verification job of a row, turned into the job of its --eval worker (same artifact)."""
    keys = ("source", "dtype", "artifact", "artifact_format", "needs_torchao", "recipe")
    return dict({key: job[key] for key in keys}, eval=spec)


def failure_note(spec: str, reason: str) -> str:
    """The row note when the --eval worker did not come back with a figure."""
    return f"--eval {spec.rsplit('/', 1)[-1]} gave no figure: {reason.removeprefix('verification failed: ')}"


def load_verified_artifact(job: dict[str, Any]) -> Any:
    """The row's artifact as the verification worker loads it: the weightless structure, then the saved weights."""
    import torch

    from planner.analysis.artifact import load_weights_into, set_eval, weightless_structure
    from planner.analysis.pruning import unpack_artifact_state
    from planner.models.sources import ModelSource
    from planner.recipes.recipe import Recipe, import_tensor_types, linearize_conv1d

    if job.get("needs_torchao"):
        import_tensor_types()
    if job["artifact_format"] == "torchscript":
        return set_eval(torch.jit.load(job["artifact"], map_location="cpu"))
    model = weightless_structure(ModelSource.from_json(job["source"]), job["artifact_format"])
    if model is not None and job.get("recipe"):
        linearize_conv1d(model, Recipe.from_json(job["recipe"]))
    state = unpack_artifact_state(model, torch.load(job["artifact"], weights_only=True))
    return set_eval(load_weights_into(model, state))


def run_eval_job(job: dict[str, Any]) -> dict[str, Any]:
    """The --eval worker: load the row's artifact, run the user's function."""
    return run_eval(job["eval"], load_verified_artifact(job))


if __name__ == "__main__":
    from planner.measure.worker import worker_main

    sys.exit(worker_main(sys.argv[1:], run_eval_job))
