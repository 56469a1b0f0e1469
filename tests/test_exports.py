"""The export manifest's load line works as written, in a fresh process with no planner code (issue 17)."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from planner.cli.commands import main

MODEL = textwrap.dedent('''
    import torch
    from torch import nn

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 64))
        return model.eval(), torch.randn(4, 256, generator=torch.Generator().manual_seed(0))
''')


def test_the_int4_load_line_runs_as_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """int4's tensors live in torchao's prototype module, which `import torchao` does not import: the line says so."""
    (tmp_path / "user_model.py").write_text(MODEL)
    export = tmp_path / "export"
    # The plan through planner.cli's main in this process (its workers are fresh processes either way); the load
    # line below is what must run with no planner code, and it runs in a fresh isolated interpreter.
    code = main(["plan", f"{tmp_path / 'user_model.py'}:build", "--budget", "1GB", "--backend", "torch", "--recipes",
                 "fp32,int4-g128", "--export", str(export), "--export-all", "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((export / "int4-g128" / "manifest.json").read_text())
    assert manifest["file"] == "int4-g128.pt"
    line = manifest["how_to_load"].split("  #")[0]
    assert "import torchao.prototype.quantization.int4" in line
    # The user's own build step in place of the placeholder; the file path as the manifest names it, from its folder.
    program = line.replace("model = <build the model>; ",
                           "import user_model; model = user_model.build()[0].to(torch.bfloat16); ")
    program += "; print(type(model[0].weight).__name__)"
    loaded = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(tmp_path)!r}); "
                             + program], cwd=export / "int4-g128", capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip().splitlines()[-1] == "Int4OpaqueTensor"


CONV1D_MODEL = textwrap.dedent('''
    import torch
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(Conv1D(128, 256), nn.ReLU(), Conv1D(64, 128))  # GPT-2's layer type
        return model.eval(), torch.randn(4, 256, generator=torch.Generator().manual_seed(0))
''')


def test_a_model_whose_layers_the_recipe_replaced_loads_as_its_line_says(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """transformers' Conv1D becomes nn.Linear so torchao quantizes it: the weights no longer fit the user's own
    architecture, so the line loads through planner.artifact.load_artifact, and that line runs as written."""
    (tmp_path / "conv1d_model.py").write_text(CONV1D_MODEL)
    export = tmp_path / "export"
    code = main(["plan", f"{tmp_path / 'conv1d_model.py'}:build", "--budget", "1GB", "--backend", "torch",
                 "--recipes", "fp32,int8-dynamic", "--export", str(export), "--export-all", "--out",
                 str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    lines = {name: json.loads((export / name / "manifest.json").read_text())["how_to_load"]
             for name in ("fp32", "int8-dynamic")}
    assert "<build the model>" in lines["fp32"] and "load_artifact" not in lines["fp32"].split("  #")[0]
    line = lines["int8-dynamic"].split("  #")[0]
    assert "load_artifact('.')" in line and "Conv1D" in lines["int8-dynamic"]
    loaded = subprocess.run([sys.executable, "-c", line + "; print(type(model[0]).__name__, "
                             "type(model[0].weight).__name__)"], cwd=export / "int8-dynamic", capture_output=True,
                            text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip().splitlines()[-1] == "Linear Int8Tensor"
