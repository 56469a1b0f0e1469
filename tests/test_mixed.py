"""Mixed precision: the search is optimal, the recipe round-trips, analytic and applied agree, the
sensitivity pass is right and cached, and `planner plan --mixed` beats the uniform 4-bit row that fits."""

import json
import math
import random
import sys
from pathlib import Path

import pytest
import torch

from planner.analysis.footprint import weight_footprint
from planner.cli.commands import main
from planner.core.errors import PlannerError
from planner.models.sources import resolve_source
from planner.plan.mixed_plan import fit_budget, layer_options, option_costs, safety_margin, searchable_layers
from planner.recipes import mixed
from planner.recipes.mixed import Option
from planner.recipes.recipe import Recipe, apply_recipe, check_layer_overrides, layer_decision, load_recipe_file

HERE = Path(__file__).parent
MLP = f"{HERE / 'mixed_mlp.py'}:build"


def mlp() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    sys.path.insert(0, str(HERE))
    try:
        import mixed_mlp
    finally:
        sys.path.remove(str(HERE))
    return mixed_mlp.build()


# ---- the search ----

def test_noise_power_and_prediction_invert() -> None:
    assert mixed.noise_power(20.0) == pytest.approx(0.01)
    twice = mixed.noise_power(20.0) + mixed.noise_power(20.0)
    assert mixed.predicted_sqnr(twice) == pytest.approx(20 - 3.0103, abs=1e-3)
    assert mixed.noise_power(math.inf) == 0.0 and mixed.predicted_sqnr(0.0) == math.inf
    assert mixed.noise_power(None) == math.inf


def test_pareto_search_matches_exhaustive_search_on_random_problems() -> None:
    rng = random.Random(7)
    for _ in range(40):
        layers = [[Option("float", 0, 0.0)] + [Option(f"q{k}", -rng.randint(1, 500), rng.uniform(1e-5, 1e-1))
                                               for k in range(rng.randint(1, 3))]
                  for _ in range(rng.randint(1, 6))]
        front, thinned = mixed.pareto_front(layers)
        assert not thinned
        lowest = sum(min(o.cost for o in options) for options in layers)
        for limit in [lowest - 1, lowest, *(rng.randint(lowest, 0) for _ in range(8)), 0]:
            found, best = mixed.best_under(front, limit), mixed.exhaustive_best(layers, limit)
            assert (found is None) == (best is None)
            if best is not None:
                assert found is not None and found.cost <= limit
                assert found.noise == pytest.approx(best.noise, rel=1e-12)


def test_search_is_optimal_on_a_small_model_with_its_real_costs() -> None:
    meta = resolve_source(MLP).build("meta")
    base = Recipe("float32")
    layers = searchable_layers(meta, base)
    assert set(layers) == {"0", "2", "4"}
    costs = option_costs(meta, base, layers, "disk")
    # Costs are exact deltas: the recipe with every layer int8 costs their sum.
    all_int8 = mixed.mixed_recipe("x", base, dict.fromkeys(layers, "int8-dynamic"))
    float_disk = weight_footprint(meta, base).disk_bytes
    assert weight_footprint(meta, all_int8).disk_bytes - float_disk == sum(c["int8-dynamic"] for c in costs.values())
    sqnrs = {"int8-weight-only": {"0": 48.0, "2": 47.0, "4": 50.0}, "int8-dynamic": {"0": 42.0, "2": 41.0, "4": 44.0},
             "int4-g128": {"0": 24.0, "2": 23.0, "4": 30.0}}
    options = layer_options(layers, costs, sqnrs)
    front, _ = mixed.pareto_front(options)
    for limit in range(front[0].cost, 1, 50_000):
        found, best = mixed.best_under(front, limit), mixed.exhaustive_best(options, limit)
        assert found is not None and best is not None and found.noise == pytest.approx(best.noise)


