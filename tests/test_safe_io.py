"""The shared path and file checks: safe names, containment, regular files only."""

import os
from pathlib import Path

import pytest

from planner.core.errors import PlannerError
from planner.core.safe_io import check_name, check_regular_file, path_inside, read_text_capped


@pytest.mark.parametrize("name", ["fp32", "int4-g128", "mixed-512MB", "prune50-int8.v2", "a+b"])
def test_plain_names_pass(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["../victim", "..", "a/b", "a\\b", "/abs", "", ".hidden", "[/red]", "x" * 65,
                                  "a..b", "name with space", "c:d"])
def test_unsafe_names_are_refused(name: str) -> None:
    with pytest.raises(PlannerError, match="not allowed"):
        check_name(name)


def test_path_inside_refuses_escapes_and_symlinks(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    assert path_inside(root, "ok") == (root / "ok").resolve()
    (root / "link").symlink_to(tmp_path)
    for parts in (("..", "x"), ("link", "x"), ("/etc/passwd",)):
        with pytest.raises(PlannerError, match="would leave"):
            path_inside(root, *parts)
    with pytest.raises(PlannerError):
        path_inside(root, ".")


def test_regular_files_only(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(PlannerError, match="FIFO"):
        check_regular_file(fifo, "model file")
    with pytest.raises(PlannerError, match="device or socket"):
        check_regular_file("/dev/zero", "--recipe-file")
    with pytest.raises(PlannerError, match="directory"):
        check_regular_file(tmp_path, "model file")
    with pytest.raises(PlannerError, match="characters long"):
        check_regular_file("a" * 5000, "model file")
    big = tmp_path / "big.toml"
    big.write_text("x" * 100)
    with pytest.raises(PlannerError, match="more than the 10 allowed"):
        read_text_capped(big, "--recipe-file", 10)
    assert read_text_capped(big, "--recipe-file", 100) == "x" * 100
