"""Tests for planner.models.sources: every kind of model source, and a one-line PlannerError for every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

from planner.core.errors import PlannerError
from planner.models.sources import ModelSource, parse_input_shape, resolve_source
from planner.models.zoo import ZOO

REPO = Path(__file__).resolve().parents[1]
PKG = "srcfix_models"  # a package written to a temp dir and put on sys.path, for `pkg.mod:factory` specs

FACTORY_FILE = """
import torch
from torch import nn

def build():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

def build_with_input():
    return build(), torch.randn(2, 8)

def build_with_inputs():
    return build(), (torch.randn(3, 8),)

def build_tokens():
    return nn.Embedding(50, 4), torch.randint(0, 50, (2, 5))

def broken():
    raise ValueError("no GPU here\\nsecond line")

def not_a_model():
    return 42

def bad_example():
    return build(), "hello"
"""

PKG_NETS = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))

def build():
    return Net()

def build_with_input():
    return Net(), torch.randn(4, 6)
"""


def _one_line_error(excinfo: pytest.ExceptionInfo[PlannerError]) -> str:
    text = str(excinfo.value)
    assert text and "\n" not in text, text
    assert "Traceback" not in text
    return text


def _resolve_error(spec: str, **kwargs: object) -> str:
    with pytest.raises(PlannerError) as excinfo:
        resolve_source(spec, **kwargs)  # type: ignore[arg-type]
    return _one_line_error(excinfo)


def _run(source: ModelSource) -> torch.Tensor:
    model = source.build()
    with torch.no_grad():
        return model(*source.example_inputs())


@pytest.fixture
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def factory_file(tmp_path: Path) -> Path:
    path = tmp_path / "models.py"
    path.write_text(FACTORY_FILE)
    return path


@pytest.fixture(scope="module")
def pkg_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("pkgroot")
    (root / PKG).mkdir()
    (root / PKG / "__init__.py").write_text("")
    (root / PKG / "nets.py").write_text(PKG_NETS)
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))
    for name in [m for m in sys.modules if m.startswith(PKG)]:
        del sys.modules[name]


def _seq() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


# ---------------------------------------------------------------------------------------------------------------
# zoo


@pytest.mark.parametrize("name", ["simplenet", "convnet", "lstm", "tinylm"])
def test_zoo_models_build_and_run(name: str) -> None:
    source = resolve_source(f"zoo:{name}")
    assert source.kind == "zoo" and source.name == name
    model = source.build()
    assert not model.training
    out = _run(source)
    assert out.shape[0] == 1 and torch.isfinite(out).all()


def test_zoo_complexnet_meta_is_instant_and_weightless() -> None:
    start = time.perf_counter()
    model = resolve_source("zoo:complexnet").build("meta")
    assert time.perf_counter() - start < 2.0
    params = list(model.parameters())
    assert all(p.is_meta for p in params)
    # conv1 3·64·9+64, conv2 64·128·9+128, fc1 524,288·1024+1024, fc2 1024·10+10
    assert sum(p.numel() for p in params) == 1_792 + 73_856 + 536_871_936 + 10_250 == 536_957_834


def test_zoo_builds_are_fresh_and_deterministic() -> None:
    source = resolve_source("zoo:simplenet")
    a, b = source.build(), source.build()
    assert a is not b
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert torch.equal(source.example_inputs()[0], source.example_inputs()[0])


def test_zoo_unknown_name_suggests_close_ones() -> None:
    text = _resolve_error("zoo:simplnet")
    assert "zoo:simplenet" in text and "zoo:tinylm" in text
    assert "did you mean zoo:simplenet" in _resolve_error("simplenet")


# ---------------------------------------------------------------------------------------------------------------
# factories


def test_factory_file_with_example_input(factory_file: Path) -> None:
    source = resolve_source(f"{factory_file}:build_with_input")
    assert source.kind == "factory" and source.name == "build_with_input"
    (x,) = source.example_inputs()
    assert x.shape == (2, 8) and x.device.type == "cpu"
    assert _run(source).shape == (2, 4)


