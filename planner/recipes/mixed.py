"""Mixed precision under a budget: the search and the recipe it produces (pure arithmetic, no torch work).

Model of quality. Each layer's sensitivity is the whole model's output SQNR when only that layer takes a
precision (planner.analysis.sensitivity). Its relative noise power is n = 10^(-SQNR/10). The predicted noise of an
assignment is the sum of its layers' n: additive when the layers' output errors are small and uncorrelated
(the first-order term of the error; it breaks down when errors are large or cancel). Every mixed row states
the predicted SQNR beside the verified one, so the assumption is checked on each plan.

Model of size. Weight bytes and disk bytes are additive over layers: each option's cost is the change of the
analytic footprint (planner.analysis.footprint) when only that layer changes. The runtime peak is not additive (the
activation peak, transient dequantized weights included, is a maximum over the forward), so the pipeline
takes the best point of the front whose weights fit the budget minus an activation estimate, computes the
full analytic footprint of that assignment, and tightens the estimate by any overshoot until it fits.

Search. A multiple-choice knapsack solved exactly by a Pareto dynamic programme: after each layer only the
(cost, noise) points no other point beats on both are kept. The surviving points are the trade-off curve
itself; the best assignment for any budget is read off it, and `--mixed-budgets` sweeps it.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

from planner.recipes.recipe import LayerOverride, Recipe
from planner.schemes import SCHEMES

# The precisions a layer may take. Only what really runs and is measured here: per-layer bf16 would need the
# activations cast around each layer (the model's activation dtype is global), so it is not offered. The
# 4-bit layers run with float32 activations (the prototype kernel takes them; slower than bf16, and said).
CANDIDATES: tuple[LayerOverride, ...] = (
    LayerOverride("", None),
    LayerOverride("", "int8-weight-only"),
    LayerOverride("", "int8-dynamic"),
    LayerOverride("", "int4-weight-only", group_size=128),
)
MAX_FRONT_POINTS = 50_000  # far above what real models produce; past it the front is thinned (and said)


@dataclass(frozen=True)
class Option:
    """One precision for one layer: bytes it adds to the float model (negative: saves) and its noise power."""

    label: str
    cost: int
    noise: float


@dataclass(frozen=True)
class FrontPoint:
    cost: int  # total bytes added to the float model
    noise: float  # predicted relative output noise power
    choice: tuple[int, ...]  # index into each layer's options


def noise_power(sqnr_db: float | None) -> float:
    """Relative noise power of an output SQNR; an unmeasurable SQNR makes the option unusable (inf)."""
    if sqnr_db is None or math.isnan(sqnr_db):
        return math.inf
    if math.isinf(sqnr_db):
        return 0.0 if sqnr_db > 0 else math.inf
    return 10 ** (-sqnr_db / 10)


def predicted_sqnr(noise: float) -> float:
    return math.inf if noise <= 0 else -10 * math.log10(noise)


def _non_dominated(points: list[FrontPoint]) -> list[FrontPoint]:
    """Points by increasing cost whose noise is strictly lower than every cheaper point's."""
    kept: list[FrontPoint] = []
    for point in sorted(points, key=lambda p: (p.cost, p.noise)):
        if not kept or point.noise < kept[-1].noise:
            kept.append(point)
    return kept


def pareto_front(layers: Sequence[Sequence[Option]]) -> tuple[list[FrontPoint], bool]:
    """Every non-dominated assignment (one option per layer), by increasing cost. Exact unless thinned
    (returned flag) past MAX_FRONT_POINTS."""
    points = [FrontPoint(0, 0.0, ())]
    thinned = False
    for options in layers:
        merged = [FrontPoint(p.cost + o.cost, p.noise + o.noise, (*p.choice, index))
                  for p in points for index, o in enumerate(options) if math.isfinite(o.noise)]
        points = _non_dominated(merged)
        if len(points) > MAX_FRONT_POINTS:
            step = len(points) / MAX_FRONT_POINTS
            points = [points[int(i * step)] for i in range(MAX_FRONT_POINTS)] + [points[-1]]
            thinned = True
    return points, thinned


def best_under(front: Sequence[FrontPoint], limit: int) -> FrontPoint | None:
    """The least-noise point whose cost is at most `limit` (the front's noise falls as cost rises)."""
    fitting = [point for point in front if point.cost <= limit]
    return fitting[-1] if fitting else None


def exhaustive_best(layers: Sequence[Sequence[Option]], limit: int) -> FrontPoint | None:
    """Brute force over every assignment: the optimality check for small models (tests)."""
    best: FrontPoint | None = None
    for choice in itertools.product(*(range(len(options)) for options in layers)):
        cost = sum(layers[i][c].cost for i, c in enumerate(choice))
        noise = sum(layers[i][c].noise for i, c in enumerate(choice))
        if cost <= limit and math.isfinite(noise) and (best is None or (noise, cost) < (best.noise, best.cost)):
            best = FrontPoint(cost, noise, tuple(choice))
    return best


def assignment(fqns: Sequence[str], options: Sequence[Sequence[Option]], point: FrontPoint) -> dict[str, str]:
    return {fqn: options[i][point.choice[i]].label for i, fqn in enumerate(fqns)}


def candidate(label: str) -> LayerOverride:
    return next(c for c in CANDIDATES if c.label == label)


def mixed_recipe(name: str, base: Recipe, chosen: dict[str, str], description: str = "") -> Recipe:
    """The recipe of an assignment: one [[recipe.layer]] per searched layer, float ones included (reviewable)."""
    overrides = []
    for fqn, label in chosen.items():
        template = candidate(label)
        overrides.append(LayerOverride(fqn, template.quantize, template.bits, template.group_size, template.mapping))
    return Recipe(name=name, description=description, dtype=base.dtype, layer_overrides=tuple(overrides))


def _toml_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a JSON string of printable text is a TOML basic string


def recipe_toml(recipe: Recipe, header: Sequence[str], layer_comments: dict[str, str]) -> str:
    """The recipe as a [[recipe]] file that load_recipe_file reads back, one commented table per layer."""
    # One comment line per header line: a newline inside one (a model path) must not become TOML.
    lines = [f"# {part}" for line in header for part in (line.splitlines() or [""])]
    lines += ["", "[[recipe]]", f"name = {_toml_string(recipe.name)}",
              f"description = {_toml_string(recipe.description)}", f"dtype = {_toml_string(recipe.dtype)}"]
    for override in recipe.layer_overrides:
        lines.append("")
        if override.fqn in layer_comments:
            lines.append(f"# {layer_comments[override.fqn]}")
        lines += ["[[recipe.layer]]", f"fqn = {_toml_string(override.fqn)}",
                  f"quantize = {_toml_string(override.quantize or 'none')}"]
        if override.quantize:  # only the keys its scheme reads, in the scheme's order
            for key in SCHEMES[override.quantize].settings_keys:
                value = getattr(override, key)
                lines.append(f"{key} = {_toml_string(value) if isinstance(value, str) else value}")
    return "\n".join(lines) + "\n"


def file_name(recipe_name: str) -> str:
    """mixed:512MB → mixed-512MB.toml"""
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in recipe_name) + ".toml"
