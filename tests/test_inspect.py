"""`planner inspect`: the classic tutorial models, layer by layer, without weights."""

from pathlib import Path

import pandas as pd
import pytest
import torch

from planner.analysis.inspection import inspect_model
from planner.cli.commands import main
from planner.models.zoo import ZOO
from planner.recipes.recipe import default_recipes, select_recipes

RECIPES = select_recipes(default_recipes(), "fp32,int8-dynamic,int8-weight-only")


def inspect_zoo(name: str, batch: int = 1):
    with torch.device("meta"):
        model = ZOO[name].build()
    return inspect_model(model, ZOO[name].example_input(batch), RECIPES, batch)


def test_simplenet_parameters_and_bytes() -> None:
    layers = inspect_zoo("simplenet").layers.set_index("layer")
    assert layers.loc["fc1", "params"] == 100 * 50 + 50
    assert layers.loc["fc2", "params"] == 50 * 10 + 10
    assert layers.loc["fc1", "fp32 bytes"] == "20,200" and layers.loc["fc2", "fp32 bytes"] == "2,040"
    assert layers.loc["fc1", "int8-dynamic bytes"].endswith("*")  # quantized by the recipe
    assert layers["params"].sum() == 5560


def test_convnet_input_and_output_activation_sizes() -> None:
    inspection = inspect_zoo("convnet")
    layers = inspection.layers.set_index("layer")
    assert layers.loc["conv1", "output shape"] == "1×16×256×256"
    assert layers.loc["conv1", "output bytes"] == 16 * 256 * 256 * 4
    assert layers.loc["pool2", "output shape"] == "1×32×64×64"
    assert layers.loc["fc", "output bytes"] == 10 * 4
    # peak, not sum: conv1's output and its relu are alive together, nothing more
    assert inspection.activations["fp32"].peak_bytes == 2 * 16 * 256 * 256 * 4


def test_complexnet_table_is_instant_and_exact() -> None:
    inspection = inspect_zoo("complexnet")
    layers = inspection.layers.set_index("layer")
    assert layers.loc["fc1", "params"] == 128 * 64 * 64 * 1024 + 1024
    assert layers.loc["conv1", "output shape"] == "1×64×256×256"
    assert layers.loc["fc1", "int8-dynamic bytes"] == f"{128 * 64 * 64 * 1024 + 1024 * 5 + 1024 * 4:,}*"
    # weight-only int8 dequantizes fc1's whole weight to fp32 inside its matmul: the trace says where
    assert inspection.activations["int8-weight-only"].peak_module == "fc1"
    assert inspection.activations["int8-weight-only"].peak_bytes >= 1024 * 524288 * 4


def test_cli_sweeps_batch_sizes_and_writes_csv(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    target = tmp_path / "layers.csv"
    assert main(["inspect", "zoo:convnet", "--batch-size", "1,8", "--recipes", "fp32,bf16", "--csv",
                 str(target)]) == 0
    out = capsys.readouterr().out
    assert "conv1" in out and "totals" in out
    frame = pd.read_csv(target)
    conv1 = frame[frame["layer"] == "conv1"].set_index("batch")
    assert conv1.loc[8, "output bytes"] == 8 * conv1.loc[1, "output bytes"]


def test_cli_rejects_a_bad_batch_list(capsys: pytest.CaptureFixture) -> None:
    assert main(["inspect", "zoo:simplenet", "--batch-size", "1,x"]) == 2
    assert "--batch-size" in capsys.readouterr().err


def test_inspect_the_readme_gpt2_example(capsys: pytest.CaptureFixture[str]) -> None:
    """The README's public GPT-2 (default config) used to end in an internal error: its mask code calls .item(),
    which plain meta tensors refuse; the shapes now come from the same fake-tensor forward as the trace."""
    code = main(["inspect", "examples/public_models.py:gpt2_small", "--recipes", "fp32"])
    out = capsys.readouterr().out
    assert code == 0
    assert "124,439,808" in out and "lm_head" in out
