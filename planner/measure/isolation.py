"""Running one verification in its own process, under a wall-clock timeout and a resident-memory cap.

A recipe that crashes, exhausts memory or hangs must cost only its own row. The child's resident memory
is polled from /proc (a cap on address space would also count the gigabytes of virtual memory torch
reserves without touching); past the cap the child is killed and the row says so. Any exception in the
parent, Ctrl-C included, kills the child before it propagates.

Workers that import torch but measure nothing (the ONNX export, --eval) start from a fork server that has
imported torch and torchao once (multiprocessing's forkserver with a preload list), skipping 3-5 s of imports.
The fork server runs no torch op before forking, so no thread pool is inherited. Verification workers start as
fresh processes (see PRELOADED_WORKERS).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from planner.core.safe_io import path_inside
from planner.measure import timing_lock
from planner.measure.workdirs import WORKDIR_PREFIX, make_workdir, remove_stale_workdirs

POLL_S = 0.02
# Set by planner.cli.supervisor for the planner process it watches: where to write the current stage.
STAGE_FILE_ENV = "PLANNER_STAGE_FILE"
# Set by planner.cli.supervisor: the run's work directory, under which every temporary must live.
WORKDIR_ENV = "PLANNER_WORKDIR"
# Set in every worker's environment (see worker_env).
WORKER_ENV = "PLANNER_WORKER"
PR_SET_PDEATHSIG = 1
_libc: Any = None
_stage = "starting"
# Several threads may run workers at once (planner.plan.executors): the stage file is written under a lock, and
# the planner's own clock restarts only once no worker runs.
_stage_lock = threading.RLock()
_running_workers = 0
_worker_timeout_s = 0.0


@dataclass
class Outcome:
    returncode: int | None
    stderr: str
    failure: str | None  # why the run was stopped by us, if it was
    peak_rss_bytes: int


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where there is no such file)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def default_memory_cap() -> int | None:
    """Nine tenths of what the machine can give now: the planner itself keeps the rest."""
    available = available_memory_bytes()
    return int(available * 0.9) if available else None


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# ---- the planner's stage, for planner.cli.supervisor ---------------------------------------------------------

def _write_stage(record: dict[str, Any]) -> None:
    path = os.environ.get(STAGE_FILE_ENV)
    if not path:
        return  # not supervised (tests call planner.cli.commands.main in-process)
    temporary = f"{path}.tmp"
    with _stage_lock:
        with open(temporary, "w") as handle:
            json.dump(record, handle)
        os.replace(temporary, path)  # the supervisor never reads half a record


def report_stage(stage: str, clocked: bool = True) -> None:
    """The planner is now doing `stage` in its own process: the supervisor's --timeout clock restarts
    (clocked=False: the planner's own start, before any of the model's code, is not timed). While workers
    run (other threads' jobs), the stage's words change and the clock stays theirs."""
    global _stage
    with _stage_lock:
        _stage = stage
        if _running_workers:
            _write_stage({"stage": stage, "since": time.time(), "worker_timeout_s": _worker_timeout_s})
        else:
            _write_stage({"stage": stage, "since": time.time()} if clocked else {"stage": stage})


def report_finished(code: int) -> None:
    """The command ended on its own terms (exit code `code`), not killed mid-way."""
    _write_stage({"stage": _stage, "finished": code})


def _report_worker(timeout_s: float) -> None:
    # A worker has its own timeout: the supervisor only checks that the planner comes back after it.
    global _running_workers, _worker_timeout_s
    with _stage_lock:
        _running_workers += 1
        _worker_timeout_s = max(_worker_timeout_s, timeout_s) if _running_workers > 1 else timeout_s
        _write_stage({"stage": _stage, "since": time.time(), "worker_timeout_s": _worker_timeout_s})


def _worker_finished() -> None:
    global _running_workers
    with _stage_lock:
        _running_workers = max(0, _running_workers - 1)
        report_stage(_stage)


@contextlib.contextmanager
def jobs_running(timeout_s: float) -> Iterator[None]:
    """Around work that runs elsewhere under its own timeouts (a Ray task's workers): the supervisor's clock is
    theirs, `timeout_s` from the last record, as for a worker of this process."""
    _report_worker(timeout_s)
    try:
        yield
    finally:
        _worker_finished()


# ---- process hygiene -------------------------------------------------------------------------------------

def die_with_parent(number: int = signal.SIGKILL) -> None:
    """PR_SET_PDEATHSIG: the kernel sends `number` to this process when its parent dies, kill -9 included.
    Safe between fork and exec (a preexec_fn): libc is loaded before any fork."""
    if _libc is not None:
        _libc.prctl(PR_SET_PDEATHSIG, number, 0, 0, 0)


def _load_libc() -> None:
    global _libc
    try:
        import ctypes

        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.prctl  # noqa: B018 - resolve the symbol now, not in a forked child
    except (OSError, AttributeError):
        _libc = None  # not Linux: no parent-death signal, process groups still apply


_load_libc()


def plan_workdir() -> Path:
    """The plan's work directory: inside the supervisor's when supervised (removed with it, whatever
    happens to this process); otherwise a fresh one that records its owner, after removing those left by
    planners that died (planner.measure.workdirs.remove_stale_workdirs)."""
    root = os.environ.get(WORKDIR_ENV)
    if root:
        return Path(tempfile.mkdtemp(prefix=WORKDIR_PREFIX, dir=Path(root) / "tmp"))
    remove_stale_workdirs()
    return make_workdir()


def kill_group(pgid: int) -> None:
    """SIGKILL a worker's process group: the worker and whatever it started (grandchildren included)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _start_worker_group() -> None:
    """preexec_fn of a worker: its own process group (killed whole at the end), and death with the planner."""
    os.setpgid(0, 0)
    die_with_parent()


# Deferred while a worker is forked (see stop_signals_deferred): Ctrl-C, and the signals the planner treats as it.
FORK_DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def stop_signals_deferred() -> Iterator[None]:
    """Defer Ctrl-C while subprocess forks with a preexec_fn: Python runs its at-fork hooks then (logging's
    _releaseLock), and a KeyboardInterrupt raised inside one is printed as an "Exception ignored" traceback and
    lost. A signal that arrives meanwhile is recorded and raised again once the fork is done. Blocking it in this
    thread would not do: torch's OpenMP threads take a process-directed signal for the interpreter. Only the main
    thread runs Python's signal handlers, so other threads fork as they are."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {number: signal.signal(number, lambda number, frame: received.append(number))
                for number in FORK_DEFERRED_SIGNALS}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        if received:
            signal.raise_signal(received[0])  # to the handler the planner had: KeyboardInterrupt, here and now


SCRATCH_KEYS = ("TMPDIR", "TORCHINDUCTOR_CACHE_DIR")


def worker_env(env: dict[str, str], scratch_dir: Path | None) -> dict[str, str]:
    """A worker's environment: no stage file (that is the planner's), temporaries under the work dir, and
    PLANNER_WORKER=1, so code the user gave (a model's forward, --eval) can tell a worker from the planner."""
    env = {key: value for key, value in env.items() if key not in (STAGE_FILE_ENV,)}
    env[WORKER_ENV] = "1"
    if scratch_dir is not None:
        env["TMPDIR"] = str(scratch_dir)
        if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:  # torch._dynamo's import makes it; the user's is kept
            env["TORCHINDUCTOR_CACHE_DIR"] = str(scratch_dir / "inductor")
    return env


def run_isolated(argv: list[str], *, timeout_s: float, memory_cap_bytes: int | None,
                 env: dict[str, str], scratch_dir: Path | None = None) -> Outcome:
    # An unnamed file (O_TMPFILE): nothing is left behind even if the planner is killed.
    with tempfile.TemporaryFile(mode="w+", dir=scratch_dir) as stderr:
        child_env = worker_env(env, scratch_dir)
        _report_worker(timeout_s)  # waiting for the timing lock is the worker's time, not the planner's
        with timing_lock.shared_for_child(child_env) as inherited, stop_signals_deferred():
            process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=stderr, env=child_env,
                                       preexec_fn=_start_worker_group, pass_fds=inherited)

        def stop() -> None:
            kill_group(process.pid)
            process.kill()
            process.wait()

        try:
            failure, peak = _supervise(process.pid, process.poll, stop, timeout_s, memory_cap_bytes)
        finally:
            kill_group(process.pid)  # grandchildren the worker left running die with its row
            _worker_finished()
        stderr.seek(0)
        return Outcome(process.returncode, stderr.read(), failure, peak)


FORKSERVER_PRELOAD = ["planner.runtimes.torch_cpu.preload"]
# Workers started from the fork server (builds and --eval). Not the measuring workers (torch and ONNX Runtime
# verification): a forked child has none of the server's library pages in its own page tables, so it faults them
# in again during the load and the first forward and counts them as the model's. With a freshly installed venv
# (large page-cache folios per fault) that put the verified runtime 16 MB above an independent fresh process on a
# 100 MB model. They start as fresh processes, as a user's would.
PRELOADED_WORKERS = frozenset({"planner.runtimes.onnxruntime.export", "planner.runtimes.torch_cpu.build",
                               "planner.analysis.evalhook"})
_forkserver: Any = None


def run_module_isolated(module: str, args: list[str], *, timeout_s: float, memory_cap_bytes: int | None,
                        env: dict[str, str], scratch_dir: Path | None = None) -> Outcome:
    """`python -m MODULE ARGS` under run_isolated's limits; from the fork server where MODULE allows it.
    Temporaries (the stderr file, the worker's TMPDIR) go under `scratch_dir`, the plan's work directory."""
    if (module not in PRELOADED_WORKERS or "forkserver" not in multiprocessing.get_all_start_methods()
            or os.environ.get("PLANNER_NO_FORKSERVER")  # the plain way, e.g. to compare the two
            or not _socket_path_fits()):
        # -P: the working directory is not put on sys.path, so a planner/ or torch/ there is not imported.
        return run_isolated([sys.executable, "-P", "-m", module, *args], timeout_s=timeout_s,
                            memory_cap_bytes=memory_cap_bytes, env=env, scratch_dir=scratch_dir)
    env = worker_env(env, scratch_dir)
    with tempfile.NamedTemporaryFile(mode="w+", prefix="planner-stderr-", dir=scratch_dir) as stderr:
        process = _forkserver_context(env).Process(target=_run_module,
                                                   args=(module, args, stderr.name, env, os.getpid()))
        process.start()

        def stop() -> None:
            kill_group(process.pid)
            process.kill()
            process.join()

        def poll() -> int | None:
            return process.exitcode

        _report_worker(timeout_s)
        try:
            failure, peak = _supervise(process.pid, poll, stop, timeout_s, memory_cap_bytes)
            process.join()
        finally:
            kill_group(process.pid)  # grandchildren the worker left running die with its row
            _worker_finished()
        stderr.seek(0)
        return Outcome(process.exitcode, stderr.read(), failure, peak)


# The fork server listens on TEMPDIR/listener-XXXXXXXX; Linux allows 107 bytes for a socket path.
SOCKET_PATH_MAX = 107


def _socket_path_fits() -> bool:
    """Whether the fork server's socket can live in multiprocessing's temp dir. Supervised, that is the work
    directory itself (removed with it); a very long TMPDIR makes workers start the plain way instead."""
    from multiprocessing import process, util

    root = os.environ.get(WORKDIR_ENV)
    config = process.current_process()._config
    if root and "tempdir" not in config:
        config["tempdir"] = root  # not a pymp-* folder of its own: the supervisor removes the work directory
    return len(os.fsencode(util.get_temp_dir())) + len("/listener-XXXXXXXX") <= SOCKET_PATH_MAX


def _forkserver_context(env: dict[str, str]) -> Any:
    """The fork server, started once per planner process with `env` (malloc settings are read at start)."""
    with _stage_lock:  # two jobs' threads must not start two servers
        return _start_forkserver(env) if _forkserver is None else _forkserver


def _start_forkserver(env: dict[str, str]) -> Any:
    global _forkserver
    if _forkserver is None:
        from multiprocessing import forkserver, util

        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(FORKSERVER_PRELOAD)
        util.get_temp_dir()  # the server's socket lives in the planner's temp dir, not in one plan's work dir
        saved = dict(os.environ)
        # The worker's own TMPDIR is set again in each forked worker (_run_module).
        os.environ.update({key: value for key, value in env.items() if key not in SCRATCH_KEYS})
        try:
            forkserver.ensure_running()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        _forkserver = context
    return _forkserver


def start_forkserver(workdir: Path) -> None:
    """Start the fork server now, as the first preloaded worker would, before several threads start workers: its
    start swaps this process's environment for a moment, which another thread's worker must not see."""
    if (multiprocessing.get_all_start_methods().count("forkserver") and not os.environ.get("PLANNER_NO_FORKSERVER")
            and _socket_path_fits()):
        scratch = workdir / "tmp"
        scratch.mkdir(exist_ok=True)
        _forkserver_context(worker_env(dict(os.environ), scratch))


def stop_forkserver() -> None:
    """Stop the fork server (and let multiprocessing's resource tracker exit) before the planner exits."""
    global _forkserver
    if _forkserver is None:
        return
    from multiprocessing import forkserver

    try:
        forkserver._forkserver._stop()
    except OSError:
        pass  # its socket's folder is already gone: the server has stopped all the same
    _forkserver = None


def _run_module(module: str, args: list[str], stderr_path: str, env: dict[str, str], planner_pid: int) -> None:
    """In the forked child: what `python -m module args` would do, stderr to the parent's file."""
    from multiprocessing import forkserver

    # Our own process group (the planner kills it whole: grandchildren too), and death with the fork server.
    os.setpgid(0, 0)
    die_with_parent()
    # The fork server stays up while any process holds its "alive" pipe; the worker must not, so that the
    # server (and then, by the parent-death signal, this worker) ends when the planner dies.
    alive = forkserver._forkserver._forkserver_alive_fd
    if alive is not None:
        os.close(alive)
        forkserver._forkserver._forkserver_alive_fd = None
    if os.getppid() == 1 or not _pid_alive(planner_pid):
        os._exit(1)  # the planner died before the signal was armed
    os.environ.clear()
    os.environ.update(env)
    tempfile.tempdir = None  # read TMPDIR again: the fork server cached the planner's
    # runpy notes that the preloaded module is already imported; that is the point of the fork server, and a
    # stray line on stderr would become the row's failure reason.
    warnings.filterwarnings("ignore", message=".*found in sys.modules", category=RuntimeWarning)
    os.dup2(os.open(stderr_path, os.O_WRONLY | os.O_TRUNC), 2)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    timing_lock.hold_shared_here()  # this worker's share of the machine while other jobs time their runs
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _supervise(pid: int, poll: Callable[[], int | None], stop: Callable[[], None], timeout_s: float,
               memory_cap_bytes: int | None) -> tuple[str | None, int]:
    """Poll the child's resident memory until it exits; stop it past the cap or the deadline, or when the
    parent is interrupted. Returns (why it was stopped, or None; its peak resident bytes)."""
    failure = None
    peak = 0
    deadline = time.monotonic() + timeout_s
    try:
        while poll() is None:
            rss = _rss_bytes(pid)
            peak = max(peak, rss)
            if memory_cap_bytes is not None and rss > memory_cap_bytes:
                failure = f"exceeded the memory cap of {memory_cap_bytes / 1e6:,.0f} MB (--memory-cap)"
            elif time.monotonic() > deadline:
                failure = f"timed out after {timeout_s:.0f} s (--timeout)"
            if failure:
                stop()
                break
            time.sleep(POLL_S)
    except BaseException:
        stop()
        raise
    return failure, peak


def describe_exit(outcome: Outcome) -> str:
    """One line on why a child failed: our own stop, a signal, or the last line it printed."""
    if outcome.failure:
        return outcome.failure
    code = outcome.returncode or 0
    if code < 0:
        reason = f"killed by signal {-code}"
        return reason + " (the system ran out of memory?)" if code == -9 else reason
    lines = [line for line in outcome.stderr.strip().splitlines() if line.strip()]
    if lines:
        return lines[-1][:300]
    return f"the worker exited with status {code} without a result (os._exit or exit in the model's code?)"


# ---- the worker protocol, parent side (the child side is planner.measure.worker) ------------------------------------

class WorkerLimits(Protocol):
    """What run_worker needs of a plan's options: planner.plan.pipeline.PlanOptions has both."""

    @property
    def timeout_s(self) -> float: ...

    @property
    def memory_cap_bytes(self) -> int | None: ...


@dataclass(frozen=True)
class Limits:
    """WorkerLimits for a worker started outside a plan (kernel scratch, a training step)."""

    timeout_s: float
    memory_cap_bytes: int | None = field(default_factory=default_memory_cap)


def run_worker(job: dict[str, Any], workdir: Path, name: str, limits: WorkerLimits,
               *, worker: str, allocator_env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `python -m WORKER JOB RESULT` isolated; the result with status verified, or failed with the reason.

    Workers run with glibc's default allocator settings, as a user's process does, unless `allocator_env` (e.g.
    MEASUREMENT_ENV for a probe that compares allocation patterns) says otherwise; a worker started from the fork
    server has the server's settings, which are the defaults."""
    job_path, result_path = path_inside(workdir, f"{name}.job.json"), path_inside(workdir, f"{name}.result.json")
    job_path.write_text(json.dumps(job))
    scratch = workdir / "tmp"  # the worker's temporaries: removed with the work directory
    scratch.mkdir(exist_ok=True)
    outcome = run_module_isolated(worker, [str(job_path), str(result_path)], timeout_s=limits.timeout_s,
                                  memory_cap_bytes=limits.memory_cap_bytes,
                                  env=dict(os.environ, **(allocator_env or {})),
                                  scratch_dir=scratch)
    result = json.loads(result_path.read_text()) if result_path.exists() and not outcome.failure else None
    if result is None or "error" in result or outcome.returncode != 0:
        reason = result["error"] if result and "error" in result else describe_exit(outcome)
        return {"status": "failed", "note": f"verification failed: {reason}"}
    if isinstance(result.get("sqnr_db"), str):
        result["sqnr_db"] = float(result["sqnr_db"])  # "inf" in JSON
    return dict(result, status="verified")
