"""Hostile model files (issue 13): payloads in every pickled part of a .pt2, TorchScript that writes files,
allocation bombs, globals whose import runs code, FIFOs, absurd shapes. Each is refused with one `error:` line
and exit 2, before any of it runs: the marker file is never created and the user's file is unchanged."""

from __future__ import annotations

import io
import json
import os
import pickle
import pickletools
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from planner.cli.commands import main
from planner.core.errors import PlannerError
from planner.models.sources import MAX_INPUT_RANK, resolve_source

PRECIOUS_TEXT = "the user's own data"


def _payload_code(marker: Path, precious: Path, result: str = "None") -> str:
    """An expression that writes the marker, overwrites the user's file, then evaluates to `result` (a stealth
    payload returns what the loader expects, so nothing looks wrong)."""
    return (f"(__import__('pathlib').Path({str(marker)!r}).write_text('pwned'), "
            f"__import__('pathlib').Path({str(precious)!r}).write_text('overwritten'), {result})[2]")


class _Payload:
    """Unpickles by calling eval: plain code execution, optionally returning a real tensor (stealth)."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (eval, (self.code,))


def _torch_save_bytes(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _tensor_expr(t: torch.Tensor) -> str:
    return f"__import__('torch').tensor({t.tolist()!r}, dtype=__import__('torch').{str(t.dtype).split('.')[1]})"


def _rewrite(src: Path, dst: Path, *, replace: dict[str, bytes] | None = None,
             add: dict[str, bytes] | None = None, raw_add: dict[str, bytes] | None = None) -> Path:
    """Copy a torch archive, replacing or adding members (names relative to its top-level folder)."""
    replace, add, raw_add = replace or {}, add or {}, raw_add or {}
    with zipfile.ZipFile(src) as old, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as new:
        top = old.namelist()[0].split("/", 1)[0]
        for info in old.infolist():
            inner = info.filename.split("/", 1)[1]
            new.writestr(info.filename, replace.get(inner, old.read(info)))
        for inner, data in add.items():
            new.writestr(f"{top}/{inner}", data)
        for name, data in raw_add.items():
            new.writestr(name, data)
    return dst


def _config(src: Path, name: str) -> dict:
    with zipfile.ZipFile(src) as archive:
        top = archive.namelist()[0].split("/", 1)[0]
        return json.loads(archive.read(f"{top}/{name}"))


WEIGHTS_CONFIG = "data/weights/model_weights_config.json"
CONSTANTS_CONFIG = "data/constants/model_constants_config.json"


@pytest.fixture(scope="module")
def pt2(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A good .pt2 of a tiny model, and one hostile variant per pickled member kind torch.export.load reads."""
    root = tmp_path_factory.mktemp("pt2")
    marker, precious = root / "MARKER", root / "precious.txt"
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU()).eval()
    good = root / "good.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(2, 4),)), str(good))
    files = {"root": root, "marker": marker, "precious": precious, "good": good}
    code = _payload_code(marker, precious)

    # Sample inputs: stealth, returns a real ((x,), {}) so a loader that ran it would carry on normally.
    stealth_inputs = _Payload(_payload_code(marker, precious, f"(({_tensor_expr(torch.randn(2, 4))},), {{}})"))
    files["sample_inputs"] = _rewrite(good, root / "sample_inputs.pt2",
                                      replace={"data/sample_inputs/model.pt": _torch_save_bytes(stealth_inputs)})

    # A weight whose config says use_pickle: stealth, returns the real weight, so the plan would run normally.
    weights = _config(good, WEIGHTS_CONFIG)
    weights["config"]["0.weight"]["use_pickle"] = True
    real_weight = model[0].weight.detach()
    files["pickled_weight"] = _rewrite(good, root / "pickled_weight.pt2", replace={
        WEIGHTS_CONFIG: json.dumps(weights).encode(),
        "data/weights/weight_0": _torch_save_bytes(_Payload(_payload_code(marker, precious,
                                                                          _tensor_expr(real_weight))))})

    # A pickled weight that is a 3.2 GB bytearray bomb (weights_only alone would allow bytearray).
    files["pickled_weight_bomb"] = _rewrite(good, root / "pickled_weight_bomb.pt2", replace={
        WEIGHTS_CONFIG: json.dumps(weights).encode(), "data/weights/weight_0": _torch_save_bytes(_ByteArrayBomb())})

    # Constants: a use_pickle tensor constant, an opaque object (plain pickle.loads), a torchbind custom object.
    def with_constant(name: str, path_name: str, data: bytes, use_pickle: bool) -> Path:
        constants = {"config": {"c": {"path_name": path_name, "is_param": False, "use_pickle": use_pickle,
                                      "tensor_meta": None}}}
        return _rewrite(good, root / f"{name}.pt2", replace={CONSTANTS_CONFIG: json.dumps(constants).encode()},
                        add={f"data/constants/{path_name}": data})

    files["pickled_constant"] = with_constant("pickled_constant", "tensor_0", _torch_save_bytes(_Payload(code)), True)
    files["opaque_constant"] = with_constant("opaque_constant", "opaque_obj_0", pickle.dumps(_Payload(code)), True)
    files["custom_constant"] = with_constant("custom_constant", "custom_obj_0", pickle.dumps(_Payload(code)), True)

    # Member names and native code.
    top = "good"
    files["dotdot"] = _rewrite(good, root / "dotdot.pt2", raw_add={f"{top}/../../escaped.txt": b"x"})
    files["absolute"] = _rewrite(good, root / "absolute.pt2", raw_add={"/tmp/absolute.txt": b"x"})
    files["backslash"] = _rewrite(good, root / "backslash.pt2", raw_add={f"{top}\\..\\evil.txt": b"x"})
    files["aoti"] = _rewrite(good, root / "aoti.pt2", add={"data/aotinductor/model/model.so": b"\x7fELF" + bytes(60)})
    symlink = root / "symlink.pt2"
    _rewrite(good, symlink)
    with zipfile.ZipFile(symlink, "a") as archive:
        info = zipfile.ZipInfo(f"{top}/data/link")
        info.external_attr = 0o120777 << 16
        archive.writestr(info, "/etc/passwd")
    files["symlink"] = symlink

    # A 0-byte weight member that declares a 40 GB tensor: torch would allocate zeros of the declared size.
    bomb = _config(good, WEIGHTS_CONFIG)
    bomb["config"]["0.weight"]["tensor_meta"]["sizes"] = [{"as_int": 100_000}, {"as_int": 100_000}]
    bomb["config"]["0.weight"]["tensor_meta"]["strides"] = [{"as_int": 100_000}, {"as_int": 1}]
    files["zero_member_bomb"] = _rewrite(good, root / "zero_member_bomb.pt2", replace={
        WEIGHTS_CONFIG: json.dumps(bomb).encode(), "data/weights/weight_0": b""})
    return files


