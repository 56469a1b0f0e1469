"""`planner plan|inspect` from the console: a thin supervisor around the real command.

The planner runs the user's code in its own process (the factory, the forward traced on fake tensors, the
input check, the float32 build, the apply step, --eval's import). A forward that allocates without bound,
sleeps, calls os._exit or segfaults would otherwise take the planner down with no word, or hang it. So the
console entry point starts the same command as a child (same argv, an env marker) and only watches it:

- the child runs in its own session (its own process group), with inherited stdin/stdout/stderr so the
  progress bar still shows; it dies with the supervisor (PR_SET_PDEATHSIG) even on kill -9;
- the child's memory (resident, less file pages the kernel can drop) is held to --memory-cap, and each
  in-process stage to --timeout; the child writes its current stage to a small file (planner.measure.isolation),
  and verification workers, which have their own timeout, pause that clock;
- a child that dies without finishing (signal, os._exit, a cap or a timeout) gives ONE line naming what
  happened and in which stage, and exit 2;
- SIGINT, SIGTERM and SIGHUP are passed to the child as an interrupt, and after a grace period its whole
  process group is killed;
- the supervisor is a subreaper: anything the run started that outlives it (a worker's grandchildren, the
  fork server, multiprocessing's resource tracker) is reparented here and killed at the end;
- every temporary of the run lives under one work directory (TMPDIR for the child and its workers), which
  is removed at the end; one left by a planner that died (kill -9 of everything) is removed at the next start;
- kill -9 of the supervisor runs none of this, so a tiny watchdog process (its own session, stdlib only)
  waits on a pipe only the supervisor holds: on end-of-file without the supervisor's "done" byte it kills
  every process of the child's session (workers and their children included) and removes the work directory.

No torch import here: the supervisor must start fast and stay small.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from planner.cli.watchdog import live_processes
from planner.measure import isolation
from planner.measure.workdirs import make_workdir, remove_stale_workdirs

SUPERVISED_COMMANDS = frozenset({"plan", "inspect"})
DEFAULT_TIMEOUT_S = 900.0
# After an interrupt, how long the child may take to clean up before its group is killed.
INTERRUPT_GRACE_S = 10.0
# Orphans (e.g. multiprocessing's resource tracker) get this long to exit on their own before SIGKILL.
ORPHAN_GRACE_S = 3.0
# A verification worker has its own timeout; if the child does not come back this long after it, it is stuck.
WORKER_SLACK_S = 60.0
POLL_S = 0.05
PR_SET_CHILD_SUBREAPER = 36


@dataclass
class Limits:
    timeout_s: float
    memory_cap_bytes: int | None


def wants_supervisor(argv: list[str]) -> bool:
    """Only from the console entry point, for the commands that run the model's code, and not inside the
    supervised child itself (PLANNER_NO_SUPERVISOR=1 switches it off, e.g. to debug in one process)."""
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    return command in SUPERVISED_COMMANDS and not is_supervised() and not os.environ.get("PLANNER_NO_SUPERVISOR")


def is_supervised() -> bool:
    """This process is the planner a supervisor watches."""
    return isolation.STAGE_FILE_ENV in os.environ


def _option(argv: list[str], name: str) -> str | None:
    """The value of `--name VALUE` or `--name=VALUE` (the last one wins, as in the parser)."""
    value = None
    for index, arg in enumerate(argv):
        if arg == name and index + 1 < len(argv):
            value = argv[index + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def limits_from_argv(argv: list[str]) -> Limits:
    """--timeout and --memory-cap as the child will read them; a value the child will reject falls back
    to the default here (the child then exits with its own error line)."""
    from planner.core.errors import PlannerError
    from planner.core.units import parse_size

    timeout_s = DEFAULT_TIMEOUT_S
    try:
        given = float(_option(argv, "--timeout") or DEFAULT_TIMEOUT_S)
        if 0 < given < float("inf"):
            timeout_s = given
    except ValueError:
        pass
    cap = isolation.default_memory_cap()
    text = _option(argv, "--memory-cap")
    if text:
        try:
            cap = parse_size(text)
        except PlannerError:
            pass
    return Limits(timeout_s, cap if cap and cap > 0 else None)


def child_env(workdir: Path) -> dict[str, str]:
    """The child's environment: the stage file, and every temporary (tempfile, multiprocessing's sockets,
    torch's inductor cache) under the work directory."""
    env = dict(os.environ, **{isolation.STAGE_FILE_ENV: str(workdir / "stage.json"),
                              isolation.WORKDIR_ENV: str(workdir), "TMPDIR": str(workdir / "tmp")})
    # Importing torchao imports torch._dynamo, which creates TMPDIR/torchinductor_<user> for its cache; a
    # cache folder the user chose is kept.
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(workdir / "tmp" / "inductor"))
    return env


