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
# the web page test drives Debian's chromium (Playwright without its own browser download)
if [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "test.sh: Debian's chromium is needed for the web page test: sudo apt-get install chromium" >&2
    fi
fi
exec .venv/bin/python -m pytest -q "$@"
