#!/usr/bin/env bash
# Sets up .venv with the dev and rtstruct extras, then runs the linter, the type checker and the test suite (CPU only).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev,rtstruct
echo "== ruff"
.venv/bin/ruff check src tests benchmarks
echo "== mypy"
.venv/bin/mypy
echo "== pytest"
set +e
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
# pytest exits 5 when no test was collected: that is a failure of the suite, not a success.
exit $rc
