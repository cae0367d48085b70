"""Loading the patched llama.cpp and binding first-gguf's C API (cpp/first.h).

llama-cpp-python is installed without its own copy of llama.cpp
(``LLAMA_BUILD=OFF``); ``LLAMA_CPP_LIB_PATH`` points it at the libraries that
scripts/build_llama.py compiled, so exactly one libllama and one libggml are
loaded per process, and the ``first_*`` symbols live in that same libllama.
"""
from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

ENV_LIB_DIR = "FIRST_GGUF_LIB_DIR"

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


def lib_dir() -> Path:
    """Folder holding the patched libllama and libggml*."""
    env = os.environ.get(ENV_LIB_DIR)
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "build" / "native" / "lib"


def _load():
    d = lib_dir()
    name = "libllama.dylib" if sys.platform == "darwin" else "libllama.so"
    if not (d / name).exists():
        raise ImportError(
            f"first_gguf: patched llama.cpp library not found: {d / name}; "
            f"run ./setup.sh (or set {ENV_LIB_DIR} to the folder holding it)"
        )
    if "llama_cpp.llama_cpp" in sys.modules:
        loaded = Path(sys.modules["llama_cpp.llama_cpp"]._base_path).resolve()
        if loaded != d.resolve():
            raise ImportError(
                f"first_gguf: llama_cpp was imported before first_gguf and loaded libllama from {loaded}; "
                f"import first_gguf first (a second copy of llama.cpp in one process is not supported)"
            )
    os.environ["LLAMA_CPP_LIB_PATH"] = str(d)
    import llama_cpp.llama_cpp as llama_cpp  # noqa: E402  (after LLAMA_CPP_LIB_PATH)

    return llama_cpp


llama_cpp = _load()
lib = llama_cpp._lib

_c = ctypes
_ctx_p = _c.c_void_p
_model_p = _c.c_void_p


def _bind(name, argtypes, restype):
    try:
        fn = getattr(lib, name)
    except AttributeError as e:
        raise ImportError(
            f"first_gguf: {lib_dir()} holds a libllama without first-gguf's patch ({name} missing); "
            f"rebuild with ./setup.sh"
        ) from e
    fn.argtypes = argtypes
    fn.restype = restype
    return fn


first_model_supports_skip = _bind("first_model_supports_skip", [_model_p], _c.c_int32)
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


def check(rc: int, what: str) -> int:
    if rc < 0:
        raise RuntimeError(f"{what} failed: {FIRST_ERRORS.get(rc, f'error {rc}')}")
    return rc
