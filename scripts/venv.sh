#!/usr/bin/env bash
# Make sure .venv exists and matches pyproject.toml + constraints.txt;
# (re)install it when missing or stale. Sourced by demo.sh and test.sh.
# `ensure_venv DIR CONSTRAINTS PIP-ARGS...` does the same for another
# environment (test.sh: .venv-tf4, transformers 4.x by constraints-tf4.txt).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

ensure_venv() {
  local venv="$1" constraints="$2"
  shift 2
  local stamp="$venv/.installed-from"
  local wanted
  wanted="$(cat "$ROOT/pyproject.toml" "$constraints" | sha256sum | cut -d' ' -f1)"
  if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null || true)" != "$wanted" ]; then
    echo "setting up $venv (torch 2.13.0 CPU, pinned by $(basename "$constraints")) ..." >&2
    python3 -m venv "$venv"
    # --no-compile: Python compiles what it imports when it first imports it;
    # compiling every file of torch at install time costs a minute per venv.
    "$venv/bin/pip" install --quiet --disable-pip-version-check --no-compile \
      -c "$constraints" "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; } >&2
    echo "$wanted" > "$stamp"
  fi
}

VENV="$ROOT/.venv"
ensure_venv "$VENV" "$ROOT/constraints.txt" -e "$ROOT[dev]"
PY="$VENV/bin/python"
export PY ROOT
