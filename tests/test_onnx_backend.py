"""The ONNX Runtime backend: export, quantize in ONNX, predict file sizes, verify in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from planner.measure.isolation import Limits, run_worker
from planner.measure.library import compare_outputs, floating_tensors
from planner.models.zoo import ZOO
from planner.recipes.recipe import DEFAULT_RECIPES_FILE, Recipe, UnsupportedRecipe, default_recipes, load_recipe_file
from planner.runtimes.onnxruntime import export as backend
from planner.runtimes.onnxruntime.worker import make_job, save_inputs_npz

EDGE_RECIPES = DEFAULT_RECIPES_FILE.with_name("edge.toml")
RECIPES = {recipe.name: recipe for recipe in [*default_recipes(), *load_recipe_file(EDGE_RECIPES)]}
ZOO_MODELS = ("simplenet", "convnet", "tinylm")
SUPPORTED = ("fp32", "fp16", "int8-dynamic", "int4-g128")


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 1024))


def _mlp_input(batch: int) -> tuple[torch.Tensor, ...]:
    return (torch.randn(8 * batch, 1024, generator=torch.Generator().manual_seed(0)),)


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[int], tuple[torch.Tensor, ...]]]] = {
    **{name: (ZOO[name].build, ZOO[name].example_input) for name in ZOO_MODELS},
    "mlp": (_mlp, _mlp_input),
}


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)  # every build of a model must hold the same weights as its reference
    return MODELS[name][0]().eval()


class Artifacts:
    """Each (model, recipe) artifact built once per test module, with the torch reference outputs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.built: dict[tuple[str, str], tuple[Path, list[str]]] = {}

    def inputs(self, model: str) -> tuple[torch.Tensor, ...]:
        return MODELS[model][1](1)

    def reference(self, model: str) -> list[torch.Tensor]:
        with torch.no_grad():
            return [t.float() for t in floating_tensors(_build(model)(*self.inputs(model)))]

    def get(self, model: str, recipe: Recipe) -> tuple[Path, list[str]]:
        key = (model, recipe.name)
        if key not in self.built:
            workdir = self.root / model
            workdir.mkdir(exist_ok=True)
            self.built[key] = backend.build_onnx_artifact(_build(model), self.inputs(model), recipe, workdir)
        return self.built[key]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Artifacts:
    return Artifacts(tmp_path_factory.mktemp("onnx"))


