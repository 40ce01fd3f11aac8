#!/usr/bin/env bash
# The benchmarks (not part of CI or of the test suite): writes benchmarks/RESULTS.md.
# Extra arguments go to `python -m benchmarks` (--quick, --only tiny chain ..., --out FILE).
# With NNSIGHT_PYTHON=/path/to/python (an interpreter that has the `nnsight` package and
# this project installed), the same benchmarks run there, nnsight side by side.
# NNSIGHT_PURE_DEVICE=cuda (default cpu) runs them on that device.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh"
cd "$ROOT"
"${NNSIGHT_PYTHON:-$PY}" -m benchmarks "$@"