def test_factory_file_with_tuple_example_and_relative_path(factory_file: Path, cwd: Path) -> None:
    source = resolve_source("models.py:build_with_inputs")
    assert source.example_inputs()[0].shape == (3, 8)
    assert source.path == str(factory_file.resolve())


def test_factory_without_example_needs_input_shape(factory_file: Path) -> None:
    source = resolve_source(f"{factory_file}:build")
    with pytest.raises(PlannerError) as excinfo:
        source.example_inputs()
    assert "--input-shape" in _one_line_error(excinfo)
    shaped = resolve_source(f"{factory_file}:build", input_shape="5,8")
    assert _run(shaped).shape == (5, 4)


def test_factory_meta_build_is_weightless_and_example_is_real(factory_file: Path) -> None:
    source = resolve_source(f"{factory_file}:build_tokens")
    model = source.build("meta")
    assert all(p.is_meta for p in model.parameters())
    (ids,) = source.example_inputs()
    # The factory ran under torch.device("meta"); integer inputs are replaced by zeros (valid for any vocab).
    assert ids.device.type == "cpu" and ids.dtype == torch.int64 and ids.shape == (2, 5)
    assert _run(source).shape == (2, 5, 4)


def test_factory_from_package_module(pkg_root: Path) -> None:
    plain = resolve_source(f"{PKG}.nets:build", input_shape="2,6")
    assert _run(plain).shape == (2, 3)
    with_input = resolve_source(f"{PKG}.nets:build_with_input")
    assert with_input.example_inputs()[0].shape == (4, 6)
    assert with_input.path == str(pkg_root.resolve())


def test_factory_package_rebuilds_from_json_without_sys_path(pkg_root: Path) -> None:
    source = resolve_source(f"{PKG}.nets:build_with_input")
    expected = _run(source)
    sys.path.remove(str(pkg_root))
    for name in [m for m in sys.modules if m.startswith(PKG)]:
        del sys.modules[name]
    try:
        rebuilt = ModelSource.from_json(json.loads(json.dumps(source.to_json())))
        assert torch.equal(_run(rebuilt), expected)
    finally:
        if str(pkg_root) not in sys.path:
            sys.path.insert(0, str(pkg_root))


def test_to_json_round_trip_in_a_subprocess(factory_file: Path, tmp_path: Path) -> None:
    source = resolve_source(f"{factory_file}:build_with_input", batch_size=3)
    assert ModelSource.from_json(source.to_json()) == source
    expected = _run(source)
    script = textwrap.dedent("""
        import json, sys, torch
        from planner.models.sources import ModelSource
        source = ModelSource.from_json(json.loads(sys.argv[1]))
        with torch.no_grad():
            torch.save(source.build()(*source.example_inputs()), sys.argv[2])
    """)
    out = tmp_path / "out.pt"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", script, json.dumps(source.to_json()), str(out)], check=True, env=env,
                   cwd=tmp_path / "..")
    assert torch.equal(torch.load(out, weights_only=True), expected)


@pytest.mark.parametrize(("attr", "needle"), [
    ("missing_fn", "no factory named 'missing_fn'"),
    ("buidl", "did you mean build"),
    ("broken", "ValueError: no GPU here"),
    ("not_a_model", "returned int"),
    ("bad_example", "not a tensor"),
])
def test_factory_errors(factory_file: Path, attr: str, needle: str) -> None:
    assert needle in _resolve_error(f"{factory_file}:{attr}")


def test_factory_file_errors(tmp_path: Path, factory_file: Path) -> None:
    assert "no such file" in _resolve_error(f"{tmp_path / 'nope.py'}:build")
    bad = tmp_path / "bad_syntax.py"
    bad.write_text("def build(:\n    pass\n")
    assert "syntax error at line 1" in _resolve_error(f"{bad}:build")
    crash = tmp_path / "crash_on_import.py"
    crash.write_text("import sys\nsys.exit(3)\n")
    assert "importing" in _resolve_error(f"{crash}:build")
    assert "cannot import no_such_pkg_xyz" in _resolve_error("no_such_pkg_xyz.models:build")
    assert f"{factory_file}:build" in _resolve_error(str(factory_file))  # a .py without the factory name


