"""Hostile names, paths and outputs: a recipe name never becomes a path outside its root, --force replaces only
what the planner wrote, two plans never share an output directory, recipe files are bounded, and every bad
input or failed write is one `error:` line, exit 2, with the user's files untouched (content and mtime)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from planner import report
from planner.cli.commands import main
from planner.core.errors import PlannerError
from planner.recipes.recipe import MAX_LAYER_ENTRIES, MAX_RECIPE_FILE_BYTES, check_recipe_name, load_recipe_file

PLAN = ["plan", "zoo:simplenet", "--budget", "50MB", "--budget-on", "runtime", "--backend", "torch"]


def snapshot(root: Path) -> dict[str, tuple[bytes | None, int]]:
    """Every entry under ROOT with its content (files) and mtime: to prove nothing the user had was touched."""
    found = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        found[str(path.relative_to(root))] = (path.read_bytes() if path.is_file() and not path.is_symlink()
                                              else None, info.st_mtime_ns)
    return found


def error_line(capsys: pytest.CaptureFixture) -> str:
    """The single stderr line of a refused command (and no traceback)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def recipe_file(path: Path, name: str) -> Path:
    path.write_text(f'[[recipe]]\nname = {json.dumps(name)}\ndtype = "float32"\n')
    return path


@pytest.fixture()
def victim(tmp_path: Path) -> Path:
    """A user's directory next to the output folders, with files that must survive everything."""
    home = tmp_path / "victimdir"
    home.mkdir()
    (home / "precious.pt").write_bytes(b"the user's model")
    (home / "notes.txt").write_text("keep me")
    return home


# ---- item 1: recipe names become paths ----

@pytest.mark.parametrize("name", ["../victimdir", "../../escaped", "..", "a/../../b", "/abs/path", "x/y",
                                  "[/red]", "inputs", "reference", "evil.onnx", "evil.fp32", "a\nb", "mixed:../x"])
