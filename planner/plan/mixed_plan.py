"""The mixed-precision stage of a plan: sensitivity → search → one verified `mixed:<budget>` row per budget.

Runs after the uniform rows, on the same float32 reference and inputs, and verifies each chosen recipe with
the same routine as every other row (the torch row builder planner.plan.pipeline hands to mixed_rows), so the rows
compare in one table.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from planner.analysis.footprint import Footprint, analytic_footprint, weight_footprint
from planner.core import rank
from planner.core.errors import PlannerError
from planner.core.units import format_bytes, parse_size
from planner.measure.isolation import run_worker
from planner.models.sources import ModelSource
from planner.recipes import mixed
from planner.recipes.mixed import CANDIDATES, FrontPoint, Option
from planner.recipes.recipe import MIXED_PREFIX, LayerOverride, Recipe, check_recipe_name, layer_decision
from planner.runtimes.rows import set_figures

MIXED_BASES = ("float32", "bfloat16")  # --mixed-dtype auto searches both and keeps the better prediction
RUNTIME_MARGIN, RUNTIME_MARGIN_BYTES = 0.01, 2 * 1000**2
DISK_MARGIN = 0.001
MAX_STEPS = 48  # analytic checks of the runtime peak stepping down the front one point at a time
MAX_CHECKS = 64  # then faster jumps, up to this many checks per budget
CURVE_POINTS = 24  # front points drawn in plan.png with their full analytic runtime footprint
RANDOM_INPUTS_WARNING = ("sensitivity measured on the example inputs (random values, not real data): "
                         "pass --calibration FILE with real inputs")


def searchable_layers(meta_model: nn.Module, base: Recipe) -> dict[str, list[LayerOverride]]:
    """Each layer some candidate precision can quantize, with those candidates (the shared decision)."""
    layers: dict[str, list[LayerOverride]] = {}
    for fqn, module in meta_model.named_modules():
        for template in CANDIDATES[1:]:
            probe = _with_override(base, fqn, template)
            if layer_decision(module, fqn, probe)[1]:
                layers.setdefault(fqn, []).append(template)
    return layers


def _with_override(base: Recipe, fqn: str, template: LayerOverride, name: str = "probe") -> Recipe:
    override = LayerOverride(fqn, template.quantize, template.bits, template.group_size, template.mapping)
    return Recipe(name=name, dtype=base.dtype, layers=base.layers, layer_overrides=(override,))


def option_costs(meta_model: nn.Module, base: Recipe, layers: dict[str, list[LayerOverride]], budget_on: str
                 ) -> dict[str, dict[str, int]]:
    """Bytes each precision adds to the float model at each layer (negative: saves), in the budgeted
    measure: resident weights for a runtime budget, the file for a disk budget. Exact deltas of the footprint."""
    def measure(footprint: Footprint) -> int:
        return footprint.weight_bytes if budget_on == "runtime" else footprint.disk_bytes

    baseline = measure(weight_footprint(meta_model, base))
    return {fqn: {t.label: measure(weight_footprint(meta_model, _with_override(base, fqn, t))) - baseline
                  for t in templates} for fqn, templates in layers.items()}


def layer_options(layers: dict[str, list[LayerOverride]], costs: dict[str, dict[str, int]],
                  sqnrs: dict[str, dict[str, float | None]], base_noise: float = 0.0) -> list[list[Option]]:
    """Float (cost 0, noise 0) plus every candidate that quantizes the layer, with its measured noise above the
    base model's own (a bfloat16 base has some; clamped at zero where a layer measured quieter than the base)."""
    return [[Option(CANDIDATES[0].label, 0, 0.0)]
            + [Option(t.label, costs[fqn][t.label],
                      max(mixed.noise_power(sqnrs.get(t.label, {}).get(fqn)) - base_noise, 0.0))
               for t in templates]
            for fqn, templates in layers.items()]


def safety_margin(budget: int, budget_on: str) -> int:
    """Room left between the analytic figure and the budget so the verified one fits too. A runtime peak is
    measured about 0.4% above the analytic one on BERT-base (allocator, page granularity: a 169.9 MB analytic mix
    measured 170.6 MB); resident memory resolves to about 2 MB. File sizes agree to a few kB."""
    if budget_on == "runtime":
        return max(RUNTIME_MARGIN_BYTES, int(budget * RUNTIME_MARGIN))
    return int(budget * DISK_MARGIN)