# ---------------------------------------------------------------------------------------------------------------
# --weights


@pytest.mark.parametrize("fmt", ["pt", "safetensors", "checkpoint", "dataparallel", "legacy"])
def test_factory_with_weights(factory_file: Path, tmp_path: Path, fmt: str) -> None:
    trained = _seq()
    state = trained.state_dict()
    path = tmp_path / f"w.{'safetensors' if fmt == 'safetensors' else 'pt'}"
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif fmt == "checkpoint":
        torch.save({"epoch": 3, "state_dict": state, "optimizer": {"lr": 0.1}}, path)
    elif fmt == "dataparallel":
        torch.save({f"module.{k}": v for k, v in state.items()}, path)
    elif fmt == "legacy":
        torch.save(state, path, _use_new_zipfile_serialization=False)
    else:
        torch.save(state, path)
    source = resolve_source(f"{factory_file}:build_with_input", weights=str(path))
    x = source.example_inputs()[0]
    with torch.no_grad():
        assert torch.allclose(source.build()(x), trained(x))
    # A meta build never touches the weights.
    assert all(p.is_meta for p in source.build("meta").parameters())


def test_weights_mismatch_names_keys(factory_file: Path, tmp_path: Path) -> None:
    state = {f"layer{i}.weight": torch.zeros(2) for i in range(5)}
    path = tmp_path / "w.pt"
    torch.save(state, path)
    text = _resolve_error(f"{factory_file}:build", weights=str(path))
    assert text.startswith(f"--weights {path} does not match the model: missing 0.weight, 0.bias, 2.weight")
    assert "unexpected layer0.weight" in text and "(and 2 more)" in text


def test_weights_shape_mismatch(factory_file: Path, tmp_path: Path) -> None:
    state = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5)).state_dict()
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    text = _resolve_error(f"{factory_file}:build", weights=str(path))
    assert "2.weight is [5, 16] in the file but [4, 16] in the model" in text


def test_weights_bad_files(factory_file: Path, tmp_path: Path) -> None:
    spec = f"{factory_file}:build"
    assert "no such file" in _resolve_error(spec, weights=str(tmp_path / "none.pt"))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00garbage")
    assert "not a readable safetensors file" in _resolve_error(spec, weights=str(junk))
    not_sd = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], not_sd)
    assert "is not a state dict" in _resolve_error(spec, weights=str(not_sd))
    ts = tmp_path / "model.ts"
    torch.jit.save(torch.jit.script(_seq()), str(ts))
    assert "not weights" in _resolve_error(spec, weights=str(ts))


# ---------------------------------------------------------------------------------------------------------------
# model files


def test_export_round_trip(tmp_path: Path) -> None:
    model = ZOO["simplenet"].build().eval()
    example = ZOO["simplenet"].example_input(2)
    path = tmp_path / "simple.pt2"
    torch.export.save(torch.export.export(model, example), str(path))
    source = resolve_source(str(path))
    assert source.kind == "export" and source.name == "simple"
    (x,) = source.example_inputs()
    assert torch.equal(x, example[0])
    with torch.no_grad():
        assert torch.allclose(_run(source), model(x))


@pytest.mark.parametrize("suffix", [".ts", ".torchscript", ".pt"])
def test_torchscript_round_trip(tmp_path: Path, suffix: str) -> None:
    model = _seq().eval()
    path = tmp_path / f"scripted{suffix}"
    torch.jit.save(torch.jit.script(model), str(path))
    assert "--trust-code" in _resolve_error(str(path), input_shape="3,8")  # TorchScript is code
    source = resolve_source(str(path), input_shape="3,8", trust_code=True)
    assert source.kind == "torchscript"  # detected by content, also when named .pt
    x = source.example_inputs()[0]
    with torch.no_grad():
        assert torch.allclose(source.build()(x), model(x))


