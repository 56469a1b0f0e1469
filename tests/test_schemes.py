"""The scheme registry (one file per torchao scheme) and the schemes' layouts against real torchao tensors."""

import sys
import tomllib
from pathlib import Path

import pytest
import torch
from torch import nn

import planner.schemes
from planner.analysis.footprint import weight_footprint, weightless_recipe_model
from planner.recipes.mixed import recipe_toml
from planner.recipes.recipe import (
    LayerOverride,
    Recipe,
    apply_recipe,
    default_recipes,
    load_recipe_file,
    quantization_decision,
)
from planner.runtimes.onnxruntime.export import onnx_recipe_support
from planner.schemes import SCHEMES

ROOT = Path(__file__).resolve().parent.parent
# The 8da schemes live in recipes/edge.toml, out of the default set until an edge runtime verifies them.
RECIPES = {recipe.name: recipe for recipe in [*default_recipes(), *load_recipe_file(ROOT / "recipes" / "edge.toml")]}
NEW_SCHEMES = ["8da4w-g32", "8da8w"]


def _stored_bytes(tensor: torch.Tensor) -> int:
    names, _ = tensor.__tensor_flatten__()
    return sum(getattr(tensor, name).nbytes for name in names)


class ThreeLinear(nn.Module):
    """Widths every grouped scheme divides (256, 128 by 32 and 128), one layer 8da4w-g32 cannot take (in 100)."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(256, 128)
        self.down = nn.Linear(128, 100, bias=False)
        self.head = nn.Linear(100, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.down(torch.relu(self.up(x)))))


# ---- the registry ----

def test_every_scheme_file_registers_one_scheme() -> None:
    files = sorted(p.stem for p in (ROOT / "planner" / "schemes").glob("*.py") if p.stem not in ("__init__", "base"))
    modules = sorted(type(scheme).__module__.rsplit(".", 1)[1] for scheme in SCHEMES.values())
    assert modules == files
    assert {"8da4w", "8da8w", "int4-weight-only", "int8-dynamic"} <= set(SCHEMES)


@pytest.mark.parametrize("toml", sorted((ROOT / "recipes").glob("*.toml")), ids=lambda path: path.name)
def test_every_quantize_name_in_the_recipe_files_resolves(toml: Path) -> None:
    tables = tomllib.loads(toml.read_text())["recipe"]
    for table in tables:
        if "quantize" in table:
            assert table["quantize"] in SCHEMES, (toml.name, table["name"])
    for recipe in load_recipe_file(toml):  # and the loader accepts every one
        assert recipe.quantize is None or recipe.scheme is SCHEMES[recipe.quantize]


def test_every_scheme_is_in_the_docs_table() -> None:
    docs = (ROOT / "docs" / "recipes.md").read_text()
    for name in SCHEMES:
        assert f"| `{name}` |" in docs, name


DEMO_SCHEME = '''
from planner.schemes.base import Scheme, TensorLayout, register


@register
class Demo(Scheme):
    name = "demo-2bit"
    summary = "a scheme that exists only in this test"
    torchao_config = "none"

    def make_config(self, settings):
        raise NotImplementedError

    def layout(self, out_features, in_features, settings):
        return TensorLayout(out_features * in_features // 4, out_features * 2, storages=2)
'''


def test_a_new_scheme_file_is_picked_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One file in the package folder and a [[recipe]] naming it: the footprint already prices it."""
    (tmp_path / "zz_demo.py").write_text(DEMO_SCHEME)
    monkeypatch.setattr(planner.schemes, "__path__", [*planner.schemes.__path__, str(tmp_path)])
    try:
        planner.schemes.load_scheme_files()
        assert "demo-2bit" in SCHEMES
        toml = tmp_path / "demo.toml"
        toml.write_text('[[recipe]]\nname = "demo"\nquantize = "demo-2bit"\n')
        (recipe,) = load_recipe_file(toml)
        with torch.device("meta"):
            model = nn.Sequential(nn.Linear(64, 32, bias=False))
        footprint = weight_footprint(model, recipe)
        assert footprint.weight_bytes == 32 * 64 // 4 + 32 * 2
    finally:
        SCHEMES.pop("demo-2bit", None)
        sys.modules.pop("planner.schemes.zz_demo", None)


def test_a_second_scheme_with_a_taken_name_is_refused() -> None:
    from planner.schemes.base import register

    class Clash(type(SCHEMES["8da8w"])):  # type: ignore[misc]
        pass

    with pytest.raises(ValueError, match="two schemes named '8da8w'"):
        register(Clash)
    assert type(SCHEMES["8da8w"]) is not Clash


# ---- 8da4w / 8da8w against real torchao tensors ----