def fit_budget(meta_model: nn.Module, inputs: tuple[torch.Tensor, ...], base: Recipe, name: str,
               fqns: list[str], options: list[list[Option]], front: list[FrontPoint], budget: int, budget_on: str,
               baseline: Footprint, base_noise: float = 0.0) -> tuple[FrontPoint, Recipe, Footprint] | str:
    """The least-noise assignment whose full analytic footprint fits with a margin; otherwise the reason it cannot."""
    margin = safety_margin(budget, budget_on)
    stated, budget = format_bytes(budget), budget - margin
    measure = baseline.weight_bytes if budget_on == "runtime" else baseline.disk_bytes
    activation = (baseline.activation_bytes or 0) if budget_on == "runtime" else 0
    limit = budget - measure - activation
    for steps in range(MAX_CHECKS):
        point = mixed.best_under(front, limit)
        if point is None:
            smallest = front[0].cost + measure + activation
            return (f"no per-layer assignment fits {stated} analytically (less a {format_bytes(margin)} margin for "
                    f"measurement): the smallest needs about {format_bytes(smallest)} {budget_on}")
        chosen = mixed.assignment(fqns, options, point)
        predicted = mixed.predicted_sqnr(point.noise + base_noise)
        recipe = mixed.mixed_recipe(name, base, chosen, f"per-layer precision chosen for {format_bytes(budget)} "
                                    f"{budget_on}, predicted SQNR {predicted:.1f} dB")
        footprint = analytic_footprint(meta_model, inputs, recipe)
        size = footprint.runtime_bytes if budget_on == "runtime" else footprint.disk_bytes
        if size is None:  # activations could not be traced: weights plus the float model's activations
            size = footprint.weight_bytes + activation
        if size <= budget:
            return point, recipe, footprint
        # Over: mostly transient dequantized weights raising the activation peak. Step down the front to the
        # next cheaper point; after many steps, jump by assuming this point's activation peak for the rest.
        jump = budget - measure - (footprint.activation_bytes or activation)
        limit = point.cost - 1 if steps < MAX_STEPS or jump >= point.cost else jump
    return f"no assignment found within {MAX_CHECKS} analytic checks of the runtime peak"


def front_curve(meta_model: nn.Module, inputs: tuple[torch.Tensor, ...], base: Recipe, fqns: list[str],
                options: list[list[Option]], front: list[FrontPoint], budget_on: str, measure: int,
                base_noise: float = 0.0) -> list[list[float]]:
    """(analytic size, predicted SQNR) along the front for plan.png. Disk is additive, so exact from the costs;
    a runtime peak is not, so up to CURVE_POINTS points get their full analytic footprint."""
    if budget_on == "disk":
        return [[measure + point.cost, mixed.predicted_sqnr(point.noise + base_noise)] for point in front]
    step = max(1, math.ceil(len(front) / CURVE_POINTS))
    sampled = front[::step] + ([front[-1]] if (len(front) - 1) % step else [])
    curve = []
    for point in sampled:
        recipe = mixed.mixed_recipe("curve", base, mixed.assignment(fqns, options, point))
        footprint = analytic_footprint(meta_model, inputs, recipe)
        if footprint.runtime_bytes is not None:
            curve.append([footprint.runtime_bytes, mixed.predicted_sqnr(point.noise + base_noise)])
    return sorted(curve)


