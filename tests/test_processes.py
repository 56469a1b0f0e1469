"""The model's code runs under the planner's limits, and no process or temporary outlives a run.

The real console entry point (`planner`, supervised) is started as a subprocess with a private TMPDIR and a
unique token in its environment: every process of the run inherits it, so /proc shows what is left.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from planner.cli import supervisor
from planner.cli.commands import main
from planner.measure import workdirs

# Misbehaves on request. HOSTILE_MODE: how; HOSTILE_WHERE: in the planner process or in a verification worker
# (a worker has PLANNER_WORKER=1 in its environment, the planner does not).
HOSTILE = """
import ctypes
import os
import pathlib
import subprocess
import time

import torch
from torch import nn


def _here():
    return "worker" if os.environ.get("PLANNER_WORKER") == "1" else "planner"


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)
        self.spawned = False

    def forward(self, x):
        mode = os.environ.get("HOSTILE_MODE", "")
        only = os.environ.get("HOSTILE_DTYPE")
        if mode and _here() == os.environ.get("HOSTILE_WHERE", "planner") and (not only or str(x.dtype) == only):
            started = os.environ.get("HOSTILE_STARTED")
            if started:
                pathlib.Path(started).write_text(str(os.getpid()))
            if mode == "sleep":
                time.sleep(1000)
            elif mode == "sleep-child":
                subprocess.Popen(["sleep", "1000"])  # a grandchild: it must die with the run
                time.sleep(1000)
            elif mode == "spawn" and not self.spawned:
                self.spawned = True
                subprocess.Popen(["sleep", "1000"])  # left running by a forward that returns normally
            elif mode == "exit":
                os._exit(3)
            elif mode == "segv":
                ctypes.string_at(0)
            elif mode == "hog":
                hoard = []
                for _ in range(40):  # up to 2 GB, 50 MB at a time
                    hoard.append(b"x" * 50_000_000)
                    time.sleep(0.02)
        return self.fc(x)


def build():
    return Net(), torch.randn(2, 8)


def score(model):
    return float(model(torch.ones(1, 8)).sum())


def eval_hangs(model):
    time.sleep(1000)


def eval_exits(model):
    os._exit(4)
"""

TOKEN_VAR = "PLANNER_TEST_TOKEN"
START_S = 120  # generous: four engineers share two cores
GONE_S = 30


def _planner_command() -> list[str]:
    script = Path(sys.executable).with_name("planner")
    return [str(script)] if script.exists() else [sys.executable, "-m", "planner.cli"]


@pytest.fixture
def run(tmp_path: Path) -> Iterator[dict]:
    """A private TMPDIR (short, as a user's is: the fork server's socket path must fit in 107 bytes), the
    hostile model file, and a unique token for this run's processes."""
    (tmp_path / "hostile.py").write_text(HOSTILE)
    scratch = Path(tempfile.mkdtemp(prefix="ptest-"))
    token = uuid.uuid4().hex
    env = dict(os.environ, TMPDIR=str(scratch), **{TOKEN_VAR: token})
    env.pop("PLANNER_NO_SUPERVISOR", None)
    yield {"root": tmp_path, "model": f"{tmp_path / 'hostile.py'}:build", "tmp": scratch, "token": token,
           "env": env}
    shutil.rmtree(scratch, ignore_errors=True)


def _processes_with(token: str) -> list[int]:
    """Live processes whose environment carries the token (zombies have no readable environment)."""
    needle = f"{TOKEN_VAR}={token}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if needle in (proc / "environ").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def _semaphores_mapped(pids: list[int]) -> set[str]:
    names = set()
    for pid in pids:
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            continue
        names |= {line.split()[-1] for line in maps.splitlines() if "/dev/shm/" in line}
    return names


def _wait_until(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def _assert_nothing_left(run: dict) -> None:
    _wait_until(lambda: not _processes_with(run["token"]), GONE_S, "a process of the run outlived it")
    _wait_until(lambda: not list(run["tmp"].iterdir()), GONE_S,
                f"temporaries left behind: {sorted(p.name for p in run['tmp'].iterdir())}")


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.mark.parametrize(("mode", "options", "expected"), [
    ("sleep", ["--timeout", "3"], "timed out after 3 s (--timeout) while describing the model"),
    ("exit", [], "exited with status 3 while describing the model"),
    ("segv", [], "segmentation fault (signal 11) while describing the model"),
    ("hog", ["--memory-cap", "500MB"], "exceeded the memory cap of 500 MB (--memory-cap) while describing the model"),
])
def test_the_models_code_in_the_planner_is_held_to_the_limits(run: dict, mode: str, options: list[str],
                                                              expected: str) -> None:
    out = run["root"] / "out"
    started = time.monotonic()
    done = subprocess.run([*_planner_command(), "plan", run["model"], "--budget", "1GB", "--recipes", "fp32",
                           "--backend", "torch", "--out", str(out), *options],
                          env=dict(run["env"], HOSTILE_MODE=mode), capture_output=True, text=True, timeout=180)
    assert done.returncode == 2, done.stdout + done.stderr
    assert expected in _one_error_line(done.stderr)
    if mode == "sleep":
        assert time.monotonic() - started < 90, "the timeout did not stop the sleeping forward"
    assert not out.exists() or not list(out.iterdir()), "nothing may be written for a plan that did not finish"
    _assert_nothing_left(run)


def test_inspect_is_held_to_the_timeout_too(run: dict) -> None:
    done = subprocess.run([*_planner_command(), "inspect", run["model"], "--timeout", "3"],
                          env=dict(run["env"], HOSTILE_MODE="sleep"), capture_output=True, text=True, timeout=180)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "timed out after 3 s (--timeout)" in _one_error_line(done.stderr)
    _assert_nothing_left(run)


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGKILL],
                         ids=lambda number: signal.Signals(number).name)
