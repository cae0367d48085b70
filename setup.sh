#!/usr/bin/env bash
# Set up first-gguf from scratch and run the main job on the default model.
#   ./setup.sh                      # build, install, then generate with skip_budget 0.3
#   ./setup.sh --no-run             # build and install only
# Leaves a virtual environment in .venv and the patched llama.cpp in build/.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

run_main=1
if [ "${1:-}" = "--no-run" ]; then run_main=0; fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
VPY=.venv/bin/python
"$VPY" -m pip install --quiet --upgrade pip setuptools wheel

# 1. pinned llama.cpp: download + verify the llama-cpp-python 0.3.36 sdist, patch, compile once
"$VPY" scripts/build_llama.py
SDIST=$("$VPY" scripts/build_llama.py --sdist-only | tail -n 1)

# 2. llama-cpp-python's Python bindings from the same sdist, without its own llama.cpp build
if ! "$VPY" -c "import importlib.metadata as m, sys; sys.exit(m.version('llama_cpp_python') != '0.3.36')" 2>/dev/null; then
    CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" "$VPY" -m pip install --quiet --no-cache-dir "$SDIST"
fi

# 3. first-gguf itself (editable: it finds build/native/lib next to the sources); torch is
#    installed first and pinned so no CUDA build is pulled in
"$VPY" -m pip install --quiet torch==2.13.0
"$VPY" -m pip install --quiet -e '.[test,train,eval,serve]'

# 4. the default model (download, verify, attach the static ranking) and the main job
if [ "$run_main" = 1 ]; then
    .venv/bin/first-gguf generate "Explain why the sky is blue." --skip-budget 0.1 --max-tokens 96
fi
