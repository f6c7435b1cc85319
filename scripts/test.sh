#!/usr/bin/env bash
# The test command: sets up .venv (see env.sh), then runs the whole suite on this machine's devices.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -m gpu`).
set -euo pipefail
# env.sh takes extra requirement files as its arguments: source it with none (a sourced script sees the
# caller's arguments), so that pytest's arguments do not reach it.
pytest_args=("$@")
set --
source "$(dirname "$0")/env.sh"
python -m pytest tests bench -q --benchmark-disable "${pytest_args[@]}"
