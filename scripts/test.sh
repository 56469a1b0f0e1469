#!/usr/bin/env bash
# Set up, lint, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
# Two workers, each test file whole on one (its module fixtures are built once): 8 min instead of 13 on 2 cores.
# No test asserts a latency, and a memory peak is each process's own (the tests allow for a loaded machine).
exec .venv/bin/python -m pytest -n 2 --dist loadfile "$@"
