"""Analytic footprint from shapes alone, checked against real artifacts saved in-process."""

import io

import pytest
import torch
from torch import nn

from planner.analysis.artifact import load_weights_into
from planner.analysis.footprint import analytic_footprint, weight_footprint
from planner.models.zoo import ZOO
from planner.recipes.recipe import DEFAULT_RECIPES_FILE, apply_recipe, default_recipes, load_recipe_file

EDGE_RECIPES = DEFAULT_RECIPES_FILE.with_name("edge.toml")
RECIPES = {recipe.name: recipe for recipe in [*default_recipes(), *load_recipe_file(EDGE_RECIPES)]}


def meta(name: str) -> nn.Module:
    with torch.device("meta"):
        return ZOO[name].build()


def saved_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def test_simplenet_parameters_and_bytes() -> None:
    footprint = weight_footprint(meta("simplenet"), RECIPES["fp32"])
    layers = {layer.name: layer for layer in footprint.layers}
    assert layers["fc1"].params == 100 * 50 + 50 == 5050
    assert layers["fc2"].params == 50 * 10 + 10 == 510
    assert footprint.weight_bytes == 5560 * 4 == 22240


def test_complexnet_on_meta_is_the_classic_size() -> None:
    footprint = weight_footprint(meta("complexnet"), RECIPES["fp32"])
    assert sum(layer.params for layer in footprint.layers) == 536_957_834
    int8 = weight_footprint(meta("complexnet"), RECIPES["int8-dynamic"])
    # fc1's 537M int8 values dominate: about a quarter of fp32 plus the float convolutions
    assert 0.249 < int8.weight_bytes / footprint.weight_bytes < 0.252


def tied() -> nn.Module:
    from tied_lm import TiedLM

    return TiedLM(512, 64)


@pytest.mark.parametrize("model_name", ["simplenet", "convnet", "tinylm", "lstm", "tied"])
@pytest.mark.parametrize("recipe_name", ["fp32", "fp16", "bf16", "int8-dynamic", "int8-weight-only", "int4-g128",
                                         "intx4-g32-unpacked", "fp8-weight-only", "prune50-int8-dynamic",
                                         "8da4w-g32", "8da8w"])
def test_analytic_disk_matches_the_saved_artifact(model_name: str, recipe_name: str) -> None:
    recipe = RECIPES[recipe_name]
    build = tied if model_name == "tied" else ZOO[model_name].build
    with torch.device("meta"):
        weightless = build()
    footprint = weight_footprint(weightless, recipe)
    torch.manual_seed(0)
    real = build()
    # the planner loads the reference by assignment; ties must survive it
    reloaded = load_weights_into(build().to("meta"), real.state_dict())
    model, _ = apply_recipe(reloaded, recipe)
    assert saved_bytes(model) == pytest.approx(footprint.disk_bytes, rel=0.02, abs=600)


def test_tied_weight_stays_one_tensor_through_a_cast() -> None:
    reloaded = load_weights_into(tied().to("meta"), tied().state_dict())
    assert reloaded.head.weight is reloaded.embed.weight
    model, _ = apply_recipe(reloaded, RECIPES["fp16"])
    assert model.head.weight is model.embed.weight


def test_activation_peak_is_part_of_the_runtime_figure() -> None:
    footprint = analytic_footprint(meta("convnet"), ZOO["convnet"].example_input(8), RECIPES["fp32"])
    assert footprint.activation_bytes == 64 * 1024 * 1024  # two live 8×16×256×256 fp32 maps
    assert footprint.runtime_bytes == footprint.weight_bytes + footprint.activation_bytes


def test_quantize_on_meta_matches_quantize_layer_by_layer() -> None:
    """Sharing one quantized template per layer signature gives every layer exactly what quantize_ gives it."""
    import copy

    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    from planner.analysis.footprint import quantize_on_meta
    from planner.recipes.recipe import Recipe, layer_filter

    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(64, 128), nn.Linear(128, 128), nn.Linear(128, 128, bias=False),
                             nn.Linear(128, 128), nn.Linear(128, 10))
    recipe = Recipe("int8", quantize="int8-dynamic")
    shared, reference = copy.deepcopy(meta), copy.deepcopy(meta)
    quantize_on_meta(shared, Int8DynamicActivationInt8WeightConfig(), layer_filter(recipe))
    quantize_(reference, Int8DynamicActivationInt8WeightConfig(), filter_fn=layer_filter(recipe))

    def layout(tensor: torch.Tensor) -> list[tuple]:
        names, _ = tensor.__tensor_flatten__()
        return [(type(tensor).__name__, name, tuple(getattr(tensor, name).shape), getattr(tensor, name).dtype)
                for name in names]

    for ours, theirs in zip(shared, reference, strict=True):
        assert layout(ours.weight) == layout(theirs.weight)
    assert shared[1].weight is not shared[3].weight  # each layer owns its Parameter


def test_int4_is_traced_on_its_quantized_layout_not_on_the_float_model() -> None:
    """torchao's CPU int4 asserts a CPU weight, so it cannot quantize on meta; quantized on FakeTensors that claim the
    CPU it gets the layout a real quantize_ gives. Tracing that model, not the bf16 one, follows the path the real
    int4 model takes: its tensor-subclass weights send nn.TransformerEncoderLayer down the slow path (the float
    model's trace took the fused fast path and missed 17-19% of zoo:tinylm's runtime)."""
    from planner.analysis.activations import activation_peak
    from planner.analysis.footprint import weightless_recipe_model

    recipe = RECIPES["int4-g128"]
    weightless, note = weightless_recipe_model(meta("tinylm").eval(), recipe)
    assert note == ""
    torch.manual_seed(0)
    real, _notes = apply_recipe(ZOO["tinylm"].build().eval(), recipe)

    def layout(model: nn.Module) -> list[tuple]:
        return [(name, type(tensor).__name__, *[(tuple(getattr(tensor, inner).shape), getattr(tensor, inner).dtype)
                                               for inner in tensor.__tensor_flatten__()[0]])
                for name, tensor in model.named_parameters() if hasattr(tensor, "__tensor_flatten__")]

    assert layout(weightless) == layout(real) and len(layout(real)) == 5
    assert all(t.device.type == "meta" for t in weightless.state_dict().values())
    inputs = ZOO["tinylm"].example_input(2)
    traced = activation_peak(weightless, tuple(t.to("meta") for t in inputs))
    measured_path = activation_peak(real, inputs)  # the same tracker on the real int4 model and tensors
    assert "aten._transformer_encoder_layer_fwd" not in traced.fused_ops
    assert (traced.peak_bytes, traced.output_bytes) == (measured_path.peak_bytes, measured_path.output_bytes)
