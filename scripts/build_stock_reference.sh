#!/usr/bin/env bash
# Build the test reference: stock (unpatched) llama-cpp-python 0.3.36 from the same
# verified sdist, in its own venv (build/stock-venv). Used only by the tests, in a
# subprocess, so no process ever loads two copies of llama.cpp.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=build/stock-venv
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('llama_cpp_python') != '0.3.36')" 2>/dev/null; then
    exit 0
fi
SDIST=$(.venv/bin/python scripts/prepare_llama.py --sdist-only | tail -n 1)
python3 -m venv "$VENV"
echo "[stock-reference] compiling stock llama-cpp-python 0.3.36 (several minutes, once)"
CMAKE_ARGS="-DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) "$VENV/bin/python" -m pip install --quiet --no-cache-dir "$SDIST"