def test_hostile_recipe_names_are_refused_where_recipes_enter(name: str, tmp_path: Path, victim: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    export, out = tmp_path / "export", tmp_path / "out"
    toml = recipe_file(tmp_path / "evil.toml", name)
    before = snapshot(victim)
    for flags in ([], ["--export", str(export), "--export-all", "--force"], ["--export", str(export)],
                  ["--out", str(out), "--force"]):
        assert main([*PLAN, "--recipe-file", str(toml), *flags]) == 2
        assert "not allowed" in error_line(capsys)
        assert snapshot(victim) == before
        assert not (tmp_path / "escaped").exists() and not export.exists() and not out.exists()


def test_a_name_aimed_at_a_user_file_from_the_work_directory(tmp_path: Path, victim: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    """The reported attack: from the work directory (TMPDIR/planner-XXXX) a name walks up to precious.pt, which
    the plan overwrote with an artifact and then deleted. It is refused before any work; the file is untouched."""
    import tempfile

    work = Path(tempfile.gettempdir()) / "planner-xxxxxxxx"
    name = os.path.relpath(victim / "precious", work)
    assert name.startswith("..")
    before = snapshot(victim)
    assert main([*PLAN, "--recipe-file", str(recipe_file(tmp_path / "aimed.toml", name))]) == 2
    assert "not allowed" in error_line(capsys)
    assert snapshot(victim) == before


def test_names_in_recipes_option_and_mixed_budgets(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([*PLAN, "--recipes", "fp32,../../escaped"]) == 2
    assert "not allowed" in error_line(capsys)
    assert main([*PLAN, "--mixed-budgets", "../x"]) == 2
    error_line(capsys)
    assert check_recipe_name("mixed:512MB") == "mixed:512MB"  # the planner's own rows, and re-applied files


def test_export_refuses_a_name_that_escapes_even_past_validation(tmp_path: Path, victim: Path) -> None:
    """Second line of defence: a name that reached the export (bypassing validation) cannot leave --export."""
    export = tmp_path / "export"
    export.mkdir()
    artifact = tmp_path / "work" / "a.pt"
    artifact.parent.mkdir()
    artifact.write_bytes(b"artifact")
    before = snapshot(victim)
    for name in ("../victimdir", "../victimdir/precious.pt", "../../escaped"):
        result = SimpleNamespace(artifact=lambda *_: artifact, row=lambda *_, name=name: {"recipe": name}, model="m")
        with pytest.raises(PlannerError, match="would leave"):
            report.export_artifacts(result, [(name, "torch")], export, {name: {}}, {})
    assert snapshot(victim) == before
    assert not (tmp_path.parent / "escaped").exists()
    assert [p.name for p in export.iterdir()] == []  # no staging folder left behind


def test_work_directory_paths_stay_inside(tmp_path: Path) -> None:
    from planner.core.safe_io import path_inside

    with pytest.raises(PlannerError, match="would leave"):
        path_inside(tmp_path, "../../precious.pt")


# ---- --force replaces only what the planner wrote ----

def test_force_refuses_folders_it_did_not_write(tmp_path: Path, victim: Path, capsys: pytest.CaptureFixture) -> None:
    export = tmp_path / "export"
    export.mkdir()
    (export / "fp32").mkdir()
    (export / "fp32" / "mine.txt").write_text("the user's, not the planner's")
    (export / "int8-dynamic").symlink_to(victim)  # a symlinked folder pointing out of --export
    before = snapshot(export), snapshot(victim)  # what is in them (the lock touches only --export itself)
    for recipes in ("fp32", "int8-dynamic"):
        assert main([*PLAN, "--recipes", recipes, "--export", str(export), "--force"]) == 2
        line = error_line(capsys)
        assert ("not written by the planner" in line) if recipes == "fp32" else ("symbolic link" in line)
    assert (snapshot(export), snapshot(victim)) == before


def test_force_replaces_a_planner_export_and_its_results(tmp_path: Path, victim: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    """A real plan twice on the same --out/--export: the second needs --force, replaces exactly the planner's
    own files, and leaves nothing else (no lock file, no staging folder) behind."""
    out, export = tmp_path / "out", tmp_path / "export"
    args = [*PLAN, "--recipes", "fp32", "--out", str(out), "--export", str(export)]
    assert main(args) == 0, capsys.readouterr()
    first = json.loads((export / "fp32" / "manifest.json").read_text())
    assert first["recipe"]["name"] == "fp32"
    capsys.readouterr()
    assert main(args) == 2
    assert "--force" in error_line(capsys)
    before = snapshot(victim)
    assert main([*args, "--force"]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in export.iterdir()) == ["fp32"]
    assert sorted(p.name for p in out.iterdir()) == sorted(["plan.csv", "plan.md", "plan.json", "plan.png",
                                                            "layers.csv"])
    assert snapshot(victim) == before


# ---- item 2: two plans on one output directory ----

HOLD_LOCK = """
import sys, time
from pathlib import Path
from planner.report import directory_lock
with directory_lock(Path(sys.argv[1]), "--out"):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_a_second_plan_on_a_locked_out_fails_at_once_naming_the_first(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        for flag in ("--out", "--export"):
            assert main([*PLAN, "--recipes", "fp32", flag, str(out)]) == 2
            line = error_line(capsys)
            assert f"in use by another plan (pid {holder.pid})" in line, line
        assert time.monotonic() - started < 10  # refused before any work
    finally:
        holder.kill()
        holder.wait()
    assert list(out.iterdir()) == []  # the lock is on the directory itself: a killed holder leaves no file
    with report.directory_lock(out, "--out"):  # the kernel released the dead holder's lock
        with pytest.raises(PlannerError, match=f"pid {os.getpid()}"):
            with report.directory_lock(out, "--out"):
                pass
    assert list(out.iterdir()) == []


def test_lock_holder_is_read_from_the_kernels_lock_table(tmp_path: Path) -> None:
    table = tmp_path / "locks"
    table.write_text("1: POSIX  ADVISORY  WRITE 11 fd:01:42 0 EOF\n"
                     "2: FLOCK  ADVISORY  WRITE 4321 fd:01:42 0 EOF\n"
                     "2: -> FLOCK  ADVISORY  WRITE 99 fd:01:42 0 EOF\n")
    assert report.lock_holder(42, str(table)) == 4321
    assert report.lock_holder(43, str(table)) is None
    assert report.lock_holder(42, str(tmp_path / "missing")) is None


# ---- item 3: recipe files ----

def test_recipe_file_must_be_a_bounded_regular_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    big = tmp_path / "big.toml"
    big.write_bytes(b"#" * (MAX_RECIPE_FILE_BYTES + 1))
    for path, expected in (("/dev/zero", "device"), (str(fifo), "FIFO"), (str(big), "allowed"),
                           (str(tmp_path), "directory")):
        for command in (PLAN, ["recipes"], ["inspect", "zoo:simplenet"]):
            started = time.monotonic()
            assert main([*command, "--recipe-file", path]) == 2
            assert expected in error_line(capsys)
            assert time.monotonic() - started < 5


def test_deeply_nested_toml_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    nested = tmp_path / "nested.toml"
    nested.write_text("x = " + "[" * 100_000 + "]" * 100_000 + "\n")
    assert main(["recipes", "--recipe-file", str(nested)]) == 2
    assert "nests" in error_line(capsys)


def _layers_toml(path: Path, count: int) -> Path:
    tables = "".join(f'[[recipe.layer]]\nfqn = "l{i}"\nquantize = "none"\n' for i in range(count))
    path.write_text(f'[[recipe]]\nname = "many"\n{tables}')
    return path


def test_layer_tables_are_checked_in_linear_time_and_capped(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    started = time.monotonic()
    recipe = load_recipe_file(_layers_toml(tmp_path / "many.toml", MAX_LAYER_ENTRIES))[0]
    assert len(recipe.layer_overrides) == MAX_LAYER_ENTRIES
    assert recipe.override_for(f"l{MAX_LAYER_ENTRIES - 1}") is not None
    assert time.monotonic() - started < 10  # linear: about 2 s here; the quadratic check took minutes
    assert main(["recipes", "--recipe-file", str(_layers_toml(tmp_path / "too.toml", MAX_LAYER_ENTRIES + 1))]) == 2
    assert "more than the" in error_line(capsys)
    duplicate = tmp_path / "dup.toml"
    duplicate.write_text('[[recipe]]\nname = "d"\n' + '[[recipe.layer]]\nfqn = "a"\n' * 2)
    assert main(["recipes", "--recipe-file", str(duplicate)]) == 2
    assert "listed twice" in error_line(capsys)


def test_calibration_must_be_a_regular_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    fifo = tmp_path / "calibration.pt"
    os.mkfifo(fifo)
    assert main([*PLAN, "--mixed", "--calibration", str(fifo)]) == 2
    assert "FIFO" in error_line(capsys)


# ---- item 4: options, markup, long paths, half-written results ----

@pytest.mark.parametrize("flags", [["--timeout", "nan"], ["--timeout", "inf"], ["--timeout", "-1"],
                                   ["--memory-cap", "nan"], ["--memory-cap", "inf GB"], ["--budget", "nan"],
                                   ["--mixed-budgets", "-5MB"]])
def test_non_finite_or_negative_limits_are_refused(flags: list[str], capsys: pytest.CaptureFixture) -> None:
    assert main([*PLAN, *flags]) == 2
    assert flags[1].split()[0] in error_line(capsys)


@pytest.mark.parametrize("flag", ["--out", "--export"])
def test_a_5000_character_output_path_is_one_line(flag: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    long_path = tmp_path / ("x" * 5000)
    assert main([*PLAN, flag, str(long_path)]) == 2
    assert "too long" in error_line(capsys)
    many_parts = tmp_path.joinpath(*["d" * 200] * 25)
    assert main([*PLAN, flag, str(many_parts)]) == 2
    assert "too long" in error_line(capsys)
    assert list(tmp_path.iterdir()) == []


FACTORY = """
import torch
from torch import nn

def build():
    return nn.Sequential(nn.Linear(8, 8)), torch.randn(2, 8)
"""


def test_markup_in_paths_is_printed_as_text(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`[/` in the model path and in --out used to crash rich after the whole run, with nothing written."""
    folder = tmp_path / "odd["
    folder.mkdir()
    (folder / "b].py").write_text(FACTORY)
    out = tmp_path / "out[/bold]"
    assert main(["plan", f"{folder / 'b].py'}:build", "--budget", "50MB", "--budget-on", "runtime",
                 "--backend", "torch", "--recipes", "fp32", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "odd[/b].py" in printed and f"wrote {out / 'plan.json'}" in printed
    assert json.loads((out / "plan.json").read_text())["pick"] == "fp32"


def test_a_write_failure_midway_keeps_the_previous_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    assert main([*PLAN, "--recipes", "fp32", "--out", str(out)]) == 0
    capsys.readouterr()
    before = snapshot(out)
    real_write = Path.write_bytes
    calls = []

    def disk_fills_up(self: Path, data: bytes) -> int:
        calls.append(self.name)
        if len(calls) == 3:  # plan.csv and plan.md are written, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", disk_fills_up)
    assert main([*PLAN, "--recipes", "fp32", "--out", str(out), "--force"]) == 2
    line = error_line(capsys)
    assert "No space left on device" in line and "unchanged" in line
    assert snapshot(out) == before  # old results intact, no staging folder, no lock file


def test_full_disk_outside_the_planners_own_writes_is_one_line(monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture) -> None:
    """torch's writer reports a full disk as 'basic_ios::clear' (exit 3 before): now one line, exit 2."""
    import planner.runtimes.torch_cpu.runtime

    def full(*_: object, **__: object) -> None:
        raise RuntimeError("basic_ios::clear: iostream error")

    monkeypatch.setattr(planner.runtimes.torch_cpu.runtime, "save_artifact", full)
    assert main([*PLAN, "--recipes", "fp32"]) == 2
    assert "disk is probably full" in error_line(capsys)


def test_a_failed_export_keeps_the_previous_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    export = tmp_path / "export"
    args = [*PLAN, "--recipes", "fp32", "--export", str(export)]
    assert main(args) == 0
    capsys.readouterr()
    before = snapshot(export)

    def disk_full(*_: object, **__: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(report.shutil, "copyfile", disk_full)
    assert main([*args, "--force"]) == 2
    assert "previous export there is unchanged" in error_line(capsys)
    assert snapshot(export) == before  # the old folder as it was, no staging folder, no lock file