def _sensitivities(source: ModelSource, meta_model: nn.Module, layers: dict[str, list[LayerOverride]],
                   fp32_path: Path, workdir: Path, options: Any, dtype: str
                   ) -> tuple[dict[str, dict[str, float | None]], float, str]:
    """Run the sensitivity worker isolated; returns the table, the base model's noise power (0 for float32) and a
    note on inputs, caching and time."""
    inputs_path = workdir / "inputs.pt"
    note = RANDOM_INPUTS_WARNING
    if options.calibration:
        from planner.analysis.sensitivity import load_calibration

        calibration = load_calibration(Path(options.calibration), source.example_inputs())
        inputs_path = workdir / "calibration.pt"
        torch.save(calibration, inputs_path)
        rows = calibration[0].shape[0]
        note = f"sensitivity measured on --calibration {Path(options.calibration).name} ({rows} rows)"
    precisions = [{"label": t.label, "override": {"fqn": "", "quantize": t.quantize, "bits": t.bits,
                                                  "group_size": t.group_size, "mapping": t.mapping}}
                  for t in CANDIDATES[1:]]
    per_label = {t.label: [fqn for fqn, templates in layers.items() if t in templates] for t in CANDIDATES[1:]}
    job = {"source": source.to_json(), "fp32": str(fp32_path), "inputs": str(inputs_path),
           "precisions": [p for p in precisions if per_label[p["label"]]], "layers": per_label, "dtype": dtype}
    result = run_worker(job, workdir, "sensitivity", options, worker="planner.analysis.sensitivity")
    if result["status"] != "verified":
        raise SensitivityFailed(result.get("note", "").replace("verification failed: ", ""))
    table = {label: {fqn: (float(v) if isinstance(v, str) else v) for fqn, v in values.items()}
             for label, values in result["sqnr_db"].items()}
    timing = ", ".join(f"{label} {seconds:.0f} s" for label, seconds in result.get("seconds", {}).items())
    cached = ", ".join(result.get("cached", []))
    details = "; ".join(part for part in (f"computed {timing}" if timing else "", f"cached: {cached}" if cached else "")
                        if part)
    base = result.get("base_sqnr_db")
    base_noise = mixed.noise_power(float(base) if isinstance(base, str) else base)
    if not math.isfinite(base_noise):
        raise SensitivityFailed(f"the {dtype} model's output cannot be compared with float32's")
    return table, base_noise, f"{note} ({details})" if details else note


class SensitivityFailed(Exception):
    """The sensitivity worker crashed, ran out of time or memory: the mixed rows say so."""


def _unsupported_row(name: str, backend: str, reason: str, budget_on: str, status: str = "unsupported"
                     ) -> dict[str, Any]:
    row: dict[str, Any] = {"recipe": name, "backend": backend, "status": status, "note": reason,
                           "touches": "per-layer precision (mixed)"}
    set_figures(row, {}, None)
    row.update(fits=False, artifact=None)
    return row


def _summary(chosen: dict[str, str]) -> str:
    if len(chosen) <= 8:
        return ", ".join(f"{fqn} {label}" for fqn, label in chosen.items())
    return ", ".join(f"{count} layer(s) {label}" for label, count in Counter(chosen.values()).items())


def _layer_comment(fqn: str, module: nn.Module, sqnrs: dict[str, dict[str, float | None]],
                   costs: dict[str, int]) -> str:
    weight = getattr(module, "weight", None)
    shape = "×".join(map(str, weight.shape)) if isinstance(weight, torch.Tensor) else ""
    parts = [f"{label} {sqnrs[label][fqn]:.1f} dB ({format_bytes(-costs[label])} saved)"
             for label in costs if sqnrs.get(label, {}).get(fqn) is not None]
    return f"{fqn} ({type(module).__name__} {shape}): output SQNR with only this layer changed: {', '.join(parts)}"


@dataclass
class Search:
    """Everything the search needs for one base dtype: layers, costs, measured noise, the front."""

    base: Recipe
    layers: dict[str, list[LayerOverride]]
    costs: dict[str, dict[str, int]]
    sqnrs: dict[str, dict[str, float | None]]
    base_noise: float
    note: str
    options: list[list[Option]]
    front: list[FrontPoint]
    thinned: bool
    baseline: Footprint
    curve: list[list[float]]


