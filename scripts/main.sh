#!/usr/bin/env bash
# The main job: sets up .venv, checks every available backend against torch.nn on this device, then runs
# the benchmark against torch.nn (results appended under bench/results/, a plot next to them).
# Extra arguments go to `python -m fastrnn bench` (e.g. --full).
set -euo pipefail
source "$(dirname "$0")/env.sh" requirements-bench.txt
python -m fastrnn check
python -m fastrnn bench "$@"
