#!/usr/bin/env bash
# The whole test suite: pytest, then mypy --strict, then stubtest of typestubs/.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh"
cd "$ROOT"
echo "== pytest" >&2
"$PY" -m pytest -q "$@"
echo "== mypy --strict (nnsight_pure, tests, examples, docs)" >&2
"$PY" -m mypy --strict
echo "== stubtest (typestubs/graphviz against graphviz)" >&2
MYPYPATH=typestubs "$PY" -m mypy.stubtest graphviz --ignore-missing-stub \
  --allowlist typestubs/stubtest_allowlist.txt
