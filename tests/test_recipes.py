"""Recipe files, selection, and the layout arithmetic checked against real torchao tensors."""

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from planner.core.errors import PlannerError
from planner.recipes.recipe import (
    DEFAULT_RECIPES_FILE,
    SCHEMES,
    Recipe,
    apply_recipe,
    default_recipes,
    load_recipe_file,
    quantization_decision,
    select_recipes,
)


def test_default_set_covers_the_issue() -> None:
    recipes = {r.name: r for r in default_recipes()}
    for name in ("fp32", "fp16", "bf16", "int8-dynamic", "int8-weight-only", "int4-g128", "prune50",
                 "prune50-int8-dynamic", "struct50", "struct50-int8-dynamic",
                 "struct50-int4-g128"):
        assert name in recipes
    assert recipes["int4-g128"].quantize == "int4-weight-only" and recipes["int4-g128"].dtype == "bfloat16"
    assert "Linear" in recipes["int8-dynamic"].touches()


def test_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[[recipe]]\nname = "a"\ndtype = float32\n')
    with pytest.raises(PlannerError, match="line 3") as error:
        load_recipe_file(path)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ('name = "a"\nquantise = "int8-dynamic"', "unknown key 'quantise'"),
        ('name = "a"\ndtype = "float64"', "dtype 'float64'"),
        ('name = "a"\nquantize = "int3"', "quantize 'int3'"),
        ('name = "a"\nprune = 1.5', "prune must be"),
        ('name = "a"\ngroup_size = 0', "group_size"),
        ('name = "a"\nlayers = []', "layers must be"),
        ('dtype = "float32"', "needs a name"),
    ],
)
def test_invalid_recipes_are_named(tmp_path: Path, body: str, expected: str) -> None:
    path = tmp_path / "r.toml"
    path.write_text("[[recipe]]\n" + body + "\n")
    with pytest.raises(PlannerError, match=expected):
        load_recipe_file(path)


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(PlannerError, match="no such file"):
        load_recipe_file(tmp_path / "nope.toml")
    (tmp_path / "empty.toml").write_text("")
    with pytest.raises(PlannerError, match="empty"):  # a regular-file check (safe_io) before parsing
        load_recipe_file(tmp_path / "empty.toml")
    (tmp_path / "comments.toml").write_text("# only a comment\n")
    with pytest.raises(PlannerError, match="no \\[\\[recipe\\]\\]"):
        load_recipe_file(tmp_path / "comments.toml")


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=200))
def test_recipe_parser_never_crashes(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "r.toml"
    path.write_text(text, encoding="utf-8")
    try:
        recipes = load_recipe_file(path)
    except PlannerError as error:
        assert "\n" not in str(error)
    else:
        assert recipes


def test_select_by_name_and_suggest() -> None:
    available = default_recipes()
    assert [r.name for r in select_recipes(available, "int8-dynamic, fp32")] == ["int8-dynamic", "fp32"]
    with pytest.raises(PlannerError, match="did you mean int8-dynamic"):
        select_recipes(available, "int8-dynamik")


def _stored_bytes(tensor: torch.Tensor) -> int:
    names, _ = tensor.__tensor_flatten__()
    return sum(getattr(tensor, name).nbytes for name in names)


@pytest.mark.parametrize("name", ["int8-dynamic", "int8-weight-only", "int4-g128", "intx4-g32-unpacked",
                                  "fp8-weight-only", "8da4w-g32", "8da8w"])
def test_layout_arithmetic_matches_torchao(name: str) -> None:
    edge = load_recipe_file(DEFAULT_RECIPES_FILE.with_name("edge.toml"))  # the 8da schemes' recipes
    recipe = next(r for r in [*default_recipes(), *edge] if r.name == name)
    layer = nn.Linear(256, 96)
    quantized, _ = quantization_decision(layer, recipe)
    assert quantized
    model, _ = apply_recipe(nn.Sequential(layer), recipe)
    weight = model[0].weight
    assert type(weight).__name__ != "Parameter"  # really quantized
    layout = SCHEMES[recipe.quantize].layout(96, 256, recipe)
    assert layout.total_bytes == _stored_bytes(weight)
    names, _ = weight.__tensor_flatten__()
    assert layout.storages == len(names)


def test_int4_packing_is_really_4_bit() -> None:
    recipe = next(r for r in default_recipes() if r.name == "int4-g128")
    layout = SCHEMES["int4-weight-only"].layout(1024, 4096, recipe)
    assert layout.payload_bytes == 1024 * 4096 // 2


def test_layers_the_int4_kernel_cannot_take_are_named() -> None:
    recipe = next(r for r in default_recipes() if r.name == "int4-g128")
    assert quantization_decision(nn.Linear(256, 10), recipe) == (False, "out_features 10 not divisible by 16")
    assert quantization_decision(nn.Linear(200, 32), recipe)[1] == "in_features 200 not divisible by group 128"
    model, _ = apply_recipe(nn.Sequential(nn.Linear(256, 10)), recipe)
    assert isinstance(model[0].weight, nn.Parameter) and model[0].weight.dtype == torch.bfloat16


def test_attention_out_proj_is_left_alone() -> None:
    recipe = next(r for r in default_recipes() if r.name == "int8-dynamic")
    attention = nn.MultiheadAttention(64, 4)
    quantized, reason = quantization_decision(attention.out_proj, recipe)
    assert not quantized and "out_proj" in reason


def test_pruning_zeroes_but_keeps_shapes() -> None:
    recipe = next(r for r in default_recipes() if r.name == "prune50")
    model, notes = apply_recipe(nn.Sequential(nn.Linear(64, 64)), recipe)
    weight = model[0].weight
    assert notes == ["50% of pruned weights are zero, stored sparse where smaller (the file shrinks), "
                     "loaded dense (memory does not)"]
    assert weight.shape == (64, 64)
    assert int((weight == 0).sum()) == 64 * 64 // 2


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.7, 0.9])
def test_magnitude_threshold_matches_kthvalue(fraction: float) -> None:
    from planner.recipes.recipe import magnitude_threshold

    weight = torch.randn(300, 70, generator=torch.Generator().manual_seed(1))
    k = int(np.ceil(fraction * weight.numel()))
    assert magnitude_threshold(weight, fraction) == float(weight.abs().view(-1).kthvalue(k).values)


