#!/usr/bin/env bash
# The whole test suite: ruff, pytest, then the language-model tests (and the
# language-model docs) again under transformers 4.x in .venv-tf4, then
# mypy --strict, then stubtest of typestubs/. Arguments go to the first
# pytest run; SKIP_TF4=1 skips the transformers 4.x run.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh"
cd "$ROOT"
echo "== ruff (lint: pyflakes, pycodestyle, import order)" >&2
"$PY" -m ruff check .
echo "== pytest" >&2
"$PY" -m pytest -q "$@"
if [ "${SKIP_TF4:-0}" != 1 ]; then
  echo "== pytest, language models under transformers 4.x (.venv-tf4, constraints-tf4.txt)" >&2
  ensure_venv "$ROOT/.venv-tf4" "$ROOT/constraints-tf4.txt" -e "$ROOT[lm]" pytest
  "$ROOT/.venv-tf4/bin/python" -m pytest -q tests/test_language*.py \
    "tests/test_docs.py::test_page_examples_run[language-models.md]"
fi
echo "== mypy --strict (nnsight_pure, tests, examples, docs)" >&2
"$PY" -m mypy --strict
echo "== stubtest (typestubs/graphviz against graphviz)" >&2
MYPYPATH=typestubs "$PY" -m mypy.stubtest graphviz --ignore-missing-stub \
  --allowlist typestubs/stubtest_allowlist.txt
