"""quantize: llama.cpp's own quantizer from the patched libllama (routers stay F32, bit-exact)."""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

from .gguf_edit import GGUFEditError, atomic_output, read_gguf, refuse_sidecar


def _llama_cpp():
    from .._lib import llama_cpp

    return llama_cpp


def quant_types() -> list[str]:
    lc = _llama_cpp()
    return sorted(n[len("LLAMA_FTYPE_MOSTLY_"):] for n in dir(lc)
                  if n.startswith("LLAMA_FTYPE_MOSTLY_") and isinstance(getattr(lc, n), int))


def quantize(src: str | os.PathLike, dst: str | os.PathLike, qtype: str, *, force: bool = False,
             n_threads: int | None = None, allow_requantize: bool = False, progress: bool = False) -> Path:
    src_p, dst_p = Path(src), Path(dst)
    refuse_sidecar(read_gguf(src_p), src_p, "quantize")  # clear error for a missing or corrupt input, or a sidecar
    if dst_p.exists() and dst_p.resolve() == src_p.resolve():
        raise GGUFEditError(f"output path {dst_p} is the input file; choose another output")
    if dst_p.exists() and not force:
        raise GGUFEditError(f"output file exists: {dst_p}; pass force=True (--force) to overwrite")
    if not dst_p.parent.is_dir():
        raise GGUFEditError(f"output folder does not exist: {dst_p.parent}")
    lc = _llama_cpp()
    name = qtype.upper()
    ftype = getattr(lc, f"LLAMA_FTYPE_MOSTLY_{name}", None)
    if not isinstance(ftype, int):
        raise GGUFEditError(f"unknown quantization type {qtype!r}; expected one of {', '.join(quant_types())}")
    params = lc.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = n_threads or 0
    params.allow_requantize = allow_requantize
    from tqdm import tqdm

    from ..model import _LOG

    n_tensors = len(read_gguf(src_p).tensors)
    bar = tqdm(total=n_tensors, desc=f"quantizing to {name}", unit="tensor", disable=not progress)
    # llama.cpp logs one "[   i/   n] name ..." line per tensor
    _LOG.listener = lambda level, msg: bar.update(1) if msg.startswith("[") and "/" in msg[:12] else None
    _LOG.lines.clear()
    try:
        with atomic_output(dst_p) as tmp:
            rc = lc.llama_model_quantize(str(src_p).encode(), tmp.encode(), ctypes.byref(params))
            if rc != 0:
                why = _LOG.detail(f"code {rc}")  # llama.cpp logs the reason ("failed to quantize: ...")
                hint = ("; pass allow_requantize=True (--allow-requantize) to quantize it anyway (quality suffers: "
                        "better from an F16/BF16/F32 GGUF)" if "requantizing" in why else "")
                raise GGUFEditError(f"cannot quantize {src_p} to {name}: {why}{hint}")
    finally:
        _LOG.listener = None
        bar.close()
    return dst_p