@pytest.mark.parametrize("name", NEW_SCHEMES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_new_layouts_match_the_real_and_the_meta_state_dict(name: str, dtype: str) -> None:
    recipe = Recipe(name, dtype=dtype, quantize=RECIPES[name].quantize, group_size=RECIPES[name].group_size)
    torch.manual_seed(0)
    real, _ = apply_recipe(ThreeLinear(), recipe)
    weightless, note = weightless_recipe_model(ThreeLinear().to("meta"), recipe)
    assert note == ""  # quantized on meta, not traced on the float model
    footprint = weight_footprint(ThreeLinear().to("meta"), recipe)
    layers = {layer.name: layer for layer in footprint.layers}
    for fqn in ("up", "down", "head"):
        if not layers[fqn].quantized:
            continue
        for model in (real, weightless):
            weight = model.get_submodule(fqn).weight
            assert type(weight).__name__ == "IntxUnpackedToInt8Tensor"
            names, _ = weight.__tensor_flatten__()
            assert [getattr(weight, n).dtype for n in names] == [torch.int8, recipe.torch_dtype, torch.int8]
            out_f, in_f = weight.shape
            layout = SCHEMES[recipe.quantize].layout(out_f, in_f, recipe)
            assert (layout.total_bytes, layout.storages) == (_stored_bytes(weight), len(names))
    real_bytes = sum(_stored_bytes(t) if hasattr(t, "__tensor_flatten__") else t.nbytes
                     for t in real.state_dict().values())
    assert footprint.weight_bytes == real_bytes


def test_8da4w_leaves_layers_without_whole_groups_and_says_why() -> None:
    recipe = RECIPES["8da4w-g32"]
    assert quantization_decision(nn.Linear(100, 16), recipe) == (False, "in_features 100 not divisible by group 32")
    assert quantization_decision(nn.Linear(128, 100), recipe) == (True, "")
    assert quantization_decision(nn.Linear(100, 16), RECIPES["8da8w"]) == (True, "")  # per channel: any width


@pytest.mark.parametrize("name", NEW_SCHEMES)
def test_new_schemes_round_trip_through_weights_only_mmap(name: str, tmp_path: Path) -> None:
    from planner.analysis.artifact import load_weights_into
    from planner.recipes.recipe import import_tensor_types

    torch.manual_seed(0)
    model, _ = apply_recipe(ThreeLinear(), RECIPES[name])
    path = tmp_path / "artifact.pt"
    torch.save(model.state_dict(), path)
    import_tensor_types()
    loaded = torch.load(path, weights_only=True, mmap=True)
    reloaded = load_weights_into(ThreeLinear().to("meta"), loaded)  # as the verification worker loads it
    x = torch.randn(4, 256)
    assert torch.equal(reloaded(x), model(x))
    disk = weight_footprint(ThreeLinear().to("meta"), RECIPES[name]).disk_bytes
    assert path.stat().st_size == pytest.approx(disk, rel=0.02, abs=600)


@pytest.mark.parametrize("name", NEW_SCHEMES)
def test_new_schemes_quantize_activations_and_stay_close_to_fp32(name: str) -> None:
    torch.manual_seed(0)
    reference = ThreeLinear()
    x = torch.randn(8, 256)
    expected = reference(x)
    model, _ = apply_recipe(reference, RECIPES[name])
    assert model.up.weight.activation_quantization == "int8_asym_per_token"
    got = model(x)
    sqnr = 20 * torch.log10(expected.norm() / (expected - got).norm())
    assert sqnr > (15 if name == "8da4w-g32" else 30)


@pytest.mark.parametrize("name", NEW_SCHEMES)
def test_onnx_rows_of_the_new_schemes_say_why_they_are_unsupported(name: str) -> None:
    reason = onnx_recipe_support(RECIPES[name])
    assert reason is not None and reason.startswith(f"{RECIPES[name].quantize} is not realized on ONNX Runtime")


def test_a_mixed_recipe_writes_only_the_keys_its_scheme_reads(tmp_path: Path) -> None:
    overrides = (LayerOverride("up", "8da4w", group_size=64), LayerOverride("down", "8da8w", group_size=64),
                 LayerOverride("head", "intx-weight-only", bits=3, group_size=20, mapping="symmetric"))
    recipe = Recipe("mixed-test", layer_overrides=overrides)
    text = recipe_toml(recipe, ["test"], {})
    assert text.count("group_size") == 2 and "bits = 3" in text and 'mapping = "symmetric"' in text
    path = tmp_path / "mixed.toml"
    path.write_text(text)
    (loaded,) = load_recipe_file(path)
    assert [o.label for o in loaded.layer_overrides] == ["8da4w-g64", "8da8w", "intx3-g20"]
    assert loaded.layer_overrides[0] == overrides[0]