def test_runtime_budget_fit_checks_the_full_analytic_footprint() -> None:
    source = resolve_source(MLP)
    meta, inputs = source.build("meta"), source.example_inputs()
    base = Recipe("float32")
    layers = searchable_layers(meta, base)
    options = layer_options(layers, option_costs(meta, base, layers, "runtime"),
                            {"int8-weight-only": {"0": 48.0, "2": 47.0, "4": 50.0},
                             "int8-dynamic": {"0": 42.0, "2": 41.0, "4": 44.0},
                             "int4-g128": {"0": 24.0, "2": 23.0, "4": 30.0}})
    front, _ = mixed.pareto_front(options)
    from planner.analysis.footprint import analytic_footprint

    baseline = analytic_footprint(meta, inputs, base)
    budget = 4_200_000  # 2.2 MB once the 2 MB measurement margin is taken
    point, recipe, footprint = fit_budget(meta, inputs, base, "mixed:4.2MB", list(layers), options, front, budget,
                                          "runtime", baseline)
    limit = budget - safety_margin(budget, "runtime")  # room for the measurement to land above the analytic figure
    assert footprint.runtime_bytes is not None and footprint.runtime_bytes <= limit
    assert footprint.runtime_bytes == analytic_footprint(meta, inputs, recipe).runtime_bytes
    # Nothing quieter on the front fits once its activations (dequantized int8 weights) are counted.
    for better in (p for p in front if p.noise < point.noise):
        other = mixed.mixed_recipe("y", base, mixed.assignment(list(layers), options, better))
        assert analytic_footprint(meta, inputs, other).runtime_bytes > limit
    too_small = fit_budget(meta, inputs, base, "mixed:1kB", list(layers), options, front, 1000, "runtime", baseline)
    assert isinstance(too_small, str) and "no per-layer assignment fits" in too_small


# ---- the recipe file ----

def test_mixed_recipe_round_trips_through_toml(tmp_path: Path) -> None:
    recipe = mixed.mixed_recipe("mixed:1MB", Recipe("float32"), {"0": "int8-dynamic", "2": "int4-g128", "4": "float"},
                                "chosen for 1 MB")
    path = tmp_path / mixed.file_name(recipe.name)
    assert path.name == "mixed-1MB.toml"
    path.write_text(mixed.recipe_toml(recipe, ["header"], {"2": "2 (Linear): int4-g128 23.0 dB"}))
    (loaded,) = load_recipe_file(path)
    assert loaded == recipe
    assert loaded.override_for("2").group_size == 128 and loaded.override_for("4").quantize is None
    assert "per layer" in loaded.touches()


