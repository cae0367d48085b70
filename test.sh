#!/usr/bin/env bash
# Run the test suite (after ./setup.sh). Builds the stock llama-cpp-python reference
# used by the skip_budget=0 tests on first use (build/stock-venv, several minutes once).
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
    echo "test.sh: .venv missing; run ./setup.sh first" >&2
    exit 2
fi
scripts/build_stock_reference.sh
exec .venv/bin/python -m pytest -q "$@"
