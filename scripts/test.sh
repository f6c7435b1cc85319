#!/usr/bin/env bash
# The test command: sets up .venv (see env.sh), then runs the whole suite on this machine's devices.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -m gpu`).
set -euo pipefail
source "$(dirname "$0")/env.sh"
python -m pytest tests bench -q --benchmark-disable "$@"
