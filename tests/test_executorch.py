"""ExecuTorch as a runtime: which recipes lower to XNNPACK and why the others do not, the .pte's analytic size,
and one plan whose .pte artifacts are verified in fresh processes and load in a plain ExecuTorch runtime."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from planner.recipes.recipe import Recipe, default_recipes
from planner.runtimes.executorch.lower import (
    PTE_BASE_BYTES,
    build_pte,
    program_bytes,
    quantized_weight_bytes,
    realized_recipe,
    support,
)

ROOT = Path(__file__).resolve().parents[1]


def test_weight_only_and_bfloat16_are_refused_with_their_reason() -> None:
    by_name = {recipe.name: recipe for recipe in default_recipes()}
    assert "weight-only" in (support(by_name["int8-weight-only"]) or "")
    assert "8da4w is ExecuTorch's 4-bit path" in (support(by_name["int4-g128"]) or "")
    assert "bfloat16" in (support(by_name["bf16"]) or "")
    assert "float8" in (support(by_name["fp8-dynamic"]) or "")
    for name in ("fp32", "fp16", "int8-dynamic", "prune50-int8-dynamic", "struct50", "8da4w-g32"):
        assert support(by_name[name]) is None, name


def test_int8_dynamic_is_realized_as_8da8w() -> None:
    recipe = Recipe("int8-dynamic", quantize="int8-dynamic")
    assert realized_recipe(recipe).quantize == "8da8w"
    assert realized_recipe(Recipe("q", quantize="8da4w", group_size=64)).group_size == 64


def test_quantized_weight_bytes_follow_xnnpack_storage() -> None:
    # 4-bit values two per byte with one bfloat16 scale per group; int8 with one float32 scale per channel
    assert quantized_weight_bytes("8da4w", 4096, 1024, 32) == 4096 * 1024 // 2 + 4096 * 32 * 2
    assert quantized_weight_bytes("8da8w", 4096, 1024, 32) == 4096 * 1024 + 4096 * 4


def test_program_bytes_counts_a_tie_once_per_side() -> None:
    # XNNPACK serializes its own copy of a delegated weight: a head tied to an embedding (a portable gather) is
    # stored twice (GPT-2 small: 652 MB .pte), two delegated layers sharing a weight once
    with torch.device("meta"):
        embedding = nn.Embedding(1000, 64)
        head = nn.Linear(64, 1000, bias=False)
        first, second = nn.Linear(64, 64, bias=False), nn.Linear(64, 64, bias=False)
    head.weight = embedding.weight
    second.weight = first.weight
    counted = program_bytes(nn.Sequential(embedding, head), Recipe("fp32"))
    assert counted.constant_bytes == counted.delegated_bytes == 1000 * 64 * 4
    assert counted.split and counted.packing_bytes == 1000 * 64 * 4  # one subgraph's raw weights at a time
    assert counted.file_bytes >= 2 * 1000 * 64 * 4 + PTE_BASE_BYTES
    shared = program_bytes(nn.Sequential(first, nn.ReLU(), second), Recipe("fp32"))
    assert shared.delegated_bytes == 64 * 64 * 4 and not shared.split and shared.constant_bytes == 0


def _mlp_file(folder: Path) -> Path:
    path = folder / "mlp.py"
    path.write_text(
        "import torch\nfrom torch import nn\n\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(),\n"
        "                         nn.Linear(4096, 1024)).eval(), torch.randn(8, 1024)\n")
    return path


@pytest.fixture(scope="module")
def executorch_plan(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    # 25M parameters (100 MB in fp32): big enough that the model, not the runtime's few MB of first-use cost
    # (thread pool, paid at load or at the first run depending on the program), decides the runtime figure
    folder = tmp_path_factory.mktemp("executorch")
    out, export = folder / "out", folder / "export"
    command = [sys.executable, "-m", "planner.cli", "plan", f"{_mlp_file(folder)}:build", "--budget", "60MB",
               "--backend", "executorch", "--recipes", "fp32,int8-dynamic,8da4w-g32,int4-g128,bf16",
               "--verify", "all", "--out", str(out), "--export", str(export), "--export-all"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=folder, timeout=900)
    assert done.returncode in (0, 1), done.stdout + done.stderr
    plan = json.loads((out / "plan.json").read_text())
    return {"rows": {row["recipe"]: row for row in plan["rows"]}, "export": export, "plan": plan}


def test_recipes_lower_to_pte_and_verify(executorch_plan: dict[str, object]) -> None:
    rows = executorch_plan["rows"]
    assert isinstance(rows, dict)
    for name in ("fp32", "int8-dynamic", "8da4w-g32"):
        row = rows[name]
        assert row["backend"] == "executorch" and row["status"] == "verified", row
        # the analytic .pte within 2% of the file, the runtime within 10% of the fresh process's lifetime peak
        assert abs(row["disk_diff"]) < 0.02, (name, row["analytic_disk_bytes"], row["verified_disk_bytes"])
        assert abs(row["runtime_diff"]) < 0.10, (name, row["analytic_runtime_bytes"], row["verified_runtime_bytes"])
        assert row["verified_load_peak_bytes"] > 0 and row["latency_ms"] > 0
    # XNNPACK packs the weights at load: the raw and the packed copy at once, about twice the weights
    fp32 = rows["fp32"]
    assert fp32["verified_load_peak_bytes"] > 1.6 * fp32["verified_disk_bytes"]
    assert rows["8da4w-g32"]["verified_disk_bytes"] < 0.2 * fp32["verified_disk_bytes"]
    assert rows["int8-dynamic"]["sqnr_db"] > 25 and rows["8da4w-g32"]["sqnr_db"] > 10
    # the device runs ExecuTorch's C++ runtime, not the measured Python binding: not counted, and said so
    assert fp32["device_framework_bytes"] is None and fp32["device_framework_unmeasured"] is True
    assert fp32["framework_bytes"] > 100e6 and "C++ runtime is not measured" in fp32["note"]
    assert executorch_plan["plan"]["budget_on"] == "device"
    from planner.core import rank

    assert rank.measured_size(fp32, "device") == fp32["verified_runtime_bytes"]
    for name, words in (("int4-g128", "weight-only"), ("bf16", "bfloat16")):
        assert rows[name]["status"] == "unsupported" and words in rows[name]["note"], rows[name]


def test_exported_pte_runs_in_a_plain_executorch_runtime(executorch_plan: dict[str, object]) -> None:
    export = executorch_plan["export"]
    assert isinstance(export, Path)
    folder = next(path for path in export.iterdir() if path.name.startswith("8da4w-g32"))
    pte = next(folder.glob("*.pte"))
    manifest = json.loads((folder / "manifest.json").read_text())
    assert "executorch.runtime" in manifest["how_to_load"]
    script = ("import sys, torch; from executorch.runtime import Runtime\n"
              "method = Runtime.get().load_program(sys.argv[1]).load_method('forward')\n"
              "out = method.execute([torch.randn(8, 1024)])[0]\n"
              "assert tuple(out.shape) == (8, 1024) and torch.isfinite(out).all(), out.shape\n"
              "print('ran', tuple(out.shape))\n")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-I", "-c", script, str(pte)], capture_output=True, text=True,
                          cwd=ROOT.parent, env=env, timeout=300)
    assert done.returncode == 0 and "ran (8, 1024)" in done.stdout, done.stderr[-2000:]


def test_float16_layer_norm_keeps_its_precision(tmp_path: Path) -> None:
    """ExecuTorch's portable float16 layer_norm on 768 features measured -18.6 dB against eager float16; fp16
    programs compute LayerNorm in float32 from the same float16 weights, and match eager float16."""
    from executorch.runtime import Runtime

    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(100, 768), nn.LayerNorm(768), nn.Linear(768, 10)).eval()
    with torch.no_grad():
        model[0].weight.mul_(0.03)  # embedding scale as in GPT-2 and BERT: where float16 accumulation fails
        ids = torch.randint(0, 100, (1, 32))
        expected = model.half()(ids).float()
    fp16 = next(recipe for recipe in default_recipes() if recipe.name == "fp16")
    target, _, notes = build_pte(model, (ids,), fp16, tmp_path)
    assert any("1 LayerNorm(s) computed in float32" in note for note in notes)
    output = Runtime.get().load_program(str(target)).load_method("forward").execute([ids])[0].float()
    sqnr = 10 * torch.log10((expected**2).sum() / ((output - expected) ** 2).sum())
    assert sqnr > 40, float(sqnr)


def test_a_tied_head_is_quantized_on_executorch_where_a_tie_is_stored_twice_anyway(tmp_path: Path) -> None:
    """keep_ties keeps a head tied to its embedding float, so torch stores the pair once. XNNPACK stores its own
    copy of a delegated Linear's weight whatever it is, so on ExecuTorch the head follows the recipe: the second
    copy is 4-bit, not float (GPT-2 8da4w: the float head was 154 MB of a 360 MB .pte)."""
    from tied_lm import TiedLM

    from planner.analysis.footprint import analytic_footprint
    from planner.recipes.recipe import keep_ties, untied
    from planner.runtimes.executorch.runtime import ExecuTorchRuntime

    torch.manual_seed(0)
    model = TiedLM(4000, 128).eval()
    with torch.device("meta"):
        meta_model = TiedLM(4000, 128)
    ids = (torch.randint(0, 4000, (1, 16)),)
    recipe, note = keep_ties(meta_model, next(r for r in default_recipes() if r.name == "8da4w-g32"))
    assert note and "head kept in float32" in note
    # the row's job reaches the runtime as JSON: the mark must survive it
    plain, dropped = untied(Recipe.from_json(recipe.to_json()))
    assert dropped == ["head"] and untied(plain) == (plain, [])
    head_float = 4000 * 128 * 4
    kept_bytes = program_bytes(meta_model, realized_recipe(recipe)).file_bytes
    runtime = ExecuTorchRuntime()
    runtime.describe(meta_model, ids, [recipe], {recipe.name: analytic_footprint(meta_model, ids, recipe)})
    predicted = runtime.analytic(recipe, analytic_footprint(meta_model, ids, recipe))["analytic_disk_bytes"]
    assert predicted < kept_bytes - 0.8 * head_float
    path, _, _ = build_pte(model, ids, plain, tmp_path)
    assert abs(path.stat().st_size - predicted) < 0.02 * predicted, (path.stat().st_size, predicted)


def test_a_tied_lm_plans_on_every_runtime_with_its_tie_rule(tmp_path: Path) -> None:
    """The tie rule's mark travels to every build worker in the row's JSON: each must read it (the ONNX Runtime
    worker once refused it as an unknown [[recipe.layer]] key), torch and ONNX Runtime keep the head float, and
    ExecuTorch quantizes it; every file within 2% of its analytic figure."""
    command = [sys.executable, "-m", "planner.cli", "plan", f"{ROOT / 'tests' / 'tied_lm.py'}:build",
               "--budget", "1GB", "--backend", "torch,onnxruntime,executorch", "--recipes", "int8-dynamic",
               "--verify", "all", "--out", str(tmp_path / "out")]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {row["backend"]: row for row in json.loads((tmp_path / "out" / "plan.json").read_text())["rows"]
            if row["recipe"] == "int8-dynamic"}
    for backend, row in rows.items():
        assert row["status"] == "verified", (backend, row["note"])
        assert abs(row["disk_diff"]) < 0.02, (backend, row["analytic_disk_bytes"], row["verified_disk_bytes"])
    assert "head kept in float32: tied" in rows["torch"]["note"]
    assert "1 MatMul node(s) kept float" in rows["onnxruntime"]["note"]
    assert "head quantized as the recipe says, though tied" in rows["executorch"]["note"]
