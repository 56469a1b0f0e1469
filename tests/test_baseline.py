"""The framework baseline: measured once in a fresh process, cached per machine and library versions."""

import json
from pathlib import Path

import pytest

from planner.runtimes import baseline


def test_measured_once_then_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLANNER_CACHE_DIR", str(tmp_path))
    measured = baseline.framework_baseline("torch")
    # Python plus an imported torch is well over 100 MB resident; an empty interpreter is ~10 MB.
    assert measured is not None and 100e6 < measured < 2e9
    # The first tiny forward pays for the thread pool and the kernel libraries' pages: a few MB, not nothing.
    first_use = baseline.first_use_bytes("torch")
    assert first_use is not None and 0.5e6 < first_use < 100e6
    cache = json.loads((tmp_path / baseline.CACHE_FILE).read_text())
    assert cache == {baseline.cache_key("torch"): {"rss_bytes": measured, "first_use_bytes": first_use}}

    def no_second_measurement(backend: str) -> int:
        raise AssertionError("measured again despite the cache")

    monkeypatch.setattr(baseline, "_measure", no_second_measurement)
    assert baseline.framework_baseline("torch") == measured
    assert baseline.first_use_bytes("torch") == first_use


def test_damaged_or_foreign_cache_is_measured_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLANNER_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(baseline, "_measure", lambda backend: {"rss_bytes": 123_000_000, "first_use_bytes": 1})
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
    monkeypatch.setattr(baseline, "_measure", lambda backend: {"rss_bytes": 7, "first_use_bytes": 1})
    assert baseline.framework_baseline("torch") == 7


def test_one_outlying_process_does_not_become_the_cached_figure(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Right after an install one process measured torch's first use at 20.2 MB, later ones 5.5 MB: the cached
    figure is the median of MEASURE_SAMPLES fresh processes."""
    from planner.measure import isolation

    monkeypatch.setenv("PLANNER_CACHE_DIR", str(tmp_path / "cache"))
    first_uses = iter([20_200_000, 5_500_000, 5_600_000])

    def fake_process(argv: list[str], **kwargs: object) -> isolation.Outcome:
        Path(argv[-2]).write_text(json.dumps({"rss_bytes": 380_000_000, "first_use_bytes": next(first_uses)}))
        return isolation.Outcome(returncode=0, stderr="", failure=None, peak_rss_bytes=0)

    monkeypatch.setattr(isolation, "run_isolated", fake_process)
    assert baseline.MEASURE_SAMPLES == 3
    assert baseline.first_use_bytes("torch") == 5_600_000
    assert baseline.framework_baseline("torch") == 380_000_000