HOSTILE_PT2 = ["sample_inputs", "pickled_weight", "pickled_weight_bomb", "pickled_constant", "opaque_constant",
               "custom_constant", "dotdot", "absolute", "backslash", "aoti", "symlink", "zero_member_bomb"]


def _refused(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the CLI; assert exit 2 and exactly one `error:` line, and return it."""
    code = main(args)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2, (args, captured.err, captured.out)
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err
    return lines[0]


@pytest.mark.parametrize("variant", HOSTILE_PT2)
def test_hostile_pt2_is_refused_by_plan_and_inspect(pt2: dict[str, Path], variant: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    pt2["precious"].write_text(PRECIOUS_TEXT)
    for command in (["plan", str(pt2[variant]), "--budget", "1MB"], ["inspect", str(pt2[variant])]):
        line = _refused(command, capsys)
        assert str(pt2[variant]) in line
        assert not pt2["marker"].exists(), f"code from {variant} ran in {command[0]}"
        assert pt2["precious"].read_text() == PRECIOUS_TEXT
    assert not (pt2["root"].parent / "escaped.txt").exists()


def test_pickled_member_payloads_name_the_member(pt2: dict[str, Path]) -> None:
    expectations = {"sample_inputs": "sample inputs", "pickled_weight": "'0.weight'", "pickled_constant": "'c'",
                    "opaque_constant": "opaque", "custom_constant": "custom", "aoti": "native code",
                    "pickled_weight_bomb": "builtins.bytearray",
                    "dotdot": "outside the archive", "zero_member_bomb": "memory bomb", "symlink": "symbolic link"}
    for variant, expected in expectations.items():
        with pytest.raises(PlannerError) as excinfo:
            resolve_source(str(pt2[variant]))
        assert expected in str(excinfo.value), (variant, str(excinfo.value))
    assert not pt2["marker"].exists()


def test_good_pt2_still_loads_with_its_example_input(pt2: dict[str, Path]) -> None:
    source = resolve_source(str(pt2["good"]))
    (x,) = source.example_inputs()
    assert x.shape == (2, 4)
    assert source.build()(x).shape == (2, 3)


def test_torchao_quantized_pt2_loads(tmp_path: Path) -> None:
    # torchao stores its quantized weights as pickled tensor subclasses (use_pickle); they load weights_only.
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = nn.Sequential(nn.Linear(64, 32)).eval()
    quantize_(model, Int8WeightOnlyConfig())
    path = tmp_path / "quantized.pt2"
    x = torch.randn(2, 64)
    torch.export.save(torch.export.export(model, (x,)), str(path))
    source = resolve_source(str(path))
    with torch.no_grad():
        assert torch.allclose(source.build()(x), model(x))


def test_damaged_pt2_is_one_line_without_torch_logging(pt2: dict[str, Path], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    # A graph naming an operator that does not exist: torch.export.load logs a 35-line traceback
    # (log.warning(exc_info=True)) before raising "check the warnings above".
    with zipfile.ZipFile(pt2["good"]) as archive:
        graph = json.loads(archive.read("good/models/model.json"))
    graph["graph_module"]["graph"]["nodes"][0]["target"] = "torch.ops.aten.no_such_op.default"
    damaged = _rewrite(pt2["good"], tmp_path / "damaged.pt2", replace={"models/model.json": json.dumps(graph).encode()})
    for command in (["plan", str(damaged), "--budget", "1MB"], ["inspect", str(damaged)]):
        line = _refused(command, capsys)
        assert "damaged.pt2" in line and "no_such_op" in line and len(line) < 600


def test_compressed_members_are_refused(pt2: dict[str, Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    # torch reads a compressed member's bytes as they are (garbage weights under mmap, or an internal error).
    deflated = tmp_path / "deflated.pt2"
    with zipfile.ZipFile(pt2["good"]) as old, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as new:
        for info in old.infolist():
            new.writestr(info.filename, old.read(info))
    assert "compressed member" in _refused(["inspect", str(deflated)], capsys)


# ---------------------------------------------------------------------------------------------------------------
# TorchScript


TORCHSCRIPT_WRITER = """import sys
import torch
from torch import nn

class Writer(nn.Module):
    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.written = 0
        self.weight = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        # Creates (or overwrites) a file of the attacker's choosing, no Python involved; used, so not optimized out.
        written = torch.from_file(self.path, shared=True, size=16, dtype=torch.uint8).fill_(33).sum()
        return x @ self.weight + written * 0

    @torch.jit.export
    def __getstate__(self):
        return (self.path, self.weight, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, torch.Tensor, bool]):
        self.path = state[0]
        self.weight = state[1]
        self.training = state[2]
        self.written = int(torch.from_file(self.path + ".setstate", shared=True, size=16,
                                           dtype=torch.uint8).fill_(33).sum())

