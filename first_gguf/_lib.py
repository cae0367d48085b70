"""Loading the patched llama.cpp and binding first-gguf's C API (cpp/first.h).

first-gguf's build installs llama-cpp-python's ``llama_cpp`` bindings with the patched
libllama and libggml* in ``llama_cpp/lib`` (CMakeLists.txt), where the bindings load their
library from by default. Whichever of ``llama_cpp`` and ``first_gguf`` is imported first, a
process holds one libllama and one libggml, and the ``first_*`` symbols live in that libllama.
"""
from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import sys
from pathlib import Path

# return codes of cpp/first.h
FIRST_OK = 0
FIRST_ERRORS = {
    -1: "the model's architecture has no layer-skip support",
    -2: "seq_id out of range",
    -3: "mask length differs from the number of blocks",
    -4: "the mask would skip every block",
    -5: "the model has no router tensors",
    -6: "output buffer too small",
    -7: "the sidecar is unreadable or does not fit the model",
}

REINSTALL = ("reinstall first-gguf (./setup.sh in a checkout, or pip install --force-reinstall --no-deps "
             "on its wheel or checkout)")


def _load():
    if "llama_cpp.llama_cpp" not in sys.modules and importlib.util.find_spec("llama_cpp") is None:
        raise ImportError(f"first_gguf: the llama_cpp bindings are missing (first-gguf installs its own build of "
                          f"them); {REINSTALL}")
    try:
        import llama_cpp.llama_cpp as llama_cpp
    except (OSError, RuntimeError) as e:  # the bindings raise RuntimeError for a missing library
        raise ImportError(f"first_gguf: llama_cpp could not load its library ({e}); {REINSTALL}") from e
    return llama_cpp


llama_cpp = _load()
lib = llama_cpp._lib


def lib_path() -> Path:
    """The libllama this process loaded (through llama_cpp)."""
    return Path(lib._name).resolve()


_c = ctypes
_ctx_p = _c.c_void_p
_model_p = _c.c_void_p


def _bind(name, argtypes, restype):
    try:
        fn = getattr(lib, name)
    except AttributeError as e:
        override = os.environ.get("LLAMA_CPP_LIB_PATH")
        why = (f"LLAMA_CPP_LIB_PATH={override} points llama_cpp at another build; unset it" if override else
               f"another llama-cpp-python was installed over first-gguf's llama_cpp; {REINSTALL}")
        raise ImportError(f"first_gguf: {lib_path()} is not first-gguf's patched libllama ({name} missing): {why}") from e
    fn.argtypes = argtypes
    fn.restype = restype
    return fn


first_model_supports_skip = _bind("first_model_supports_skip", [_model_p], _c.c_int32)
first_supported_archs = _bind("first_supported_archs", [_c.c_char_p, _c.c_size_t], _c.c_int32)
first_model_n_routers = _bind("first_model_n_routers", [_model_p], _c.c_int32)
first_set_skip_mask = _bind(
    "first_set_skip_mask", [_ctx_p, _c.c_int32, _c.POINTER(_c.c_uint8), _c.c_int32], _c.c_int32
)
first_get_skip_mask = _bind(
    "first_get_skip_mask", [_ctx_p, _c.c_int32, _c.POINTER(_c.c_uint8), _c.c_int32], _c.c_int32
)
first_model_n_bypasses = _bind("first_model_n_bypasses", [_model_p], _c.c_int32)
first_set_bypass = _bind("first_set_bypass", [_ctx_p, _c.c_bool], _c.c_int32)
first_get_bypass = _bind("first_get_bypass", [_ctx_p], _c.c_bool)
first_set_routing = _bind("first_set_routing", [_ctx_p, _c.c_int32, _c.c_bool], _c.c_int32)
first_get_router_n_tokens = _bind("first_get_router_n_tokens", [_ctx_p, _c.c_int32], _c.c_int32)
first_get_router_scores = _bind(
    "first_get_router_scores",
    [_ctx_p, _c.c_int32, _c.POINTER(_c.c_float), _c.POINTER(_c.c_int32), _c.c_int32],
    _c.c_int32,
)
first_clear_router_scores = _bind("first_clear_router_scores", [_ctx_p, _c.c_int32], None)
first_model_attach_sidecar = _bind(
    "first_model_attach_sidecar", [_model_p, _c.c_char_p, _c.c_char_p, _c.c_size_t], _c.c_int32
)
first_set_layer_inp_output = _bind("first_set_layer_inp_output", [_ctx_p, _c.c_int32, _c.c_bool], None)
first_get_layer_inp = _bind("first_get_layer_inp", [_ctx_p, _c.c_int32], _c.POINTER(_c.c_float))


@functools.cache
def supported_architectures() -> tuple[str, ...]:
    """GGUF architecture names (``general.architecture``) whose graph builder honours skip masks: the one
    list, kept by the C side (cpp/llama-first.cpp, first_supported_archs)."""
    n = first_supported_archs(None, 0)
    buf = _c.create_string_buffer(n + 1)
    first_supported_archs(buf, n + 1)
    return tuple(a for a in buf.value.decode("ascii").split(",") if a)


def unsupported_architecture(arch: str) -> str:
    """The words for an architecture without layer-skip support, naming it and the supported ones."""
    return (f"architecture '{arch}' is not covered by the layer-skip patch "
            f"(supported: {', '.join(supported_architectures())})")


def check(rc: int, what: str) -> int:
    if rc < 0:
        raise RuntimeError(f"{what} failed: {FIRST_ERRORS.get(rc, f'error {rc}')}")
    return rc
