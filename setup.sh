#!/usr/bin/env bash
# Set up first-gguf from scratch and run the main job on the headline model (Qwen2.5-Coder-1.5B-Instruct).
#   ./setup.sh                      # build, install, then generate with skip_budget 0.1 (Qwen2.5-Coder-1.5B)
#   ./setup.sh --no-run             # build and install only
# Leaves a virtual environment in .venv; the package build (scikit-build-core: the pinned
# llama.cpp, patched, compiled with cpp/) lives in build/<wheel tag> and is reused, so a
# rerun after a Python-only change does not recompile llama.cpp.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

run_main=1
if [ "${1:-}" = "--no-run" ]; then run_main=0; fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
VPY=.venv/bin/python
"$VPY" -m pip install --quiet --upgrade pip

# 1. first-gguf provides the llama_cpp bindings itself (llama-cpp-python 0.3.36 over the patched
#    llama.cpp); a llama-cpp-python from an older setup would own the same files
if "$VPY" -m pip show llama_cpp_python >/dev/null 2>&1; then
    "$VPY" -m pip uninstall --quiet --yes llama_cpp_python
fi

# 2. torch first and pinned, so no CUDA build is pulled in
"$VPY" -m pip install --quiet torch==2.13.0

# 3. first-gguf, editable (Python changes take effect at once); its PEP 517 build fetches and
#    verifies the llama-cpp-python sdist, patches and compiles llama.cpp (first time: minutes)
echo "[setup] building and installing first-gguf (the first build compiles llama.cpp: several minutes)"
"$VPY" -m pip install --quiet -e '.[test,train,eval,serve]'

# 4. the main job on the headline model, Qwen2.5-Coder-1.5B-Instruct Q4_K_M (download 1.1 GB once, verify,
#    write its router sidecar), then the library's default model (SmolLM2-135M-Instruct, 93 MB), which the
#    tests use, so that both are cached
if [ "$run_main" = 1 ]; then
    .venv/bin/first-gguf generate "Explain why the sky is blue." --model qwen2.5-coder-1.5b --skip-budget 0.1 \
        --max-tokens 96
    .venv/bin/first-gguf info > /dev/null
fi