@pytest.mark.parametrize(("layer", "message"), [
    ('fqn = "fc1"\nquantize = "int3"', "quantize 'int3' is not none or one of"),
    ('fqn = "fc1"\nquantise = "int8-dynamic"', "unknown key 'quantise'"),
    ('quantize = "int8-dynamic"', "needs fqn"),
    ('fqn = "fc1"\nquantize = "int4-weight-only"\ngroup_size = 0', "group_size must be a positive integer"),
])
def test_bad_layer_tables_are_one_line_errors(tmp_path: Path, layer: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(f'[[recipe]]\nname = "m"\n[[recipe.layer]]\n{layer}\n')
    with pytest.raises(PlannerError, match=message):
        load_recipe_file(path)


def test_overrides_must_name_layers_the_model_has() -> None:
    meta = resolve_source("zoo:simplenet").build("meta")
    wrong = mixed.mixed_recipe("m", Recipe("float32"), {"fc3": "int8-dynamic"})
    with pytest.raises(PlannerError, match="no layer 'fc3': did you mean fc2, fc1"):
        check_layer_overrides(meta, wrong)
    unfit = mixed.mixed_recipe("m", Recipe("float32"), {"fc2": "int4-g128"})
    with pytest.raises(PlannerError, match="cannot take int4-weight-only: out_features 10 not divisible by 16"):
        check_layer_overrides(meta, unfit)


# ---- analytic and applied describe the same model ----

def test_analytic_and_applied_per_layer_layout_are_identical(tmp_path: Path) -> None:
    from torchao.utils import TorchAOBaseTensor

    recipe = mixed.mixed_recipe("m", Recipe("float32"), {"0": "int8-dynamic", "2": "int4-g128", "4": "float"})
    model, _ = mlp()
    footprint = weight_footprint(model, recipe)
    applied, _ = apply_recipe(model, recipe)
    kinds = {"0": "Int8Tensor", "2": "Int4OpaqueTensor", "4": "Parameter"}
    for layer in footprint.layers:
        module = applied.get_submodule(layer.name)
        assert layer.quantized == isinstance(module.weight, TorchAOBaseTensor), layer.name
        assert type(module.weight).__name__ == kinds[layer.name]
        weight = module.weight
        names = [*getattr(weight, "tensor_data_names", []), *getattr(weight, "optional_tensor_data_names", [])]
        parts = [getattr(module.weight, name) for name in names]
        stored = sum(part.nbytes for part in parts if part is not None) or module.weight.nbytes
        assert layer.recipe_bytes == stored + module.bias.nbytes, layer.name
    torch.save(applied.state_dict(), tmp_path / "m.pt")
    assert footprint.disk_bytes == pytest.approx((tmp_path / "m.pt").stat().st_size, rel=0.01)
    decided = [layer_decision(module, name, recipe)[1] for name, module in applied.named_modules() if name]
    assert decided == [True, False, True, False, False]


# ---- sensitivity ----

def test_sensitivity_is_the_error_of_the_model_with_that_layer_alone_quantized_and_is_cached(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from planner.analysis import sensitivity
    from planner.measure.library import compare_outputs

    monkeypatch.setenv("PLANNER_CACHE_DIR", str(tmp_path / "cache"))
    source = resolve_source(MLP)
    model, inputs = mlp()
    torch.save(model.state_dict(), tmp_path / "fp32.pt")
    torch.save(inputs, tmp_path / "inputs.pt")
    precision = {"label": "int4-g128", "override": {"fqn": "", "quantize": "int4-weight-only", "bits": 8,
                                                    "group_size": 128, "mapping": "asymmetric"}}
    job = {"source": source.to_json(), "fp32": str(tmp_path / "fp32.pt"), "inputs": str(tmp_path / "inputs.pt"),
           "precisions": [precision], "layers": {"int4-g128": ["0", "2"]}}
    first = sensitivity.run_job(job)
    assert first["cached"] == [] and set(first["sqnr_db"]["int4-g128"]) == {"0", "2"}
    with torch.inference_mode():
        reference = [model(*inputs)]
    only_two = mixed.mixed_recipe("m", Recipe("float32"), {"2": "int4-g128"})
    quantized, _ = apply_recipe(mlp()[0], only_two)
    with torch.inference_mode():
        direct = compare_outputs(reference, [quantized(*inputs)])["sqnr_db"]
    assert first["sqnr_db"]["int4-g128"]["2"] == pytest.approx(direct, abs=1e-6)
    second = sensitivity.run_job(job)
    assert second["cached"] == ["int4-g128"] and second["sqnr_db"] == first["sqnr_db"]
    torch.save((inputs[0] * 2,), tmp_path / "inputs.pt")  # other inputs: another cache entry
    assert sensitivity.run_job(job)["cached"] == []
    assert len(list((tmp_path / "cache" / "sensitivity").glob("*.json"))) == 2


def test_calibration_file_is_validated(tmp_path: Path) -> None:
    from planner.analysis.sensitivity import load_calibration

    example = (torch.zeros(8, 256),)
    torch.save(torch.randn(32, 256), tmp_path / "good.pt")
    assert load_calibration(tmp_path / "good.pt", example)[0].shape == (32, 256)
    torch.save(torch.randn(32, 100), tmp_path / "bad.pt")
    with pytest.raises(PlannerError, match=r"input 0 is \(32, 100\) torch.float32; the model takes \(batch, 256\)"):
        load_calibration(tmp_path / "bad.pt", example)
    with pytest.raises(PlannerError, match="does not exist"):
        load_calibration(tmp_path / "missing.pt", example)
    from safetensors.torch import save_file

    save_file({"input": torch.randn(4, 256)}, str(tmp_path / "good.safetensors"))
    assert load_calibration(tmp_path / "good.safetensors", example)[0].shape == (4, 256)


# ---- end to end ----

def test_plan_mixed_fits_is_verified_and_beats_uniform_int4(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    # In this process (planner.cli's main, as the console script calls it): the plan's own work runs in fresh
    # workers either way, and the interpreter, torch and the fork server are not started twice more.
    monkeypatch.setenv("PLANNER_CACHE_DIR", str(tmp_path / "cache"))  # never the user's ~/.cache
    out = tmp_path / "out"
    code = main(["plan", MLP, "--budget", "1.3MB", "--budget-on", "disk", "--mixed", "--backend", "torch",
                 "--recipes", "fp32,int8-dynamic,int4-g128", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    rows = {row["recipe"]: row for row in json.loads((out / "plan.json").read_text())["rows"]}
    assert rows["int8-dynamic"]["fits"] is False  # uniform int8 misses the budget
    mixed_row, int4 = rows["mixed:1.3MB"], rows["int4-g128"]
    assert mixed_row["status"] == "verified" and mixed_row["fits"] is True
    assert mixed_row["verified_disk_bytes"] <= 1_300_000
    assert mixed_row["sqnr_db"] > int4["sqnr_db"] + 1.0
    assert "predicted SQNR" in mixed_row["note"] and "random values" in mixed_row["note"]
    assert len(list((tmp_path / "cache" / "sensitivity").glob("*.json"))) == 6  # per precision and base dtype
    (recipe,) = load_recipe_file(out / "mixed-1.3MB.toml")
    assert any(o.quantize == "int4-weight-only" for o in recipe.layer_overrides)
    # The exported file re-applies to the same model: same bytes on disk.
    again = main(["plan", MLP, "--budget", "1.3MB", "--budget-on", "disk", "--backend", "torch",
                  "--recipe-file", str(out / "mixed-1.3MB.toml"), "--out", str(tmp_path / "again")])
    assert again == 0, capsys.readouterr().err
    (row,) = json.loads((tmp_path / "again" / "plan.json").read_text())["rows"]
    assert row["verified_disk_bytes"] == mixed_row["verified_disk_bytes"]
    assert row["sqnr_db"] == pytest.approx(mixed_row["sqnr_db"], abs=0.01)


def test_bfloat16_base_sensitivity_includes_the_base_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from planner.analysis import sensitivity
    from planner.measure.library import compare_outputs

    monkeypatch.setenv("PLANNER_CACHE_DIR", str(tmp_path / "cache"))
    model, inputs = mlp()
    torch.save(model.state_dict(), tmp_path / "fp32.pt")
    torch.save(inputs, tmp_path / "inputs.pt")
    precision = {"label": "int8-dynamic", "override": {"fqn": "", "quantize": "int8-dynamic", "bits": 8,
                                                       "group_size": 128, "mapping": "asymmetric"}}
    job = {"source": resolve_source(MLP).to_json(), "fp32": str(tmp_path / "fp32.pt"),
           "inputs": str(tmp_path / "inputs.pt"), "precisions": [precision], "layers": {"int8-dynamic": ["4"]},
           "dtype": "bfloat16"}
    result = sensitivity.run_job(job)
    with torch.inference_mode():
        reference = [model(*inputs)]
        bf16 = compare_outputs(reference, [mlp()[0].to(torch.bfloat16)(inputs[0].bfloat16()).float()])["sqnr_db"]
    assert result["base_sqnr_db"] == pytest.approx(bf16, abs=1e-6)
    recipe = mixed.mixed_recipe("m", Recipe("bfloat16", dtype="bfloat16"), {"4": "int8-dynamic"})
    assert recipe.dtype == "bfloat16"
    applied, _ = apply_recipe(mlp()[0], recipe)
    with torch.inference_mode():
        direct = compare_outputs(reference, [applied(inputs[0].bfloat16()).float()])["sqnr_db"]
    assert result["sqnr_db"]["int8-dynamic"]["4"] == pytest.approx(direct, abs=1e-6)
    assert direct < bf16  # the layer's quantization adds to the base's own error
    assert sensitivity.run_job(dict(job, dtype="float32"))["cached"] == []  # the dtype is part of the key


def test_a_calibration_file_that_does_not_fit_the_model_is_one_line_before_any_work(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PLANNER_CACHE_DIR", str(tmp_path / "cache"))  # never the user's ~/.cache
    torch.save(torch.randn(16, 99), tmp_path / "calibration.pt")
    code = main(["plan", "zoo:simplenet", "--budget", "20kB", "--mixed", "--calibration",
                 str(tmp_path / "calibration.pt"), "--backend", "torch"])
    stderr = capsys.readouterr().err
    assert code == 2
    assert "error: --calibration" in stderr and "the model takes (batch, 100)" in stderr
    assert "Traceback" not in stderr and not (tmp_path / "cache").exists()
