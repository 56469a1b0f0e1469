"""A battery of hostile and broken inputs: each is one clear line on stderr, exit 2, no traceback,
no code from a file run, nothing the user had overwritten. And a recipe that exhausts memory costs
only its own row."""

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from planner.cli.commands import main

MARKER_CODE = "import pathlib; pathlib.Path({path!r}).write_text('pwned')"


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (exec, (MARKER_CODE.format(path=str(self.marker)),))


FACTORY = """
import torch
from torch import nn

def build():
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16)), torch.randn(2, 32)

def broken():
    raise RuntimeError("factory exploded")

def not_a_module():
    return 42
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hostile")
    marker = root / "MARKER"
    paths = {"root": root, "marker": marker}
    (root / "factory.py").write_text(FACTORY)
    paths["factory"] = root / "factory.py"
    (root / "syntax.py").write_text("def build(:\n")
    paths["syntax"] = root / "syntax.py"
    good = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))
    torch.save(good.state_dict(), root / "state.pt")
    paths["state"] = root / "state.pt"
    torch.save(nn.Linear(5, 5).state_dict(), root / "other.pt")
    paths["other"] = root / "other.pt"
    raw = (root / "state.pt").read_bytes()
    (root / "truncated.pt").write_bytes(raw[: len(raw) // 2])
    paths["truncated"] = root / "truncated.pt"
    (root / "empty.pt").write_bytes(b"")
    paths["empty"] = root / "empty.pt"
    (root / "random.pt").write_bytes(os.urandom(4096))
    paths["random"] = root / "random.pt"
    (root / "random.pt2").write_bytes(os.urandom(4096))
    paths["random_pt2"] = root / "random.pt2"
    with zipfile.ZipFile(root / "wrong.pt", "w") as archive:
        archive.writestr("hello.txt", "not a model")
    paths["wrong_zip"] = root / "wrong.pt"
    torch.save({"model": _Evil(marker)}, root / "evil.pt")
    paths["evil"] = root / "evil.pt"
    (root / "bad.toml").write_text('[[recipe]]\nname = "x"\ndtype = "float32"\nprune = \n')
    paths["bad_toml"] = root / "bad.toml"
    (root / "a_file").write_text("I am a file, not a directory")
    paths["a_file"] = root / "a_file"
    return paths


def cases(p: dict[str, Path]) -> list[tuple[list[str], str]]:
    factory = f"{p['factory']}:build"
    return [
        (["plan", str(p["root"] / "missing.pt"), "--budget", "1MB"], "missing.pt"),
        (["plan", str(p["empty"]), "--budget", "1MB"], "empty"),
        (["plan", str(p["truncated"]), "--budget", "1MB"], "truncated.pt"),
        (["plan", str(p["random"]), "--budget", "1MB"], "random.pt"),
        (["plan", str(p["random_pt2"]), "--budget", "1MB"], "random.pt2"),
        (["plan", str(p["wrong_zip"]), "--budget", "1MB"], "wrong.pt"),
        (["plan", str(p["state"]), "--budget", "1MB"], "factory"),
        (["plan", str(p["evil"]), "--budget", "1MB"], "--trust-code"),
        (["plan", factory, "--weights", str(p["evil"]), "--budget", "1MB"], "--trust-code"),
        (["plan", factory, "--weights", str(p["other"]), "--budget", "1MB"], "does not match"),
        (["plan", factory, "--input-shape", "2,31", "--budget", "1MB"], "0 (Linear)"),
        (["plan", factory, "--budget", "-5MB"], "-5MB"),
        (["plan", factory, "--budget", "0"], "'0'"),
        (["plan", factory, "--budget", "12XB"], "12XB"),
        (["plan", factory, "--budget", "5 M B"], "5 M B"),
        (["plan", factory, "--budget", "1e400GB"], "1e400GB"),
        (["plan", factory, "--budget", "1MB", "--recipes", "int8-dynamik"], "did you mean"),
        (["plan", factory, "--budget", "1MB", "--recipe-file", str(p["bad_toml"])], "line 4"),
        (["plan", factory, "--budget", "1MB", "--recipe-file", str(p["root"] / "nope.toml")], "nope.toml"),
        (["plan", factory, "--budget", "1MB", "--out", str(p["a_file"] / "sub")], "--out"),
        (["plan", f"{p['factory']}:broken", "--budget", "1MB"], "factory exploded"),
        (["plan", f"{p['factory']}:not_a_module", "--budget", "1MB"], "not_a_module"),
        (["plan", f"{p['factory']}:missing_function", "--budget", "1MB"], "missing_function"),
        (["plan", f"{p['syntax']}:build", "--budget", "1MB"], "syntax.py"),
        (["plan", factory, "--budget", "1MB", "--input-shape", "1,abc"], "1,abc"),
        (["plan", factory, "--budget", "1MB", "--batch-size", "0"], "batch"),
        (["plan", factory, "--budget", "1MB", "--memory-cap", "-1GB"], "-1GB"),
        (["plan", factory, "--budget", "1MB", "--budget-on", "flash"], "flash"),
        (["plan", "zoo:nosuchmodel", "--budget", "1MB"], "nosuchmodel"),
        (["plan", factory, "--budget", "1MB", "--timeout", "0"], "--timeout"),
    ]


def test_battery_of_bad_inputs(files: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    battery = cases(files)
    assert len(battery) >= 20
    for args, expected in battery:
        code = main(args)
        captured = capsys.readouterr()
        lines = [line for line in captured.err.splitlines() if line.strip()]
        assert code == 2, (args, captured.err)
        assert len(lines) == 1, (args, captured.err)
        assert lines[0].startswith("error: ") and "Traceback" not in captured.err
        assert expected in lines[0], (args, lines[0])
        assert not files["marker"].exists(), f"code from a model file ran for {args}"


def test_debug_shows_the_traceback(files: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    assert main(["plan", str(files["random"]), "--budget", "1MB", "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_results_are_not_overwritten_without_force(files: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    out = files["root"] / "results"
    out.mkdir()
    (out / "plan.json").write_text("precious")
    assert main(["plan", f"{files['factory']}:build", "--budget", "1MB", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "plan.json").read_text() == "precious"


MEMORY_HOG = """
import torch
from torch import nn

