#!/usr/bin/env bash
# The main job: trace a model built in code, intervene, save, patch across invokes.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh"
cd "$ROOT"
exec "$PY" examples/demo.py "$@"