def _run(path: Path, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {meta.name: tensor.numpy() for meta, tensor in zip(session.get_inputs(), inputs, strict=True)}
    outputs = zip(session.run(None, feeds), session.get_outputs(), strict=True)
    return [torch.from_numpy(value).float() for value, meta in outputs if meta.type == "tensor(float)"]


def _sqnr(artifacts: Artifacts, model: str, recipe: str) -> float:
    path, _ = artifacts.get(model, RECIPES[recipe])
    return compare_outputs(artifacts.reference(model), _run(path, artifacts.inputs(model)))["sqnr_db"]


@pytest.mark.parametrize("model", ZOO_MODELS)
def test_fp32_export_runs_in_onnxruntime_and_matches_torch(artifacts: Artifacts, model: str) -> None:
    path, _ = artifacts.get(model, RECIPES["fp32"])
    graph = onnx.load(str(path)).graph
    assert [value.name for value in graph.output] == ["output"]  # one tensor out
    assert [value.name for value in graph.input] == [{"tinylm": "ids"}.get(model, "x")]  # forward()'s argument
    assert all(not node.metadata_props for node in graph.node)  # no stack traces with local paths
    assert _sqnr(artifacts, model, "fp32") > 80


@pytest.mark.parametrize(("model", "recipe"), [("tinylm", "fp32"), ("tinylm", "int8-dynamic"),
                                               ("tinylm", "int4-g128"), ("convnet", "fp16")])
def test_exports_take_any_batch_and_sequence(artifacts: Artifacts, model: str, recipe: str) -> None:
    """Exports have a dynamic batch axis, and a dynamic sequence axis on token ids, named so; a batch of three
    of a shorter sequence runs and matches torch."""
    path, _ = artifacts.get(model, RECIPES[recipe])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (declared,) = session.get_inputs()
    tokens = model == "tinylm"
    assert declared.shape[:2] == (["batch", "sequence"] if tokens else ["batch", 3])
    example = artifacts.inputs(model)[0]
    other = torch.cat([example[:, :100] if tokens else example] * 3)
    (logits,) = session.run(None, {declared.name: other.numpy()})
    with torch.no_grad():
        expected = _build(model)(other)
    assert logits.shape == tuple(expected.shape)
    ceiling = {"fp32": 1e-4, "fp16": 5e-2}.get(recipe)
    if ceiling is not None:
        assert float((torch.from_numpy(logits).float() - expected).abs().max()) < ceiling
    else:  # quantized: close to torch, as the recipe's SQNR says
        assert compare_outputs([expected], [torch.from_numpy(logits).float()])["sqnr_db"] > 10


@pytest.mark.parametrize("model", ZOO_MODELS)
def test_int8_dynamic_quantizes_every_linear_and_keeps_accuracy(artifacts: Artifacts, model: str) -> None:
    path, notes = artifacts.get(model, RECIPES["int8-dynamic"])
    setting = "reduce_range=True" if backend.int8_reduce_range() else "reduce_range=False"
    assert any(setting in note for note in notes)  # the row says which setting this CPU got
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "Gemm" not in ops and "MatMulInteger" in ops
    assert backend.count_quantized_nodes(path, "int8-dynamic") == len(backend.onnx_matmul_weights(_build(model)))
    assert _sqnr(artifacts, model, "int8-dynamic") > 25


@pytest.mark.parametrize("model", ["tinylm", "convnet"])
def test_int8_dynamic_without_shape_inference_is_the_same_model(artifacts: Artifacts, model: str, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The exporter declares every MatMul input's type, so quantize_dynamic's shape inference (a save and reload
    of the whole model: 15 s of a 1 GB build) is skipped; with it forced, the quantized model is the same."""
    fp32, _ = artifacts.get(model, RECIPES["fp32"])
    assert backend.declares_matmul_input_types(onnx.load(str(fp32)))
    backend._quantize_int8_dynamic(fp32, tmp_path / "skipped.onnx")
    monkeypatch.setattr(backend, "declares_matmul_input_types", lambda _: False)
    backend._quantize_int8_dynamic(fp32, tmp_path / "inferred.onnx")
    skipped, inferred = (onnx.load(str(tmp_path / name)).graph for name in ("skipped.onnx", "inferred.onnx"))
    assert [node.op_type for node in skipped.node] == [node.op_type for node in inferred.node]
    assert "MatMulInteger" in {node.op_type for node in skipped.node}
    assert {t.name: t.raw_data for t in skipped.initializer} == {t.name: t.raw_data for t in inferred.initializer}
    inputs = artifacts.inputs(model)
    assert all(torch.equal(a, b) for a, b in zip(_run(tmp_path / "skipped.onnx", inputs),
                                                  _run(tmp_path / "inferred.onnx", inputs), strict=True))


def test_int4_reaches_the_gemm_layers_and_shrinks_the_file(artifacts: Artifacts) -> None:
    fp32, _ = artifacts.get("mlp", RECIPES["fp32"])
    assert {node.op_type for node in onnx.load(str(fp32)).graph.node} == {"Gemm", "Relu"}
    int4, notes = artifacts.get("mlp", RECIPES["int4-g128"])
    ops = [node.op_type for node in onnx.load(str(int4)).graph.node]
    assert ops.count("MatMulNBits") == 2 and "Gemm" not in ops and "MatMul" not in ops
    assert any("2 Gemm node(s) rewritten" in note for note in notes)
    assert backend.onnx_file_bytes(int4) <= 0.17 * backend.onnx_file_bytes(fp32)
    assert _sqnr(artifacts, "mlp", "int4-g128") > 15


@pytest.mark.parametrize("model", [*ZOO_MODELS, "mlp"])
def test_analytic_file_bytes_within_3_percent(artifacts: Artifacts, model: str) -> None:
    extra = (Recipe("int4-g32-sym", quantize="int4-weight-only", group_size=32, mapping="symmetric"),
             RECIPES["prune50-int8-dynamic"])
    with torch.device("meta"):
        meta_model = MODELS[model][0]()
    for recipe in [*(RECIPES[name] for name in SUPPORTED), *(extra if model == "mlp" else ())]:
        path, _ = artifacts.get(model, recipe)
        real = backend.onnx_file_bytes(path)
        predicted = backend.analytic_onnx_bytes(meta_model, recipe)
        assert abs(predicted - real) <= 0.03 * real, (recipe.name, predicted, real)


def test_recipe_support() -> None:
    for name in ("fp32", "fp16", "int8-dynamic", "int4-g128", "prune50", "prune50-int8-dynamic", "prune50-int4-g128"):
        assert backend.onnx_recipe_support(RECIPES[name]) is None, name
    for name in ("bf16", "int8-weight-only", "fp8-weight-only", "fp8-dynamic", "intx4-g32-unpacked"):
        reason = backend.onnx_recipe_support(RECIPES[name])
        assert reason and "no ONNX Runtime CPU equivalent" in reason, name
    odd_block = Recipe("int4-g48", quantize="int4-weight-only", group_size=48)
    assert "power-of-two" in (backend.onnx_recipe_support(odd_block) or "")
    with pytest.raises(UnsupportedRecipe):
        backend.build_onnx_artifact(nn.Linear(4, 4), (torch.randn(1, 4),), RECIPES["bf16"], Path("/nonexistent"))


def test_pruning_is_applied_before_export(tmp_path: Path) -> None:
    path, notes = backend.build_onnx_artifact(_build("simplenet"), MODELS["simplenet"][1](1), RECIPES["prune50"],
                                              tmp_path)
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    assert (weights["fc1.weight"] == 0).mean() >= 0.5
    assert any("pruned" in note for note in notes)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prune50.onnx"]  # the float intermediate is gone


def test_gemm_rewrite_keeps_the_result() -> None:
    weight = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    bias = np.arange(3, dtype=np.float32)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 5])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])],
        [onnx.numpy_helper.from_array(weight, "w"), onnx.numpy_helper.from_array(bias, "b")])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 10
    assert backend.gemm_to_matmul(model) == 1
    assert [node.op_type for node in model.graph.node] == ["MatMul", "Add"]
    assert [list(t.dims) for t in model.graph.initializer if t.name.startswith("w")] == [[5, 3]]
    x = np.ones((2, 5), dtype=np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x": x})[0], x @ weight.T + bias, rtol=1e-5)


def test_external_data_above_the_threshold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backend, "EXTERNAL_DATA_THRESHOLD_BYTES", 10_000)
    path = tmp_path / "fp32.onnx"
    backend.export_fp32(_build("simplenet"), MODELS["simplenet"][1](1), path)
    data = tmp_path / "fp32.onnx.data"
    assert data.exists() and path.stat().st_size < 10_000
    assert backend.onnx_file_bytes(path) == path.stat().st_size + data.stat().st_size
    int8, _ = backend.build_onnx_artifact(path, MODELS["simplenet"][1](1), RECIPES["int8-dynamic"], tmp_path)
    assert len(_run(int8, MODELS["simplenet"][1](1))) == 1


def test_worker_end_to_end(artifacts: Artifacts, tmp_path: Path) -> None:
    path, _ = artifacts.get("tinylm", RECIPES["int8-dynamic"])
    save_inputs_npz(artifacts.inputs("tinylm"), tmp_path / "inputs.npz")
    torch.save(artifacts.reference("tinylm"), tmp_path / "reference.pt")
    job = make_job(path, tmp_path / "inputs.npz", tmp_path / "reference.pt")
    options = Limits(timeout_s=120)
    result = run_worker(job, tmp_path, "onnx", options, worker="planner.runtimes.onnxruntime.worker")
    assert result["status"] == "verified", result
    for key in ("verified_runtime_bytes", "verified_weight_resident_bytes", "verified_activation_bytes",
                "latency_ms", "sqnr_db", "max_abs_error", "top1_agreement", "output_shapes"):
        assert key in result
    assert result["sqnr_db"] > 25 and result["output_shapes"] == [[1, 128, 2048]]
    assert result["verified_weight_resident_bytes"] > backend.onnx_file_bytes(path) / 2
    assert result["verified_runtime_bytes"] >= result["verified_weight_resident_bytes"]


def test_worker_reports_errors(tmp_path: Path) -> None:
    job = make_job(tmp_path / "missing.onnx", tmp_path / "inputs.npz", tmp_path / "reference.pt")
    (tmp_path / "job.json").write_text(json.dumps(job))
    done = subprocess.run([sys.executable, "-m", "planner.runtimes.onnxruntime.worker", str(tmp_path / "job.json"),
                           str(tmp_path / "result.json")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    error = json.loads((tmp_path / "result.json").read_text())["error"]
    assert ":" in error and "\n" not in error


def test_gpt2_style_conv1d_and_tied_head_are_predicted(tmp_path: Path) -> None:
    # transformers' Conv1D (weight stored (in, out)) is exported as Gemm and quantized; the lm_head tied to the
    # token embedding is exported once and transposed at run time, so it stays float.
    from transformers import GPT2Config, GPT2LMHeadModel

    # use_cache left at its default (True): the export must switch the KV cache off itself, and say so
    config = GPT2Config(n_layer=2, n_embd=256, n_head=4, vocab_size=1024, n_positions=64)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    with torch.device("meta"):
        meta_model = GPT2LMHeadModel(config)
    ids = (torch.randint(0, 1024, (1, 16)),)
    for name in ("fp32", "int8-dynamic", "int4-g128"):
        path, notes = backend.build_onnx_artifact(model, ids, RECIPES[name], tmp_path)
        assert any("use_cache=False" in note for note in notes)
        assert model.config.use_cache  # restored after the export
        real = backend.onnx_file_bytes(path)
        predicted = backend.analytic_onnx_bytes(meta_model, RECIPES[name])
        assert abs(predicted - real) <= 0.03 * real, (name, predicted, real)


def test_export_failure_is_one_plain_line() -> None:
    message = ("Failed to export the model with torch.export. \x1b[96mThis is step 1/3\x1b[0m of exporting.\n"
               "- Modify the model code\n\n## Exception summary\n\n<class 'RuntimeError'>: Found a cache in output\n\n"
               "(Refer to the full stack trace above for more information.)")
    assert backend.export_failure_cause(RuntimeError(message)) == "<class 'RuntimeError'>: Found a cache in output"


@pytest.mark.parametrize("scheme", ["int8-dynamic", "int4-g128"])
def test_layers_kept_float_by_the_recipe_stay_float_in_onnx(scheme: str, tmp_path: Path) -> None:
    # The torch recipe keeps "0" (the first Linear) float; the ONNX artifact must too, and its size model agrees.
    from dataclasses import replace

    from planner.recipes.recipe import LayerOverride

    recipe = replace(RECIPES[scheme], dtype="float32", name=f"{scheme}-keep0",
                     layer_overrides=(LayerOverride("0", None),))
    assert backend.onnx_recipe_support(recipe) is None
    model = _build("mlp")
    keep = frozenset(backend.float_weight_names(model, recipe))
    assert keep == {"0.weight"}
    path, notes = backend.build_onnx_artifact(model, _mlp_input(1), recipe, tmp_path, keep)
    assert backend.count_quantized_nodes(path, recipe.quantize) == 1 and any("kept float" in n for n in notes)
    with torch.device("meta"):
        predicted = backend.analytic_onnx_bytes(_mlp(), recipe)
    assert abs(predicted - backend.onnx_file_bytes(path)) / backend.onnx_file_bytes(path) < 0.03
    unchanged, _ = backend.build_onnx_artifact(_build("mlp"), _mlp_input(1), replace(recipe, name="all"), tmp_path)
    assert backend.count_quantized_nodes(unchanged, recipe.quantize) == 2
    mixed = replace(recipe, layer_overrides=(LayerOverride("0", "int8-weight-only"),))
    assert "per-layer schemes" in (backend.onnx_recipe_support(mixed) or "")


def test_a_folded_weight_is_known_by_its_parameter_and_a_tied_one_is_stored_once(tmp_path: Path) -> None:
    """On 3-D inputs a Linear exports as MatMul with its transposed weight folded into a new constant (val_N): a
    layer kept float by the recipe must still be found by its parameter name, and a weight with another reader (a
    head tied to its embedding) must not be stored a second time as its folded transpose."""
    from dataclasses import replace

    from tied_lm import TiedLM

    from planner.recipes.recipe import LayerOverride

    torch.manual_seed(0)
    model = TiedLM(512, 64).eval()
    ids = (torch.randint(0, 512, (1, 16)),)
    path, _ = backend.build_onnx_artifact(model, ids, RECIPES["fp32"], tmp_path)
    stored = sum(p.numel() for p in model.parameters()) * 4
    assert backend.onnx_file_bytes(path) < stored * 1.05  # the embedding once, not again as the head's transpose
    recipe = replace(RECIPES["int8-dynamic"], name="keep-first", layer_overrides=(LayerOverride("first", None),))
    keep = frozenset(backend.float_weight_names(model, recipe))
    quantized, notes = backend.build_onnx_artifact(model, ids, recipe, tmp_path, keep)
    assert any("1 MatMul node(s) kept float" in note for note in notes), notes
    assert backend.count_quantized_nodes(quantized, recipe.quantize) == 1  # second; the tied head reads a Transpose
