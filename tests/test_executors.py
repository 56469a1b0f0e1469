"""Running a plan's row jobs several at once (planner.plan.executors): the scheduling arithmetic, the timing lock
that keeps latencies comparable, and --jobs 2 giving the rows and the pick of --jobs 1."""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
import math
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest

from planner.cli import commands
from planner.cli.commands import main
from planner.measure import timing_lock
from planner.plan.jobs import RowJob
from planner.plan.schedule import (
    BUILD_FACTOR,
    DEFAULT_FRAMEWORK_BYTES,
    UNMODELLED_FACTOR,
    default_jobs,
    next_admissible,
    predicted_job_bytes,
)

MB = 1000**2


def test_a_job_is_predicted_from_its_analytic_figure_or_its_build() -> None:
    # verifying dominates: the analytic runtime plus the runtime's own process
    assert predicted_job_bytes(900 * MB, 300 * MB, 100 * MB, 350 * MB) == 350 * MB + 900 * MB
    # building dominates: it holds the reference and the recipe's copy
    assert predicted_job_bytes(50 * MB, 10 * MB, 100 * MB, 350 * MB) == 350 * MB + BUILD_FACTOR * 100 * MB
    # a runtime whose memory is not modelled: a multiple of its file
    assert predicted_job_bytes(None, 200 * MB, 10 * MB, 60 * MB) == 60 * MB + UNMODELLED_FACTOR * 200 * MB
    # nothing known: the reference's build, and a framework the size of ExecuTorch's binding
    assert predicted_job_bytes(None, None, 100 * MB, None) == DEFAULT_FRAMEWORK_BYTES + BUILD_FACTOR * 100 * MB


def test_jobs_are_admitted_while_their_predictions_sum_under_the_cap() -> None:
    assert next_admissible([5, 3], [], 4, 2) == 0  # alone, a job always runs, even over the cap
    assert next_admissible([3, 1], [2], 4, 2) == 1  # 2 + 3 > 4: the smaller job after it goes first
    assert next_admissible([3], [2], 4, 2) is None  # waits for the running job
    assert next_admissible([1], [1, 1], 10, 2) is None  # at most --jobs at once
    assert next_admissible([7, 1], [2], None, 3) == 0  # no cap: row order
    assert next_admissible([], [1], 10, 2) is None


def test_parallel_runs_only_where_cores_allow() -> None:
    assert [default_jobs(cores) for cores in (None, 1, 2, 3, 4, 8, 64)] == [1, 1, 1, 1, 2, 4, 4]


def _script(body: str) -> list[str]:
    return [sys.executable, "-c", body]


HOLD_SHARED = """
import os, sys, time
from planner.cli import commands
from planner.cli.commands import main
from planner.measure import timing_lock
from planner.plan.jobs import RowJob
fd = timing_lock.hold_shared(sys.argv[1])
open(sys.argv[2], "w").write("held")
time.sleep(float(sys.argv[3]))
"""

TIME_ALONE = """
import json, os, sys, time
from planner.cli import commands
from planner.cli.commands import main
from planner.measure import timing_lock
from planner.plan.jobs import RowJob
os.environ[timing_lock.LOCK_ENV] = sys.argv[1]
os.environ[timing_lock.WAIT_ENV] = sys.argv[3]
os.environ[timing_lock.FD_ENV] = str(timing_lock.hold_shared(sys.argv[1]))
with timing_lock.runs_alone() as alone:
    json.dump({"alone": alone, "at": time.time()}, open(sys.argv[2], "w"))
"""


@pytest.mark.skipif(timing_lock.fcntl is None, reason="flock is POSIX")
def test_timed_runs_wait_until_the_other_workers_have_finished(tmp_path: Path) -> None:
    lock = str(tmp_path / "timing.lock")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    builder = subprocess.Popen(_script(HOLD_SHARED) + [lock, str(tmp_path / "held"), "1.5"], env=env)
    while not (tmp_path / "held").exists():
        time.sleep(0.02)
    started = time.time()
    subprocess.run(_script(TIME_ALONE) + [lock, str(tmp_path / "timed.json"), "30"], env=env, check=True)
    builder.wait()
    timed = json.loads((tmp_path / "timed.json").read_text())
    assert timed["alone"] and timed["at"] - started >= 1.0  # it waited for the build to end
    # and a machine that is not free in time: it times anyway, and says so
    builder = subprocess.Popen(_script(HOLD_SHARED) + [lock, str(tmp_path / "held2"), "3"], env=env)
    while not (tmp_path / "held2").exists():
        time.sleep(0.02)
    subprocess.run(_script(TIME_ALONE) + [lock, str(tmp_path / "timed2.json"), "0.2"], env=env, check=True)
    builder.kill()
    assert json.loads((tmp_path / "timed2.json").read_text())["alone"] is False


def test_without_a_lock_runs_count_as_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(timing_lock.LOCK_ENV, raising=False)
    with timing_lock.runs_alone() as alone:
        assert alone


