"""The commands: commands (argument parsing, the subcommands), console (the planner entry point), the
supervisor and its watchdog."""
