#!/usr/bin/env bash
# Installs what the tests need, then runs the test suite (slow end-to-end runs excluded; add -m slow
# to run only those). Extra arguments go to pytest. The tests run in one process per core (at most
# 4: each holds its own TensorFlow); FAQD_TEST_WORKERS=1 runs them in this process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
PY=${PYTHON:-python3}
workers=${FAQD_TEST_WORKERS:-$("$PY" -c "import os; print(min(len(os.sched_getaffinity(0)), 4))")}
if [ "$workers" -gt 1 ]; then
    exec "$PY" -m pytest -n "$workers" "$@"
fi
exec "$PY" -m pytest "$@"