def _search(source: ModelSource, meta_model: nn.Module, inputs: tuple[torch.Tensor, ...], dtype: str,
            fp32_path: Path, workdir: Path, options: Any) -> Search | str:
    """Sensitivity (cached), costs and the front for one base dtype; the reason when there is nothing to search."""
    base = Recipe(dtype, dtype=dtype)
    layers = searchable_layers(meta_model, base)
    if not layers:
        return "no layer any candidate precision can quantize"
    costs = option_costs(meta_model, base, layers, options.budget_on)
    sqnrs, base_noise, note = _sensitivities(source, meta_model, layers, fp32_path, workdir, options, dtype)
    per_layer = layer_options(layers, costs, sqnrs, base_noise)
    front, thinned = mixed.pareto_front(per_layer)
    baseline = analytic_footprint(meta_model, inputs, base)
    measure = baseline.weight_bytes if options.budget_on == "runtime" else baseline.disk_bytes
    curve = front_curve(meta_model, inputs, base, list(layers), per_layer, front, options.budget_on, measure,
                        base_noise)
    return Search(base, layers, costs, sqnrs, base_noise, note, per_layer, front, thinned, baseline, curve)


def _best_fit(searches: list[Search], meta_model: nn.Module, inputs: tuple[torch.Tensor, ...], name: str,
              budget: int, budget_on: str) -> tuple[Search, FrontPoint, Recipe, Footprint, list[str]] | str:
    """The base whose best fitting assignment has the highest predicted SQNR; notes on the bases not taken."""
    fits: list[tuple[float, Search, FrontPoint, Recipe, Footprint]] = []
    reasons = []
    for search in searches:
        fitted = fit_budget(meta_model, inputs, search.base, name, list(search.layers), search.options, search.front,
                            budget, budget_on, search.baseline, search.base_noise)
        if isinstance(fitted, str):
            reasons.append(f"{search.base.dtype} base: {fitted}" if len(searches) > 1 else fitted)
        else:
            fits.append((mixed.predicted_sqnr(fitted[0].noise + search.base_noise), search, *fitted))
    if not fits:
        return "; ".join(reasons)
    fits.sort(key=lambda item: -item[0])
    _, search, point, recipe, footprint = fits[0]
    others = [f"{other.base.dtype} base predicted {sqnr:.1f} dB" for sqnr, other, *_ in fits[1:]] + reasons
    notes = [f"{search.base.dtype} base chosen over: " + "; ".join(others)] if others else []
    return search, point, recipe, footprint, notes


def _joint_curve(searches: list[Search]) -> list[list[float]]:
    """The trade-off curve over every base searched: the points no other beats on size and predicted SQNR."""
    curve: list[list[float]] = []
    for size, sqnr in sorted(point for search in searches for point in search.curve):
        if not curve or sqnr > curve[-1][1]:
            curve.append([size, sqnr])
    return curve


