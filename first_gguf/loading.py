"""Loading a GGUF on the patched llama.cpp, besides Model itself: the llama.cpp log capture (_LOG) whose
error lines make load, LoRA and sampler-chain failures say what went wrong, attach_sidecar (a first-gguf
sidecar's tensors onto a loaded llama_cpp.Llama, shared with first_gguf.Llama), the decode LoRA's adapter
calls (load_lora, set_lora) and max_threads (the most threads a Model accepts)."""
from __future__ import annotations

import contextlib
import ctypes
import os

from . import _lib
from ._lib import llama_cpp


class _LogCapture:
    """Keeps llama.cpp's recent error lines so a load failure can say what went wrong."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.verbose = False
        self._in_error = False
        self.listener = None  # callable(level, text), e.g. a progress bar

        @llama_cpp.llama_log_callback
        def _cb(level, text, user_data):  # pragma: no cover - called from C
            msg = text.decode("utf-8", errors="replace")
            if level == 4 or (level == 5 and self._in_error):  # GGML_LOG_LEVEL_ERROR, or its continuation
                self._in_error = True
                if msg.strip():
                    self.lines.append(msg.strip())
                    del self.lines[:-20]
            elif level != 5:
                self._in_error = False
            if self.listener is not None:
                self.listener(level, msg)
            if self.verbose:
                import sys

                print(msg, end="", file=sys.stderr, flush=True)

        self._cb = _cb
        llama_cpp.llama_log_set(self._cb, ctypes.c_void_p(0))

    def detail(self, default: str) -> str:
        """The captured error lines as one message (``default`` when llama.cpp logged none)."""
        return "; ".join(line for line in self.lines if line) or default


_LOG = _LogCapture()


def max_threads() -> int:
    """Most threads a Model accepts: 4x the logical CPUs (llama.cpp hangs or crashes far above that)."""
    return 4 * (os.cpu_count() or 1)


def attach_sidecar(llama, routers_path, model_path, verbose: bool) -> None:
    """Attach a first-gguf sidecar's tensors to a loaded llama_cpp.Llama (the C side checks them again and
    applies all or nothing), then give it a fresh context: one made before the attach does not see them.
    Raises ValueError naming both files; the caller closes the Llama."""
    from llama_cpp import _internals

    err = ctypes.create_string_buffer(1024)
    rc = _lib.first_model_attach_sidecar(llama._model.model, str(routers_path).encode("utf-8"), err, len(err))
    if rc != _lib.FIRST_OK:
        raise ValueError(f"cannot attach {routers_path} to {model_path}: "
                         f"{err.value.decode('utf-8', 'replace') or _lib.FIRST_ERRORS.get(rc, rc)}")
    old = llama._ctx
    llama._ctx = llama._stack.enter_context(contextlib.closing(
        _internals.LlamaContext(model=llama._model, params=llama.context_params, verbose=verbose)))
    old.close()


def load_lora(model, path, model_path) -> object:
    """A llama.cpp LoRA adapter GGUF at ``path`` loaded for ``model`` (a llama_model_p; freed with it);
    ValueError with llama.cpp's error lines when it does not load."""
    _LOG.lines.clear()
    adapter = llama_cpp.llama_adapter_lora_init(model, str(path).encode("utf-8"))
    if not adapter:
        raise ValueError(f"failed to load LoRA adapter {path} for {model_path}: "
                         f"{_LOG.detail('llama_adapter_lora_init failed')}")
    return adapter


def set_lora(ctx, adapter, scale: float = 1.0) -> None:
    """Attach ``adapter`` to the context ``ctx`` at ``scale``, replacing any attached; None detaches all."""
    if adapter is not None:
        adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter)
        scales = (ctypes.c_float * 1)(scale)
        rc = llama_cpp.llama_set_adapters_lora(ctx, adapters, 1, scales)
    else:
        rc = llama_cpp.llama_set_adapters_lora(ctx, None, 0, None)
    if rc != 0:
        raise RuntimeError(f"llama_set_adapters_lora failed with code {rc}")