torch.jit.save(torch.jit.script(Writer(sys.argv[2])), sys.argv[1])
"""


@pytest.fixture(scope="module")
def torchscript_writer(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ts")
    marker = root / "MARKER"
    script = root / "make_ts.py"
    script.write_text(TORCHSCRIPT_WRITER)
    path = root / "writer.ts"
    # Written in a child process so the scripted class does not linger in this one.
    subprocess.run([sys.executable, str(script), str(path), str(marker)], check=True, timeout=120,
                   capture_output=True)
    return {"root": root, "ts": path, "marker": marker, "setstate_marker": Path(f"{marker}.setstate")}


@pytest.mark.parametrize("command", ["plan", "inspect"])
def test_torchscript_needs_trust_code(torchscript_writer: dict[str, Path], command: str,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    args = [command, str(torchscript_writer["ts"]), "--input-shape", "2,4"]
    line = _refused(args + (["--budget", "1MB"] if command == "plan" else []), capsys)
    assert "TorchScript" in line and "--trust-code" in line
    assert not torchscript_writer["marker"].exists() and not torchscript_writer["setstate_marker"].exists()


def test_torchscript_markers_appear_only_with_trust(torchscript_writer: dict[str, Path],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # The test's own premise: this file really does write files when loaded and run.
    code = main(["inspect", str(torchscript_writer["ts"]), "--input-shape", "2,4", "--trust-code"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert torchscript_writer["setstate_marker"].exists()  # __setstate__ ran at load, as trusted code may
    for marker in (torchscript_writer["marker"], torchscript_writer["setstate_marker"]):
        marker.unlink(missing_ok=True)


def test_trust_pickle_still_works_as_an_alias(torchscript_writer: dict[str, Path],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(torchscript_writer["ts"]), "--input-shape", "2,4", "--trust-pickle"]) == 0
    capsys.readouterr()
    for marker in (torchscript_writer["marker"], torchscript_writer["setstate_marker"]):
        marker.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------------
# Allocation bombs: refused before anything is allocated. Each load runs under a 2 GiB address-space limit in a
# child process, so a bomb that got through would fail the test (MemoryError, not exit 2) instead of taking the
# machine's memory.


class _ByteArrayBomb:
    def __reduce__(self) -> tuple[object, tuple[int]]:
        return (bytearray, (3_200_000_000,))


class _LinearBomb:
    def __reduce__(self) -> tuple[object, tuple[int, int]]:
        return (nn.Linear, (30_000, 30_000))


def _zip_bomb(path: Path, megabytes: int = 512) -> Path:
    """A torch.save archive whose storage member inflates to `megabytes` MB of zeros from about 1 KB per MB
    (the issue's bomb was 6.5 GB from 3 MB; the check is a ratio to the file size, so 512 MB shows it)."""
    good = io.BytesIO()
    torch.save({"w": torch.zeros(4)}, good)
    with zipfile.ZipFile(good) as old, zipfile.ZipFile(path, "w") as new:
        for info in old.infolist():
            if not info.filename.endswith("data/0"):
                new.writestr(info, old.read(info))
                continue
            deflated = zipfile.ZipInfo(info.filename)
            deflated.compress_type = zipfile.ZIP_DEFLATED
            with new.open(deflated, "w", force_zip64=True) as member:
                chunk = bytes(64 * 2**20)
                for _ in range(megabytes * 2**20 // len(chunk)):
                    member.write(chunk)
    return path


def _cli_under_memory_limit(args: list[str], limit_bytes: int = 2 * 2**30) -> subprocess.CompletedProcess[str]:
    code = (f"import resource, sys; resource.setrlimit(resource.RLIMIT_AS, ({limit_bytes}, {limit_bytes})); "
            "from planner.cli.commands import main; sys.exit(main(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def bombs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bombs")
    torch.save({"w": _ByteArrayBomb()}, root / "bytearray.pt")
    torch.save({"layer": _LinearBomb()}, root / "linear.pt")
    torch.save({"w": _ByteArrayBomb()}, root / "bytearray_legacy.pt", _use_new_zipfile_serialization=False)
    return {"root": root, "bytearray": root / "bytearray.pt", "linear": root / "linear.pt",
            "bytearray_legacy": root / "bytearray_legacy.pt"}


def test_pickle_bombs_are_small() -> None:
    # The premise of the bomb tests: a few hundred bytes of pickle ask for gigabytes.
    for bomb in (_ByteArrayBomb(), _LinearBomb()):
        assert len(pickle.dumps(bomb, protocol=2)) < 600
        names = [arg for op, arg, _ in pickletools.genops(pickle.dumps(bomb, protocol=2)) if op.name == "GLOBAL"]
        assert names


@pytest.fixture
def loading_forbidden(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.load fails the test: a bomb must be refused before anything is loaded (or allocated)."""
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.load was reached: the file was not refused before loading")

    monkeypatch.setattr(torch, "load", forbidden)


@pytest.mark.parametrize("name", ["bytearray", "linear", "bytearray_legacy"])
@pytest.mark.parametrize("as_weights", [False, True])
def test_pickle_bombs_are_refused_before_loading(bombs: dict[str, Path], name: str, as_weights: bool,
                                                 factory_file: Path, loading_forbidden: None,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    args = (["plan", f"{factory_file}:build", "--weights", str(bombs[name]), "--budget", "1MB"] if as_weights
            else ["plan", str(bombs[name]), "--budget", "1MB"])
    line = _refused(args, capsys)
    assert ("bytearray" if "bytearray" in name else "Linear") in line


def test_bytearray_bomb_under_a_memory_limit(bombs: dict[str, Path]) -> None:
    # End to end in a child limited to 2 GiB: a 3.2 GB bytearray that got through would be a MemoryError there.
    done = _cli_under_memory_limit(["plan", str(bombs["bytearray"]), "--budget", "1MB"])
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "bytearray" in lines[0], done.stderr


def test_zip_bomb_is_refused_before_inflating(tmp_path: Path, factory_file: Path, loading_forbidden: None,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    bomb = _zip_bomb(tmp_path / "bomb.pt")
    assert bomb.stat().st_size < 2**20
    line = _refused(["plan", f"{factory_file}:build", "--weights", str(bomb), "--budget", "1MB"], capsys)
    assert "zip bomb" in line


def test_declared_storage_larger_than_its_member_is_refused(tmp_path: Path, factory_file: Path,
                                                            loading_forbidden: None,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    # A state dict whose data.pkl claims a 1e9-element storage backed by a 64-byte member.
    good = io.BytesIO()
    torch.save({"0.weight": torch.zeros(16)}, good)
    path = tmp_path / "liar.pt"
    with zipfile.ZipFile(good) as old, zipfile.ZipFile(path, "w") as new:
        for info in old.infolist():
            data = old.read(info)
            if info.filename.endswith("data.pkl"):
                data = data.replace(b"K\x10", b"J\x00\xca\x9a\x3b")  # BININT1 16 -> BININT 1_000_000_000
            new.writestr(info, data)
    line = _refused(["plan", f"{factory_file}:build", "--weights", str(path), "--budget", "1MB"], capsys)
    assert "memory bomb" in line


# ---------------------------------------------------------------------------------------------------------------
# Globals whose import would run code


def test_global_naming_a_main_module_is_not_imported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = set(sys.modules)
    path = tmp_path / "main_global.pt"
    # A pickle whose only global is torch.utils.model_dump.__main__.main: importing that module runs torch's
    # model_dump CLI.
    data = b"\x80\x02ctorch.utils.model_dump.__main__\nmain\nq\x00."
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", data)
        archive.writestr("archive/version", "3\n")
        archive.writestr("archive/byteorder", "little")
    path.write_bytes(buffer.getvalue())
    _refused(["plan", str(path), "--budget", "1MB"], capsys)
    imported = set(sys.modules) - before
    assert not any(name.startswith("torch.utils.model_dump") for name in imported), imported


def test_global_resolution_imports_nothing() -> None:
    from planner.models.sources import _import_torch_global

    before = set(sys.modules)
    assert _import_torch_global("torch.utils.model_dump.__main__.main") is None
    assert _import_torch_global("torch.onnx.export") is None  # torch's lazy __getattr__ would import torch.onnx
    assert _import_torch_global("os.system") is None
    assert _import_torch_global("torch.nn.modules.linear.Linear") is nn.Linear
    assert set(sys.modules) == before


# ---------------------------------------------------------------------------------------------------------------
# Shapes, paths, FIFOs


FACTORY = """
import torch
from torch import nn

def build():
    return nn.Sequential(nn.Linear(8, 4)), torch.randn(2, 8)
"""


@pytest.fixture(scope="module")
def factory_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("factory") / "models.py"
    path.write_text(FACTORY)
    return path


def test_input_rank_is_capped(factory_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shape = ",".join(["1"] * 101)
    line = _refused(["plan", f"{factory_file}:build", "--input-shape", shape, "--budget", "1MB"], capsys)
    assert f"at most {MAX_INPUT_RANK}" in line
    line = _refused(["inspect", f"{factory_file}:build", "--input-shape", shape], capsys)
    assert f"at most {MAX_INPUT_RANK}" in line


@pytest.mark.parametrize("extra", [["--input-shape", "100000,100000,8"], ["--batch-size", "100000000000"]])
def test_huge_example_input_is_refused_before_allocating(factory_file: Path, extra: list[str]) -> None:
    done = _cli_under_memory_limit(["plan", f"{factory_file}:build", "--budget", "1MB", *extra])
    assert done.returncode == 2, done.stderr
    assert "example input" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_huge_zoo_batch_is_refused_before_allocating() -> None:
    done = _cli_under_memory_limit(["inspect", "zoo:convnet", "--batch-size", "10000000"])
    assert done.returncode == 2, done.stderr
    assert "example input" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_very_long_model_path(capsys: pytest.CaptureFixture[str]) -> None:
    line = _refused(["plan", "m" * 5000 + ".pt", "--budget", "1MB"], capsys)
    assert len(line) < 400


@pytest.mark.parametrize("as_weights", [False, True])
def test_fifo_fails_at_once(tmp_path: Path, factory_file: Path, as_weights: bool) -> None:
    fifo = tmp_path / "model.pt"
    os.mkfifo(fifo)
    args = (["plan", f"{factory_file}:build", "--weights", str(fifo), "--budget", "1MB"] if as_weights
            else ["plan", str(fifo), "--budget", "1MB"])
    # A timeout turns a hang into a failure instead of blocking the suite.
    done = subprocess.run([sys.executable, "-m", "planner.cli", *args], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2, done.stderr
    assert "FIFO" in done.stderr and len(done.stderr.strip().splitlines()) == 1
