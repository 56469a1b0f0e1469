"""`--eval module:fn` / `--eval file.py:fn`: the user's own quality measure, run on every verified model.

The function is called in the verification worker with the reloaded model (eval mode, weights as the
recipe stored them) and returns a number, higher is better (accuracy, negative perplexity, ...):

    def evaluate(model: torch.nn.Module) -> float

It runs under torch.inference_mode(). Importing it runs the user's code, which the user asked for by naming
it on the command line (like a model factory). A function that fails or returns a non-number gives the row a
note, never a crash.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from planner.errors import PlannerError


def resolve_eval_spec(spec: str) -> str:
    """Check that the spec names an importable function now (PlannerError if not), and return it in a form
    a worker with another working directory can import (an absolute file path, or module:fn)."""
    from planner.sources import _split_factory

    parts = _split_factory(spec)
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
    from planner.sources import _get_factory, _import_package_module, _import_py_file

    target, attr = spec.rsplit(":", 1)
    display = f"--eval {spec}"
    if target.endswith(".py"):
        module = _import_py_file(Path(target), display)
    else:
        module = _import_package_module(target, None, display)
    return _get_factory(module, attr, display)


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
