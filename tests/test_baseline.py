"""The framework baseline: measured once in a fresh process, cached per machine and library versions."""

import json
from pathlib import Path

import pytest

from planner.runtimes import baseline


def test_measured_once_then_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLANNER_CACHE_DIR", str(tmp_path))
    measured = baseline.framework_baseline("torch")
    # Python plus an imported, warmed-up torch is well over 100 MB resident; an empty interpreter is ~10 MB.
    assert measured is not None and 100e6 < measured < 2e9
    cache = json.loads((tmp_path / baseline.CACHE_FILE).read_text())
    assert cache == {baseline.cache_key("torch"): measured}

    def no_second_measurement(backend: str) -> int:
        raise AssertionError("measured again despite the cache")

    monkeypatch.setattr(baseline, "_measure", no_second_measurement)
    assert baseline.framework_baseline("torch") == measured


def test_damaged_or_foreign_cache_is_measured_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLANNER_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(baseline, "_measure", lambda backend: 123_000_000)
    (tmp_path / baseline.CACHE_FILE).write_text("{not json")
    assert baseline.framework_baseline("onnxruntime") == 123_000_000
    # Another machine's entry stays; this machine's is added beside it.
    (tmp_path / baseline.CACHE_FILE).write_text(json.dumps({"torch|other-host": 1}))
    assert baseline.framework_baseline("torch") == 123_000_000
    assert json.loads((tmp_path / baseline.CACHE_FILE).read_text())["torch|other-host"] == 1


def test_unwritable_cache_still_gives_the_figure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("PLANNER_CACHE_DIR", str(blocker / "cache"))  # a directory under a file cannot exist
    monkeypatch.setattr(baseline, "_measure", lambda backend: 7)
    assert baseline.framework_baseline("torch") == 7
