"""The `planner` console script: the top of the import graph. It catches the stop signals before anything heavy is
imported (typer, rich, torch), then hands `plan` and `inspect` to the supervisor (a watched child) and every other
command to planner.cli.commands in this process."""

from __future__ import annotations

import signal
import sys

from planner.cli.supervisor import STOP_SIGNALS, Signals, supervise, wants_supervisor


def console_main() -> None:
    """An early Ctrl-C ends the run as an interrupt, not as a traceback from an import."""
    received = Signals()
    previous = {number: signal.signal(number, received) for number in STOP_SIGNALS}
    args = sys.argv[1:]
    if wants_supervisor(args):
        sys.exit(supervise(args, received))
    for number, handler in previous.items():
        signal.signal(number, handler)
    if received.received is not None:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    from planner.cli.commands import entry_point

    entry_point()
