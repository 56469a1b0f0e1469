#!/usr/bin/env bash
# Set up, then plan the built-in ComplexNet (537M parameters, 2.1 GB in fp32) against a 512 MB device.
# Takes a few minutes on 2 cores: every recipe is really applied, saved, reloaded and run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/planner plan zoo:complexnet --budget 512MB --out plan-out --force "$@"
