"""Shared fixtures.

The real default model (SmolLM2-135M-Instruct Q4_1, 93 MB) is downloaded and
verified by the setup command and cached; tests that need a GGUF with routers
or malformed data build it from that file in a temporary folder.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
STOCK_PYTHON = ROOT / "build" / "stock-venv" / "bin" / "python"


@pytest.fixture(scope="session")
def base_gguf() -> Path:
    from first_gguf.default_model import base_gguf_path

    return base_gguf_path()


@pytest.fixture(scope="session")
def router_weights(base_gguf):
    """Seeded random routers for every block, scaled so scores spread over (0, 1)."""
    from first_gguf.gguf_info import read_info

    info = read_info(base_gguf)
    rng = np.random.default_rng(1234)
    return {il: (rng.standard_normal(info.n_embd).astype(np.float32) * 0.2, float(rng.standard_normal()))
            for il in range(info.n_layer)}


@pytest.fixture(scope="session")
def router_gguf(tmp_path_factory, base_gguf, router_weights) -> Path:
    from first_gguf.convert.attach import attach

    out = tmp_path_factory.mktemp("routers") / "smollm2-routers.gguf"
    return attach(base_gguf, out, routers=router_weights,
                  rankings={"test_rank": {"ranking": list(range(29, -1, -1)), "method": "test"}})


@pytest.fixture(scope="session")
def base_model(base_gguf):
    import first_gguf

    m = first_gguf.load(base_gguf, n_ctx=2048, n_threads=2)
    yield m
    m.close()


@pytest.fixture(scope="session")
def router_model(router_gguf):
    import first_gguf

    m = first_gguf.load(router_gguf, n_ctx=2048, n_threads=2)
    yield m
    m.close()


@pytest.fixture(scope="session")
def stock_python() -> Path:
    if not STOCK_PYTHON.exists():
        pytest.fail(f"stock reference interpreter missing: {STOCK_PYTHON}; run scripts/build_stock_reference.sh "
                    f"(the README's test command does)")
    return STOCK_PYTHON