def test_executor_ray_without_ray_is_one_line_with_the_install_command(monkeypatch: pytest.MonkeyPatch,
                                                                        capsys: pytest.CaptureFixture) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "ray" else
                        real_find_spec(name, *args))
    assert main(["plan", "zoo:simplenet", "--budget", "5MB", "--executor", "ray"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "pip install 'planner[ray]'" in lines[0] and "Traceback" not in lines[0]


FACTORY = """
import torch
from torch import nn

def build():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 512))
    return model, torch.randn(4, 512)
"""
# Every row verified and exported: int8 (2.1 MB) fits, fp32 (8.4 MB) does not, int4 (1.1 MB) fits.
PLAN = ["--budget", "2.5MB", "--budget-on", "disk", "--backend", "torch", "--recipes", "fp32,int8-dynamic,int4-g128",
        "--verify", "all", "--export-all"]
# Identical fresh processes differ by up to 2 MB of resident memory on an idle machine (rows.py's resolution); with
# another plan running beside them, int8-dynamic's 17.5 MB runtime (mostly fbgemm's first-use pages) measured
# 19.5 and 21.6 MB. The rows are compared within that spread; the disk bytes and SQNR must be identical.
SPREAD_BYTES = 5 * MB


def _plan(root: Path, name: str, *extra: str) -> tuple[dict, float, dict[str, int]]:
    buffer = io.StringIO()
    # Not monkeypatch: undoing it would pin the console to this test's captured stdout (rich resolves sys.stdout
    # per print only while its file is None), and later tests would print into a stream nobody reads.
    commands.console.file = buffer
    try:
        started = time.perf_counter()
        assert main(["plan", f"{root / 'mlp.py'}:build", *PLAN, "--out", str(root / name),
                     "--export", str(root / f"{name}-export"), *extra]) == 0, buffer.getvalue()
        seconds = time.perf_counter() - started
    finally:
        commands.console.file = None
    exported = {str(path.relative_to(root / f"{name}-export")): path.stat().st_size
                for path in (root / f"{name}-export").rglob("*") if path.is_file() and path.name != "manifest.json"}
    return json.loads((root / name / "plan.json").read_text()), seconds, exported


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("executors")
    (root / "mlp.py").write_text(FACTORY)
    return root


@pytest.fixture(scope="module")
def one_at_a_time(mlp: Path) -> tuple[dict, float, dict[str, int]]:
    return _plan(mlp, "jobs1", "--jobs", "1")


def _assert_same_plan(plan: dict, exported: dict[str, int], reference: tuple[dict, float, dict[str, int]]) -> None:
    expected, _, expected_exports = reference
    assert plan["pick"] == expected["pick"] == "int8-dynamic"
    assert [(row["recipe"], row["backend"]) for row in plan["rows"]] == \
        [(row["recipe"], row["backend"]) for row in expected["rows"]]
    for row, other in zip(plan["rows"], expected["rows"], strict=True):
        assert row["status"] == other["status"] == "verified"
        assert row["verified_disk_bytes"] == other["verified_disk_bytes"]
        assert row["fits"] == other["fits"]
        assert abs(row["verified_runtime_bytes"] - other["verified_runtime_bytes"]) <= SPREAD_BYTES
        assert row["sqnr_db"] == (other["sqnr_db"] if isinstance(other["sqnr_db"], str)  # "inf": the reference
                                  else pytest.approx(other["sqnr_db"], rel=1e-6))
    assert exported == expected_exports  # the same artifacts, byte for byte in size


def test_two_jobs_at_once_give_the_rows_and_pick_of_one(mlp: Path, one_at_a_time: tuple) -> None:
    plan, _, exported = _plan(mlp, "jobs2", "--jobs", "2")
    _assert_same_plan(plan, exported, one_at_a_time)


def test_a_plan_on_a_local_ray_instance_matches_the_local_executor(mlp: Path, one_at_a_time: tuple,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("ray")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # a private instance, never someone else's cluster
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(sys.path))  # Ray's workers import this planner
    plan, seconds, exported = _plan(mlp, "ray", "--executor", "ray")
    _assert_same_plan(plan, exported, one_at_a_time)
    assert not (Path.home() / ".ray" / "auth_token").exists()  # token auth off: nothing written under the home
    print(f"ray plan: {seconds:.1f} s")


def _job(workdir: Path) -> RowJob:
    return RowJob(label="applying int8-dynamic", recipe={"name": "int8-dynamic"}, runtime="torch", runtime_state={},
                  source={"spec": "zoo:simplenet", "kind": "zoo"}, options={"budget_bytes": 5 * MB, "timeout_s": 60.0},
                  workdir=str(workdir), fp32_path=str(workdir / "fp32.pt"), reference={"sqnr_db": math.inf},
                  predicted_bytes=400 * MB)


def test_a_job_is_plain_data_that_travels(tmp_path: Path) -> None:
    job = _job(tmp_path)
    assert pickle.loads(pickle.dumps(job)) == job  # what Ray ships to a task
    json.dumps(dataclasses.asdict(job))  # and nothing in it but JSON's types


def test_a_task_that_cannot_see_the_work_directory_says_so(tmp_path: Path) -> None:
    from planner.plan.ray_executor import WorkdirNotVisible, run_in_task

    with pytest.raises(WorkdirNotVisible, match="lacks inputs.pt, reference.pt"):
        run_in_task(_job(tmp_path / "elsewhere"), {})


def test_a_jobs_options_keep_a_generation_plan() -> None:
    """--context travels with each job: the worker must generate, not run one forward."""
    from planner.analysis.generation import GenerationSpec
    from planner.runtimes.rows import PlanOptions

    options = PlanOptions(budget_bytes=5 * MB, backends=("torch", "onnxruntime"), generation=GenerationSpec(256, 8))
    fields = options.to_fields()
    json.dumps(fields)
    assert PlanOptions.from_fields(pickle.loads(pickle.dumps(fields))) == options
