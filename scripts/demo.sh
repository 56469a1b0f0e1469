#!/usr/bin/env bash
# Set up, then plan the built-in ComplexNet (537M parameters, 2.1 GB in fp32) against a 512 MB device.
# About 5 minutes on 2 cores: the analytic table of every recipe first (about 20 s), then each that could fit is
# really applied, saved, reloaded and run (add --verify all to measure every row: about 47 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/planner plan zoo:complexnet --budget 512MB --out plan-out --force "$@"