def test_safe_pickle_of_torch_modules_loads_without_trust(tmp_path: Path) -> None:
    model = _seq().eval()
    path = tmp_path / "seq.pt"
    torch.save(model, path)
    source = resolve_source(str(path), input_shape="2,8")
    assert source.kind == "pickle" and not source.trust_code
    x = source.example_inputs()[0]
    with torch.no_grad():
        assert torch.allclose(source.build()(x), model(x))


def test_pickle_of_zoo_transformer_loads_without_trust(tmp_path: Path) -> None:
    path = tmp_path / "tinylm.pt"
    torch.save(ZOO["tinylm"].build(), path)  # needs torch.nn.functional.relu and planner.models.zoo.TinyLM
    source = resolve_source(str(path), input_shape="1,16", input_dtype="int64")
    assert _run(source).shape == (1, 16, 2048)


class _Exec:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


class _System:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize(("payload", "global_name"), [(_Exec, "builtins.exec"), (_System, "system")])
@pytest.mark.parametrize("legacy", [False, True])
def test_malicious_pickle_is_refused(tmp_path: Path, payload: type, global_name: str, legacy: bool,
                                     factory_file: Path) -> None:
    marker = tmp_path / "MARKER"
    path = tmp_path / "model.pt"
    torch.save({"weights": payload(marker)}, path, _use_new_zipfile_serialization=not legacy)
    text = _resolve_error(str(path))
    assert f"needs {global_name}" in text or (global_name == "system" and ".system" in text)
    assert "--trust-code" in text and "torch.export.save" in text
    assert "--trust-code" in _resolve_error(f"{factory_file}:build", weights=str(path))
    assert not marker.exists()


def test_custom_class_pickle_needs_trust(tmp_path: Path, pkg_root: Path) -> None:
    import importlib

    nets = importlib.import_module(f"{PKG}.nets")
    model = nets.Net().eval()
    path = tmp_path / "net.pt"
    torch.save(model, path)
    text = _resolve_error(str(path))
    assert text.startswith(f"{path} is a pickle that needs {PKG}.nets.Net to load; loading it would run code")
    source = resolve_source(str(path), trust_code=True, input_shape="2,6")
    x = source.example_inputs()[0]
    with torch.no_grad():
        assert torch.allclose(source.build()(x), model(x))
    assert ModelSource.from_json(source.to_json()).trust_code


def test_state_dict_given_as_model_hints_at_factory(tmp_path: Path) -> None:
    path = tmp_path / "sd.pt"
    torch.save(_seq().state_dict(), path)
    text = _resolve_error(str(path))
    assert "state dict" in text and f"file.py:factory --weights {path}" in text