class Hog(nn.Module):
    # Harmless in float32; in bfloat16 its forward allocates 3 GB, as a runaway recipe would.
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 64)

    def forward(self, x):
        if x.dtype == torch.bfloat16:
            waste = torch.ones(3_000_000_000 // 2, dtype=torch.bfloat16)
            x = x + waste[:1]
        return self.fc(x)

def build():
    return Hog(), torch.randn(4, 64)
"""


def test_a_recipe_that_exhausts_memory_costs_only_its_row(tmp_path: Path) -> None:
    (tmp_path / "hog.py").write_text(MEMORY_HOG)
    done = subprocess.run([sys.executable, "-m", "planner.cli", "plan", f"{tmp_path / 'hog.py'}:build",
                           "--budget", "1GB", "--backend", "torch", "--recipes", "fp32,bf16,int8-dynamic",
                           "--memory-cap", "1GB", "--verify", "all",  # the estimate alone rules bf16 out
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {row["recipe"]: row for row in json.loads((tmp_path / "out" / "plan.json").read_text())["rows"]}
    assert rows["bf16"]["status"] == "failed" and "memory cap" in rows["bf16"]["note"]
    assert rows["fp32"]["status"] == "verified" and rows["int8-dynamic"]["status"] == "verified"


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text in (proc / "cmdline").read_bytes().decode(errors="ignore"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def test_ctrl_c_stops_cleanly(tmp_path: Path) -> None:
    work, out = tmp_path / "tmp", tmp_path / "out"
    work.mkdir()
    process = subprocess.Popen(
        [sys.executable, "-m", "planner.cli", "plan", "zoo:convnet", "--budget", "1GB", "--backend", "torch",
         "--recipes", "fp32,fp16,bf16,int8-dynamic", "--out", str(out)],
        env=dict(os.environ, TMPDIR=str(work)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True)
    deadline = time.monotonic() + 120
    while not list(work.rglob("fp32.result.json")):  # wait until verification is under way (any depth)
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    process.communicate(timeout=60)
    assert process.returncode == 130
    assert not list(work.glob("planner-*")), "the plan's work directory was left behind"
    assert not out.exists() or not list(out.iterdir()), "half-written results"
    assert not _processes_mentioning(str(work)), "a verification process outlived the planner"