def test_a_signal_mid_verification_leaves_nothing(run: dict, number: int) -> None:
    """The signal goes to the planner's pid alone (not its group, as a terminal would): the planner must
    stop its child, the fork server, the hanging worker and the grandchild the worker started."""
    marker = run["root"] / "worker-started"
    env = dict(run["env"], HOSTILE_MODE="sleep-child", HOSTILE_WHERE="worker", HOSTILE_STARTED=str(marker))
    out = run["root"] / "out"
    with open(run["root"] / "stderr", "w+") as stderr:
        process = subprocess.Popen([*_planner_command(), "plan", run["model"], "--budget", "1GB", "--recipes",
                                    "fp32", "--backend", "torch", "--out", str(out)],
                                   env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            _wait_until(lambda: marker.exists() or process.poll() is not None, START_S, "the worker never started")
            assert process.poll() is None, Path(stderr.name).read_text()
            time.sleep(0.5)  # the grandchild is started right after the marker
            semaphores = _semaphores_mapped(_processes_with(run["token"]))
            os.kill(process.pid, number)
            process.wait(timeout=GONE_S)
        finally:
            if process.poll() is None:
                process.kill()
        _assert_nothing_left(run)
        if number != signal.SIGKILL:
            assert process.returncode == 130
            stderr.seek(0)
            assert [line for line in stderr.read().splitlines() if line.strip()] == ["interrupted"]
    assert not out.exists() or not list(out.iterdir())
    assert not [name for name in semaphores if Path(name).exists()], "semaphores left in /dev/shm"


@pytest.mark.parametrize("delay_s", [0.3, 1.5, 4.0])
def test_an_early_ctrl_c_is_never_swallowed(run: dict, delay_s: float) -> None:
    """SIGINT at points of the start (the child starting, importing torch, building the model, starting the
    fork server) always ends the run as an interrupt: exit 130, one line, nothing left."""
    with open(run["root"] / "stderr", "w+") as stderr:
        process = subprocess.Popen([*_planner_command(), "plan", "zoo:simplenet", "--budget", "1GB", "--recipes",
                                    "fp32", "--backend", "torch"], env=run["env"], stdout=subprocess.DEVNULL,
                                   stderr=stderr)
        time.sleep(delay_s)
        os.kill(process.pid, signal.SIGINT)
        process.wait(timeout=GONE_S)
        stderr.seek(0)
        assert process.returncode == 130, stderr.read()
        stderr.seek(0)
        assert [line for line in stderr.read().splitlines() if line.strip()] == ["interrupted"]
    _assert_nothing_left(run)


def test_ctrl_c_while_a_worker_is_forked_is_raised_after_the_fork(tmp_path: Path) -> None:
    """The early-Ctrl-C case above, made certain: a KeyboardInterrupt inside Python's at-fork hooks (logging's
    _releaseLock) is printed as "Exception ignored" and lost, so run_isolated defers Ctrl-C around its fork and
    raises it after; the worker itself starts with the default handling."""
    from planner.measure import isolation

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        reached = False
        with pytest.raises(KeyboardInterrupt):
            with isolation.stop_signals_deferred():  # what run_isolated does around its Popen
                signal.raise_signal(signal.SIGINT)
                reached = True  # not raised here, where the fork's hooks would run
        assert reached and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        handlers = "import signal, sys; sys.stderr.write(repr(signal.getsignal(signal.SIGTERM)))"
        outcome = isolation.run_isolated([sys.executable, "-c", handlers], timeout_s=60, memory_cap_bytes=None,
                                         env=dict(os.environ), scratch_dir=tmp_path)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert outcome.returncode == 0 and outcome.stderr == "<Handlers.SIG_DFL: 0>", outcome.stderr


def test_a_normal_plan_kills_what_a_worker_left_running(run: dict) -> None:
    """Also under a TMPDIR too long for the fork server's socket: workers then start the plain way."""
    long_tmp = run["root"] / ("a-temporary-folder-with-a-long-name-" * 2)
    long_tmp.mkdir()
    run["tmp"] = long_tmp
    env = dict(run["env"], HOSTILE_MODE="spawn", HOSTILE_WHERE="worker", TMPDIR=str(long_tmp))
    done = subprocess.run([*_planner_command(), "plan", run["model"], "--budget", "1GB", "--recipes", "fp32",
                           "--backend", "torch"], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    _assert_nothing_left(run)


def test_in_process_each_row_kills_its_workers_children(run: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """planner.cli.commands.main in-process (no supervisor): the worker's process group dies with its row."""
    for key, value in {TOKEN_VAR: run["token"], "HOSTILE_MODE": "spawn", "HOSTILE_WHERE": "worker"}.items():
        monkeypatch.setenv(key, value)
    assert main(["plan", run["model"], "--budget", "1GB", "--recipes", "fp32", "--backend", "torch"]) == 0
    _wait_until(lambda: not _processes_with(run["token"]) or _only_the_fork_server(run["token"]), GONE_S,
                "the worker's grandchild outlived its row")


def _only_the_fork_server(token: str) -> bool:
    """In-process, the fork server (and multiprocessing's resource tracker) stay up for the next plan."""
    for pid in _processes_with(token):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"multiprocessing" not in command:
            return False
    return True


def _rows(out: Path) -> dict:
    return {row["recipe"]: row for row in json.loads((out / "plan.json").read_text())["rows"]}


def test_a_worker_that_exits_without_a_result_is_a_row_note(run: dict, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture) -> None:
    for key, value in {"HOSTILE_MODE": "exit", "HOSTILE_WHERE": "worker", "HOSTILE_DTYPE": "torch.bfloat16"}.items():
        monkeypatch.setenv(key, value)
    out = run["root"] / "out"
    assert main(["plan", run["model"], "--budget", "1GB", "--recipes", "fp32,bf16", "--backend", "torch",
                 "--out", str(out)]) == 0, capsys.readouterr().err
    rows = _rows(out)
    assert rows["fp32"]["status"] == "verified"
    assert rows["bf16"]["status"] == "failed"
    assert "exited with status 3 without a result" in rows["bf16"]["note"]


@pytest.mark.parametrize(("function", "expected"), [("eval_exits", "exited with status 4"),
                                                    ("eval_hangs", "timed out after 12 s (--timeout)")])
def test_a_failing_eval_costs_only_the_eval_figure(run: dict, function: str, expected: str,
                                                  capsys: pytest.CaptureFixture) -> None:
    out = run["root"] / "out"
    code = main(["plan", run["model"], "--budget", "1GB", "--recipes", "fp32", "--backend", "torch", "--timeout",
                 "12", "--eval", f"{run['root'] / 'hostile.py'}:{function}", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    row = _rows(out)["fp32"]
    assert row["status"] == "verified" and row["verified_runtime_bytes"] is not None and row["eval_score"] is None
    assert "--eval hostile.py:" in row["note"] and expected in row["note"], row["note"]


def test_eval_still_scores(run: dict, capsys: pytest.CaptureFixture) -> None:
    out = run["root"] / "out"
    assert main(["plan", run["model"], "--budget", "1GB", "--recipes", "fp32", "--backend", "torch", "--eval",
                 f"{run['root'] / 'hostile.py'}:score", "--out", str(out)]) == 0, capsys.readouterr().err
    assert isinstance(_rows(out)["fp32"]["eval_score"], float)


def test_stale_work_directories_are_removed(tmp_path: Path) -> None:
    dead = tmp_path / "planner-dead"
    dead.mkdir()
    (dead / workdirs.OWNER_FILE).write_text("999999999 12345")  # no such process
    (dead / "artifact.pt").write_bytes(b"x")
    alive = workdirs.make_workdir(tmp_path)  # owned by this process
    foreign = tmp_path / "planner-foreign"  # not ours to judge: no owner record
    foreign.mkdir()
    assert workdirs.remove_stale_workdirs(tmp_path) == [dead]
    assert not dead.exists() and alive.exists() and foreign.exists()


def test_limits_are_read_as_the_child_reads_them() -> None:
    limits = supervisor.limits_from_argv(["plan", "m.py:build", "--timeout", "7", "--memory-cap=2GB"])
    assert (limits.timeout_s, limits.memory_cap_bytes) == (7.0, 2 * 1000**3)
    fallback = supervisor.limits_from_argv(["plan", "m.py:build", "--timeout", "nan"])
    assert fallback.timeout_s == supervisor.DEFAULT_TIMEOUT_S


@pytest.mark.parametrize("value", ["nan", "inf", "0", "-5"])
def test_a_timeout_that_is_not_a_positive_number_is_refused(run: dict, value: str,
                                                            capsys: pytest.CaptureFixture) -> None:
    assert main(["plan", run["model"], "--budget", "1GB", "--timeout", value]) == 2
    assert "--timeout" in _one_error_line(capsys.readouterr().err)