def mixed_rows(source: ModelSource, fp32_path: Path, workdir: Path, options: Any, footprints: dict[str, Footprint],
               report: Callable[[str], None], verify: Callable[[Recipe, Footprint], dict[str, Any]]
               ) -> list[dict[str, Any]]:
    """One verified row per --mixed budget (and an unsupported ONNX Runtime row where that backend runs).
    `verify(recipe, footprint)` applies, saves and verifies a recipe into a row, as for every uniform recipe."""
    names = [mixed_name(text) for text in options.mixed_budgets]
    rows: list[dict[str, Any]] = []
    if "onnxruntime" in options.backends:
        rows += [_unsupported_row(name, "onnxruntime", "per-layer mixed recipes are applied with torchao only; the "
                                  "ONNX Runtime backend quantizes the whole graph (per-node exclusion is not wired in)",
                                  options.budget_on) for name in names]
    if "torch" not in options.backends:
        return rows
    if source.kind == "torchscript":
        return rows + [_unsupported_row(name, "torch", "torchao cannot quantize a TorchScript module; give a factory "
                                        "(file.py:build) or a .pt2", options.budget_on) for name in names]
    report("mixed precision: per-layer sensitivity")
    meta_model = source.build("meta")
    inputs = source.example_inputs()
    searches: list[Search] = []
    for dtype in MIXED_BASES if options.mixed_dtype == "auto" else (options.mixed_dtype,):
        try:
            found = _search(source, meta_model, inputs, dtype, fp32_path, workdir, options)
        except SensitivityFailed as error:
            return rows + [_unsupported_row(name, "torch", f"per-layer sensitivity ({dtype}) failed: {error}",
                                            options.budget_on, status="failed") for name in names]
        if isinstance(found, str):
            return rows + [_unsupported_row(name, "torch", found, options.budget_on) for name in names]
        searches.append(found)
    curve = _joint_curve(searches)
    modules = dict(meta_model.named_modules())
    for name, text in zip(names, options.mixed_budgets, strict=True):
        budget = parse_size(text)
        report(f"mixed precision: searching and verifying {name}")
        # A device budget holds the framework too: the model's own runtime gets what the framework leaves.
        search_on = "runtime" if options.budget_on == "device" else options.budget_on
        framework = (options.framework_bytes.get("torch") or 0) if options.budget_on == "device" else 0
        best = _best_fit(searches, meta_model, inputs, name, budget - framework, search_on)
        if isinstance(best, str):
            rows.append(_unsupported_row(name, "torch", best, options.budget_on))
            continue
        search, point, recipe, footprint, base_notes = best
        chosen = mixed.assignment(list(search.layers), search.options, point)
        predicted = mixed.predicted_sqnr(point.noise + search.base_noise)
        footprint.notes = [f"per layer: {_summary(chosen)}", search.note,
                           f"predicted SQNR {predicted:.1f} dB (sum of per-layer noise powers)", *base_notes,
                           *footprint.notes]
        if search.base.dtype != "float32":
            footprint.notes.append(f"every other layer and all activations in {search.base.dtype} (its own error "
                                   "is in the prediction)")
        elif any(label.startswith("int4") for label in chosen.values()):
            footprint.notes.append("int4 layers run with float32 activations (prototype kernel: slower than bf16)")
        if search.thinned:
            footprint.notes.append(f"trade-off curve thinned to {mixed.MAX_FRONT_POINTS} points: optimum not exact")
        footprints[name] = footprint
        row = verify(recipe, footprint)
        verified = row.get("sqnr_db")
        if row["status"] == "verified" and verified is not None and math.isfinite(verified):
            row["note"] += f"; verified SQNR {verified - predicted:+.1f} dB from predicted"
        if row["status"] == "verified" and text != options.mixed_budgets[0]:  # the fits column is the plan's budget
            verdict = "fits" if rank.fits(row, budget, options.budget_on) else "misses"
            row["note"] += f"; {verdict} its own {format_bytes(budget)} budget (verified)"
        comments = {fqn: _layer_comment(fqn, modules[fqn], search.sqnrs, search.costs[fqn]) for fqn in search.layers}
        header = [f"Mixed-precision recipe chosen by planner for {source.spec}, {format_bytes(budget)} "
                  f"{options.budget_on} budget, {search.base.dtype} base.",
                  f"Predicted output SQNR {predicted:.1f} dB (sum of per-layer noise powers); {search.note}.",
                  f"Re-apply: planner plan {source.spec} --budget {text} --recipe-file {mixed.file_name(name)}",
                  "Edit freely: quantize = none | int8-weight-only | int8-dynamic | int4-weight-only (group_size)."]
        row.update(recipe_toml=mixed.recipe_toml(recipe, header, comments), recipe_json=recipe.to_json(),
                   mixed_front=curve, predicted_sqnr_db=predicted)
        rows.append(row)
    return rows


def mixed_name(budget_text: str) -> str:
    """The row and recipe name of a mixed budget: mixed:512MB. It becomes file names (work directory, export
    folder, mixed-512MB.toml), so parse_budgets checks it like every recipe name."""
    return f"{MIXED_PREFIX}{budget_text.replace(' ', '')}"


def parse_budgets(budget: str, extra: str | None) -> tuple[str, ...]:
    """--mixed uses the plan's budget; --mixed-budgets adds more (a sweep along the trade-off curve)."""
    texts = [budget] + [part.strip() for part in (extra or "").split(",") if part.strip()]
    if len(texts) > 12:  # before parsing: a list of a million budgets is refused at once
        raise PlannerError("--mixed-budgets: give at most 11 extra budgets (each is verified for real)")
    for text in texts:
        parse_size(text)  # a PlannerError names the bad one
        check_recipe_name(mixed_name(text), "--mixed-budgets budget")
    unique = list(dict.fromkeys(text.replace(" ", "") for text in texts))
    return tuple(unique)
