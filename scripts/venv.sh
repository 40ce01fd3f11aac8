#!/usr/bin/env bash
# Make sure .venv exists and matches pyproject.toml + constraints.txt;
# (re)install it when missing or stale. Sourced by demo.sh and test.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.installed-from"
wanted="$(cat "$ROOT/pyproject.toml" "$ROOT/constraints.txt" | sha256sum | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null || true)" != "$wanted" ]; then
  echo "setting up $VENV (torch 2.13.0 CPU, pinned by constraints.txt) ..." >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check \
    -c "$ROOT/constraints.txt" -e "$ROOT[dev]" 2>&1 | { grep -v "is ignored: it is neither" || true; } >&2
  echo "$wanted" > "$STAMP"
fi
PY="$VENV/bin/python"
export PY ROOT
