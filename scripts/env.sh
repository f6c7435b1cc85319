#!/usr/bin/env bash
# Sourced by the other scripts: makes .venv (once), installs requirements.txt (when it changed) and builds
# the compiled extension (when a source changed), so each README command works on a fresh machine.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
stamp=.venv/.fastrnn-requirements
want=$(cat requirements.txt "$@" 2>/dev/null | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements.txt "${@/#/-r}"
  echo "$want" > "$stamp"
fi
# The extension builds against the torch in the venv, so no build isolation (it would fetch another torch).
build_stamp=.venv/.fastrnn-build
build_inputs() { find csrc -type f; for f in setup.py fastrnn/_build.py CMakeLists.txt; do if [ -f "$f" ]; then echo "$f"; fi; done; }
sources=$(build_inputs | sort | xargs cat | sha256sum | cut -d' ' -f1)
if [ "$(cat "$build_stamp" 2>/dev/null)" != "$sources" ] || ! .venv/bin/python -c "import fastrnn._C" 2>/dev/null; then
  MAX_JOBS=${MAX_JOBS:-2} .venv/bin/python -m pip install -q --no-build-isolation --no-deps -e .
  echo "$sources" > "$build_stamp"
fi
export PATH="$root/.venv/bin:$PATH"
