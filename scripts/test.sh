#!/usr/bin/env bash
# Installs what the tests need, then runs the test suite (slow end-to-end runs excluded; add -m slow
# to run only those). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec "${PYTHON:-python3}" -m pytest "$@"
