"""`python -m planner.cli ARGS`: the commands without the supervisor (what the supervisor's child runs)."""

from planner.cli.commands import entry_point

entry_point()
