"""`python -I -S watchdog.py FD SESSION WORKDIR`: what cleans up after kill -9 of planner.cli.supervisor.

It waits on a pipe whose only write end the supervisor holds. A "done" byte means the supervisor finished and
cleaned up itself. End-of-file without it means the supervisor died without running any cleanup: then every
process of the planner's session SESSION (the planner, its fork server, workers and whatever they started)
is killed and WORKDIR removed. Standard library only, no planner import: it runs in its own session and
must start in milliseconds.
"""

import os
import shutil
import sys
import time

KILL_FOR_S = 10.0  # processes may still be forking while we kill: repeat until the session is empty


def live_processes(field: int, value: str) -> list[int]:
    """Live processes (not zombies, not this one) whose /proc/PID/stat field FIELD (counted after the command
    name: 1 the parent pid, 3 the session id) is VALUE."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[field] == value and fields[0] != "Z":
            found.append(int(name))
    return found


def session_members(session: str) -> list[int]:
    """Live processes whose session id is SESSION."""
    return live_processes(3, session)


def main(argv: list[str]) -> int:
    read_end, session, workdir = int(argv[0]), argv[1], argv[2]
    while True:
        try:
            data = os.read(read_end, 1)
            break
        except InterruptedError:
            continue
    if data:
        return 0  # the supervisor finished and cleaned up itself
    deadline = time.monotonic() + KILL_FOR_S
    while time.monotonic() < deadline:
        members = session_members(session)
        if not members:
            break
        for pid in members:
            try:
                os.kill(pid, 9)
            except OSError:
                pass
        time.sleep(0.05)
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
