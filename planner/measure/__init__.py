"""Measuring a process: the shared measurement library, the worker protocol (child side), isolation (the
parent side: fork server, limits) and work directories."""