def test_safetensors_given_as_model(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file(_seq().state_dict(), str(path))
    assert "--weights" in _resolve_error(str(path))


def test_bad_model_files(tmp_path: Path) -> None:
    assert "no such file" in _resolve_error(str(tmp_path / "missing.pt"))
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert "is empty" in _resolve_error(str(empty))
    assert "is a directory" in _resolve_error(str(tmp_path))
    noise = tmp_path / "noise.pt"
    noise.write_bytes(os.urandom(256).replace(b"PK", b"pk").replace(b"\x80", b"\x81") or b"x")
    assert "not a file PyTorch can read" in _resolve_error(str(noise))
    good = tmp_path / "good.pt2"
    torch.export.save(torch.export.export(_seq(), (torch.randn(1, 8),)), str(good))
    truncated = tmp_path / "truncated.pt2"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert "damaged zip" in _resolve_error(str(truncated))
    other_zip = tmp_path / "other.pt"
    with zipfile.ZipFile(other_zip, "w") as zf:
        zf.writestr("hello.txt", "hi")
    assert "not a PyTorch one" in _resolve_error(str(other_zip))
    for path in (empty, noise, truncated, other_zip):
        assert str(path) in _resolve_error(str(path))


def test_corrupt_member_inside_archive(tmp_path: Path) -> None:
    path = tmp_path / "seq.pt"
    torch.save(_seq(), path)
    fixed = tmp_path / "corrupt.pt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(fixed, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info, data[: len(data) // 2] if info.filename.endswith("data.pkl") else data)
    text = _resolve_error(str(fixed))
    assert str(fixed) in text


# ---------------------------------------------------------------------------------------------------------------
# input options


def test_batch_size_overrides_dim0() -> None:
    assert resolve_source("zoo:simplenet", batch_size=4).example_inputs()[0].shape == (4, 100)
    lstm = resolve_source("zoo:lstm", batch_size=3)
    assert _run(lstm).shape == (3, 16)


def test_batch_size_on_factory_example_cycles_rows(factory_file: Path) -> None:
    base = resolve_source(f"{factory_file}:build_with_input").example_inputs()[0]
    (x,) = resolve_source(f"{factory_file}:build_with_input", batch_size=5).example_inputs()
    assert x.shape == (5, 8) and torch.equal(x[2], base[0])


def test_input_shape_and_dtype_override() -> None:
    source = resolve_source("zoo:simplenet", input_shape="(2, 100)")
    assert source.example_inputs()[0].shape == (2, 100)
    tokens = resolve_source("zoo:tinylm", input_shape="2x32", batch_size=3)
    (ids,) = tokens.example_inputs()
    assert ids.shape == (3, 32) and ids.dtype == torch.int64 and int(ids.max()) < 2048
    assert _run(tokens).shape == (3, 32, 2048)
    half = resolve_source("zoo:simplenet", input_dtype="fp16")
    assert half.input_dtype == "float16" and half.example_inputs()[0].dtype == torch.float16
    ints = resolve_source("zoo:simplenet", input_shape="1,4", input_dtype="torch.int64")
    assert ints.example_inputs()[0].dtype == torch.int64


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"input_shape": "1,3,a"}, "--input-shape"),
    ({"input_shape": ""}, "--input-shape"),
    ({"input_shape": "1,0,3"}, "positive integers"),
    ({"input_dtype": "float33"}, "did you mean float32"),
    ({"input_dtype": "complex"}, "use one of"),
    ({"batch_size": 0}, "--batch-size"),
    ({"batch_size": -2}, "--batch-size"),
])
def test_bad_options(kwargs: dict[str, object], needle: str) -> None:
    assert needle in _resolve_error("zoo:simplenet", **kwargs)


def test_empty_spec() -> None:
    assert "zoo:NAME" in _resolve_error("  ")


@given(st.lists(st.integers(min_value=1, max_value=4096), min_size=1, max_size=6), st.sampled_from([",", "x", ", "]))
def test_input_shape_parses_any_positive_dims(dims: list[int], sep: str) -> None:
    assert parse_input_shape(sep.join(map(str, dims))) == tuple(dims)


@given(st.text(max_size=12))
def test_input_shape_garbage_is_a_one_line_planner_error(text: str) -> None:
    try:
        dims = parse_input_shape(text)
    except PlannerError as exc:
        assert "\n" not in str(exc)
    else:
        assert dims is not None and all(d >= 1 for d in dims)


def test_factory_input_made_on_meta_gets_real_values_after_the_real_build(tmp_path: Path) -> None:
    (tmp_path / "ids.py").write_text(
        "import torch\nfrom torch import nn\n"
        "def build():\n"
        "    return nn.Embedding(100, 8), torch.randint(1, 100, (2, 16))\n")
    source = resolve_source(f"{tmp_path / 'ids.py'}:build")
    source.build("meta")
    assert source.example_inputs()[0].shape == (2, 16)
    assert source.input_note is not None and "meta" in source.input_note
    source.build("cpu")
    ids = source.example_inputs()[0]
    assert source.input_note is None
    assert int(ids.min()) >= 1  # the factory's own randint values, not synthesized zeros