# ---- the child's state ------------------------------------------------------------------------------------

def read_stage(workdir: Path) -> dict[str, object]:
    try:
        record = json.loads((workdir / "stage.json").read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def anonymous_resident_bytes(pid: int) -> int:
    """Resident memory the process allocated (RssAnon + RssShmem): mapped model files are left out, the
    kernel can drop those pages whenever it needs them."""
    total = 0
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(("RssAnon:", "RssShmem:")):
                    total += int(line.split()[1]) * 1024
    except OSError:
        return 0
    return total


SIGNAL_WORDS = {signal.SIGSEGV: "a segmentation fault", signal.SIGBUS: "a bus error", signal.SIGABRT: "an abort",
                signal.SIGILL: "an illegal instruction", signal.SIGFPE: "a floating-point exception",
                signal.SIGKILL: "SIGKILL (out of memory, or killed from outside)"}


def describe_death(status: int, stage: str) -> str:
    """One line for a child that ended without finishing its command."""
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            what = SIGNAL_WORDS.get(signal.Signals(number), signal.Signals(number).name)
        except ValueError:
            what = "a signal"
        return (f"the model's code crashed with {what} (signal {number}) while {stage}; nothing was planned: "
                "fix the model's code (--debug prints the Python stack of a crash)")
    return (f"the model's code exited with status {os.WEXITSTATUS(status)} while {stage} (os._exit or exit in "
            "the factory, forward or --eval); nothing was planned: fix the model's code")


# ---- the supervisor ---------------------------------------------------------------------------------------

class Signals:
    """The first SIGINT/SIGTERM/SIGHUP received (they all mean: stop, clean up)."""

    def __init__(self) -> None:
        self.received: int | None = None

    def __call__(self, number: int, frame: object) -> None:
        if self.received is None:
            self.received = number


def _become_subreaper() -> None:
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: orphans go to init as before


def _reap(child_pid: int) -> int | None:
    """Reap every exited child (orphans reparented to us included); the child's wait status if it exited."""
    status_of_child = None
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return status_of_child
        if pid == 0:
            return status_of_child
        if pid == child_pid:
            status_of_child = status


def _our_children() -> list[int]:
    """Live processes whose parent is the supervisor: the child, and orphans of the run reparented here."""
    return live_processes(1, str(os.getpid()))


def _kill_group(pgid: int, number: int = signal.SIGKILL) -> None:
    try:
        os.killpg(pgid, number)
    except (ProcessLookupError, PermissionError):
        pass


def _finish_orphans(child_pid: int, keep: int | None) -> None:
    """Everything the run left behind: let well-behaved leftovers (the resource tracker unlinking its
    semaphores) exit on their own briefly, then kill what remains, group by group."""
    deadline = time.monotonic() + ORPHAN_GRACE_S
    while True:
        _reap(child_pid)
        left = [pid for pid in _our_children() if pid not in (child_pid, keep)]
        if not left:
            return
        if time.monotonic() > deadline:
            for pid in left:
                try:
                    os.killpg(os.getpgid(pid), signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        time.sleep(POLL_S)


def _start_watchdog(session: int, workdir: Path) -> tuple[int, int]:
    """The watchdog for kill -9 of the supervisor; returns its pid and the pipe end to write "done" to."""
    read_end, write_end = os.pipe()  # both non-inheritable: the child never holds the write end
    try:
        # -I -S: stdlib only, no site packages and no environment: it starts in milliseconds.
        script = str(Path(__file__).with_name("watchdog.py"))
        watchdog = subprocess.Popen([sys.executable, "-I", "-S", script, str(read_end), str(session), str(workdir)],
                                    pass_fds=(read_end,), start_new_session=True, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    finally:
        os.close(read_end)
    return watchdog.pid, write_end


def _stop_watchdog(watchdog: tuple[int, int] | None) -> None:
    if watchdog is None:
        return
    pid, write_end = watchdog
    try:
        os.write(write_end, b"x")
    except OSError:
        pass
    os.close(write_end)
    _wait_for(pid)  # it exits at once on the "done" byte


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def supervise(argv: list[str], received: Signals | None = None) -> int:
    """Run `planner ARGV` as a watched child; its exit code, or 2 with one line when it died unfinished."""
    from planner.core.errors import PlannerError

    received = received or Signals()
    previous = {number: signal.signal(number, received) for number in STOP_SIGNALS}
    try:
        limits = limits_from_argv(argv)
    except PlannerError:
        limits = Limits(DEFAULT_TIMEOUT_S, isolation.default_memory_cap())
    _become_subreaper()
    remove_stale_workdirs()
    workdir = make_workdir()
    child: subprocess.Popen[bytes] | None = None
    watchdog: tuple[int, int] | None = None
    try:
        if received.received is None:
            # -P: the working directory is not put on sys.path (a planner/ or torch/ there is not imported).
            child = subprocess.Popen([sys.executable, "-P", "-m", "planner.cli", *argv], env=child_env(workdir),
                                     start_new_session=True, preexec_fn=isolation.die_with_parent)
            watchdog = _start_watchdog(child.pid, workdir)
        verdict, status = _watch(child, workdir, limits, received) if child else ("interrupted", None)
    finally:
        if child is not None:
            _kill_group(child.pid)
            _finish_orphans(child.pid, watchdog[0] if watchdog else None)
        shutil.rmtree(workdir, ignore_errors=True)
        _stop_watchdog(watchdog)
        for number, handler in previous.items():
            signal.signal(number, handler)
    return _report(verdict, status, workdir)


def _report(verdict: str, status: int | None, workdir: Path) -> int:
    if sys.stdout.isatty():
        sys.stdout.write("\x1b[?25h")  # a killed progress bar leaves the cursor hidden
        sys.stdout.flush()
    if verdict == "finished":
        return status or 0
    if verdict == "interrupted":
        print("interrupted", file=sys.stderr)
        return 130
    print(f"error: {verdict}", file=sys.stderr)
    return 2


def _watch(child: subprocess.Popen[bytes], workdir: Path, limits: Limits, received: Signals
           ) -> tuple[str, int | None]:
    """Poll the child until it exits. Returns ("finished", its exit code), ("interrupted", None) or
    (the one-line reason it was stopped or died, None)."""
    interrupted_at: float | None = None
    while True:
        status = _reap(child.pid)
        if status is not None:
            child.returncode = status  # reaped here, not by Popen
            record = read_stage(workdir)
            finished = record.get("finished")
            if interrupted_at is not None:
                # An interrupt always ends as one; the child has said so itself if it exited with 130.
                return ("finished", 130) if finished == 130 else ("interrupted", None)
            if finished is not None:  # it said its own last word
                return "finished", int(finished)  # type: ignore[call-overload]
            return describe_death(status, _stage_words(record)), None
        now = time.monotonic()
        if received.received is not None and interrupted_at is None:
            interrupted_at = now
            if not read_stage(workdir):
                # Still starting (Python's own startup): nothing to clean up, and an interrupt there would
                # print a traceback. Its group goes at once.
                _kill_group(child.pid)
            else:
                # The child turns SIGINT and SIGTERM into KeyboardInterrupt and cleans up (workers, files).
                _signal_child(child.pid, signal.SIGINT if received.received == signal.SIGINT else signal.SIGTERM)
        if interrupted_at is not None:
            if now - interrupted_at > INTERRUPT_GRACE_S:
                _kill_group(child.pid)
            time.sleep(POLL_S)
            continue
        record = read_stage(workdir)
        problem = _over_limits(child.pid, record, limits)
        if problem:
            _kill_group(child.pid)
            _wait_for(child.pid)
            return problem, None
        time.sleep(POLL_S)


def _signal_child(pid: int, number: int) -> None:
    try:
        os.kill(pid, number)
    except ProcessLookupError:
        pass


def _wait_for(pid: int) -> None:
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def _stage_words(record: dict[str, object]) -> str:
    return str(record.get("stage") or "starting")


def _over_limits(pid: int, record: dict[str, object], limits: Limits) -> str | None:
    stage = _stage_words(record)
    if limits.memory_cap_bytes is not None and anonymous_resident_bytes(pid) > limits.memory_cap_bytes:
        return (f"the model's code exceeded the memory cap of {limits.memory_cap_bytes / 1e6:,.0f} MB "
                f"(--memory-cap) while {stage}; raise --memory-cap, or give a smaller input")
    since = record.get("since")
    if not isinstance(since, int | float):
        return None
    elapsed = time.time() - since
    worker_timeout = record.get("worker_timeout_s")
    if isinstance(worker_timeout, int | float):  # a worker runs under its own timeout
        if elapsed > worker_timeout + WORKER_SLACK_S:
            return (f"the planner did not come back from a verification worker {worker_timeout:.0f} s "
                    f"(--timeout) + {WORKER_SLACK_S:.0f} s after it started, while {stage}")
        return None
    if elapsed > limits.timeout_s:
        return (f"the model's code timed out after {limits.timeout_s:g} s (--timeout) while {stage}; "
                "raise --timeout if it is just slow")
    return None