@pytest.mark.parametrize("seed", range(5))
def test_magnitude_threshold_with_ties_and_zeros(seed: int) -> None:
    from planner.recipes.recipe import magnitude_threshold

    generator = torch.Generator().manual_seed(seed)
    weight = torch.randint(-3, 4, (97, 13), generator=generator).float() * 0.25
    for fraction in (0.1, 0.5, 0.77):
        k = int(np.ceil(fraction * weight.numel()))
        assert magnitude_threshold(weight, fraction) == float(weight.abs().view(-1).kthvalue(k).values)


def test_prune_then_quantize() -> None:
    recipe = next(r for r in default_recipes() if r.name == "prune50-int8-dynamic")
    model, notes = apply_recipe(nn.Sequential(nn.Linear(64, 64)), recipe)
    assert type(model[0].weight).__name__ == "Int8Tensor"
    assert int((model[0].weight.qdata == 0).sum()) >= 64 * 64 // 2
    assert "50%" in notes[0]


@pytest.mark.parametrize(("name", "keeps_zeros"), [("prune50-int8-dynamic", True), ("prune50-int4-g128", False)])
def test_a_quantized_pruned_layer_says_whether_it_kept_its_zeros(name: str, keeps_zeros: bool) -> None:
    """int8 is symmetric: a zero stays zero. torchao's int4 is asymmetric with a zero point that is not an
    integer: read back through the layer, none of the pruned zeros is zero, and the row's note says so."""
    recipe = next(r for r in default_recipes() if r.name == name)
    torch.manual_seed(0)
    model, notes = apply_recipe(nn.Sequential(nn.Linear(512, 128), nn.ReLU(), nn.Linear(128, 64)), recipe)
    said = [note for note in notes if "pruned zeros" in note]
    if keeps_zeros:
        assert said == []
        assert int((model[0].weight.qdata == 0).sum()) >= 512 * 128 // 2
    else:
        assert len(said) == 1 and "kept 0% of the pruned zeros" in said[0] and "2 layer(s)" in said[0], said
        units = torch.eye(512, dtype=torch.bfloat16)[:32]  # the same read-back, by hand, on the first layer
        read = (model[0](units) - model[0](torch.zeros(1, 512, dtype=torch.bfloat16))).float()
        assert int((read == 0).sum()) < read.numel() // 100


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.9])
def test_magnitude_threshold_sampled_bracket_is_exact(fraction: float) -> None:
    """Above the sample size the k-th value comes from a sampled bracket; it must still be exact, also for a
    layout that defeats a strided sample (sorted magnitudes) and so exercises the histogram fallback."""
    from planner.recipes.recipe import magnitude_threshold

    generator = torch.Generator().manual_seed(3)
    for weight in (torch.randn(4000, 50, generator=generator), torch.linspace(-1, 1, 200_000).sort().values,
                   torch.randint(-5, 6, (100_000,), generator=generator).float()):
        k = int(np.ceil(fraction * weight.numel()))
        assert magnitude_threshold(weight, fraction, sample_size=1000) == float(
            weight.abs().view(-1).kthvalue(k).values)


def _conv1d_stack() -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    return nn.Sequential(Conv1D(64, 32), nn.GELU(), Conv1D(40, 64))  # Conv1D(nf=out, nx=in), weight (in, out)


def test_conv1d_is_quantized_as_the_linear_it_is(tmp_path: Path) -> None:
    """transformers' Conv1D (GPT-2's projections) becomes nn.Linear, is quantized, and a weightless structure
    rebuilt the same way (as the verification worker and load_artifact do) loads the saved artifact."""
    import copy

    from planner.analysis.artifact import load_weights_into
    from planner.analysis.footprint import weight_footprint
    from planner.recipes.recipe import Recipe, import_tensor_types, linearize_conv1d

    import_tensor_types()
    original = _conv1d_stack().eval()
    int4, int8 = Recipe("int4", dtype="bfloat16", quantize="int4-weight-only", group_size=32), \
        Recipe("int8", quantize="int8-dynamic")
    assert quantization_decision(original[0], int4) == (True, "")  # shape read as (out 64, in 32)
    assert quantization_decision(original[2], int4) == (False, "out_features 40 not divisible by 16")

    inputs = torch.randn(3, 7, 32)
    quantized, notes = apply_recipe(copy.deepcopy(original), int8)
    assert [type(m).__name__ for m in quantized] == ["Linear", "GELU", "Linear"]
    assert type(quantized[0].weight).__name__ == "Int8Tensor" and "Conv1D" in notes[0]
    with torch.inference_mode():
        expected, got = original(inputs), quantized(inputs)
    assert 10 * torch.log10(expected.pow(2).sum() / (expected - got).pow(2).sum()) > 25

    path = tmp_path / "artifact.pt"
    torch.save(quantized.state_dict(), path)
    with torch.device("meta"):
        structure = _conv1d_stack()
    assert linearize_conv1d(structure, int8) == ["0", "2"]
    load_weights_into(structure, torch.load(path, weights_only=True))
    with torch.inference_mode():
        assert torch.equal(structure.eval()(inputs), got)
    with torch.device("meta"):
        analytic = weight_footprint(_conv1d_stack(), int8)
    assert analytic.quantized_layers == 2
    assert analytic.disk_bytes == pytest.approx(path.stat().st_size, rel=0.03)


def _tied_lm() -> nn.Module:
    from tied_lm import TiedLM

    with torch.device("meta"):
        return TiedLM()


def test_a_tied_head_stays_tied_and_float() -> None:
    from planner.analysis.footprint import weight_footprint
    from planner.recipes.recipe import LayerOverride, keep_ties

    model = _tied_lm()
    recipe = Recipe("int8", quantize="int8-dynamic")
    kept, note = keep_ties(model, recipe)
    assert [(o.fqn, o.quantize) for o in kept.layer_overrides] == [("head", None)]
    assert note is not None and note.startswith("head kept in float32: tied")
    # quantizing the head would have stored a second copy: the kept recipe is smaller on disk, and the body still
    # quantizes
    assert weight_footprint(model, kept).disk_bytes < weight_footprint(model, recipe).disk_bytes
    assert weight_footprint(model, kept).quantized_layers == 2
    # a head the user names in a [[recipe.layer]] table is their choice; a float recipe has nothing to keep
    chosen = Recipe("int8", quantize="int8-dynamic", layer_overrides=(LayerOverride("head", "int8-dynamic"),))
    assert keep_ties(model, chosen) == (chosen, None)
    assert keep_ties(model, Recipe("bf16", dtype="bfloat16")) == (Recipe("bf16", dtype="bfloat16"), None)


def test_the_llm_recipe_file_has_group_64_and_embedding_quantization() -> None:
    recipes = {r.name: r for r in load_recipe_file(DEFAULT_RECIPES_FILE.with_name("llm.toml"))}
    assert recipes["int4-g64"].group_size == 64 and recipes["int4-g64"].dtype == "bfloat16"
    embedding = recipes["intx8-g64-emb"]
    assert quantization_decision(nn.Embedding(1000, 64), embedding) == (True, "")
    model = nn.Sequential(nn.Embedding(1000, 64), nn.Linear(64, 64))
    apply_recipe(model, embedding)
    assert type(model[0].weight).__name__ == "IntxUnpackedToInt8Tensor"
    assert model(torch.randint(0, 1000, (2, 8))).shape == (2, 8, 64)
