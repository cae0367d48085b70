"""Copy a GGUF file while adding or dropping metadata keys and tensors.

Every key and tensor that is not touched is copied as-is (tensor bytes are
copied raw, whatever the quant type). The output is written to a temporary
file next to the destination and renamed into place only when complete, so an
interrupted or failed run never leaves a partial file, and inputs are never
modified.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

import gguf


class GGUFEditError(ValueError):
    """A GGUF file cannot be read or written as asked; the message names the file."""


@dataclass
class KV:
    value: Any
    type: gguf.GGUFValueType
    sub_type: gguf.GGUFValueType | None = None


@contextlib.contextmanager
def atomic_output(dst: Path):
    """Yield a temporary path next to ``dst``; rename it to ``dst`` only if the block succeeds.

    On any failure or interruption the temporary file is removed, so ``dst`` is
    either the complete new file or untouched.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    mode = 0o666 & ~umask  # mkstemp makes 0600; give the file the usual permissions
    try:
        yield tmp
        os.chmod(tmp, mode)  # after the writer: some (safetensors) replace the file they are given
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_gguf(path: str | os.PathLike) -> gguf.GGUFReader:
    p = Path(path)
    if not p.exists():
        raise GGUFEditError(f"GGUF file not found: {p}")
    if not p.is_file():
        raise GGUFEditError(f"not a file: {p}; expected a GGUF file")
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFEditError(f"not a GGUF file: {p}; expected magic b'GGUF', got {magic!r}")
    try:
        return gguf.GGUFReader(p, "r")
    except Exception as e:  # gguf-py raises ValueError/IndexError/... on corrupt files
        raise GGUFEditError(f"corrupt or truncated GGUF file: {p}: {e}") from e


def field_value(reader: gguf.GGUFReader, key: str) -> Any:
    field = reader.get_field(key)
    return field.contents() if field is not None else None


def refuse_sidecar(reader: gguf.GGUFReader, path: str | os.PathLike, action: str) -> None:
    """GGUFEditError when ``path`` is a first-gguf sidecar (routers, bypasses and rankings for a base GGUF,
    no model weights): ``action`` ("strip", "quantize") is for the model it belongs to."""
    from ..constants import SIDECAR_ADAPTER_TYPE

    if (field_value(reader, gguf.Keys.General.TYPE) == gguf.GGUFType.ADAPTER
            and field_value(reader, gguf.Keys.Adapter.TYPE) == SIDECAR_ADAPTER_TYPE):
        what = (f"{path} is a first-gguf sidecar (routers, bypass adapters and rankings for a base GGUF), not a "
                f"model")
        if action == "strip":
            raise GGUFEditError(f"{what}: there is nothing to strip; its base GGUF has no first-gguf data and "
                                f"loads in stock llama.cpp as it is")
        raise GGUFEditError(f"{what}: {action} the base GGUF instead")


def _copy_kv(field) -> KV:
    vtype = field.types[0]
    sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
    return KV(field.contents(), vtype, sub)


def rewrite_gguf(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    set_kv: dict[str, KV] | None = None,
    drop_kv: Callable[[str], bool] = lambda k: False,
    add_tensors: Iterable[tuple[str, np.ndarray]] = (),
    drop_tensor: Callable[[str], bool] = lambda n: False,
    force: bool = False,
    progress: bool = False,
    arch: str | None = None,
) -> Path:
    """Write ``dst``: ``src`` with keys/tensors dropped, then keys set and tensors added.

    ``add_tensors`` holds (name, array) pairs in numpy order (``[n_out, n_embd]``
    for a GGUF shape ``[n_embd, n_out]``). Returns the destination path.
    """
    src_p, dst_p = Path(src), Path(dst)
    if dst_p.exists() and src_p.exists() and dst_p.resolve() == src_p.resolve():
        raise GGUFEditError(f"output path {dst_p} is the input file; choose another output")
    if dst_p.exists() and not force:
        raise GGUFEditError(f"output file exists: {dst_p}; pass force=True (--force) to overwrite")
    if not dst_p.parent.exists():
        raise GGUFEditError(f"output folder does not exist: {dst_p.parent}")

    reader = read_gguf(src_p)
    arch = arch or field_value(reader, gguf.Keys.General.ARCHITECTURE)
    if arch is None:
        raise GGUFEditError(f"{src_p}: missing key {gguf.Keys.General.ARCHITECTURE}")
    set_kv = dict(set_kv or {})
    new_tensors = list(add_tensors)
    new_names = [n for n, _ in new_tensors]
    if len(set(new_names)) != len(new_names):
        raise GGUFEditError(f"duplicate tensor names among the tensors to add: {sorted(new_names)}")

    kept = [t for t in reader.tensors if not drop_tensor(t.name)]
    clash = sorted({t.name for t in kept} & set(new_names))
    if clash:
        raise GGUFEditError(f"{src_p} already has tensors {clash[:4]}{'...' if len(clash) > 4 else ''}; "
                            f"strip them first or pass force to replace")

    with atomic_output(dst_p) as tmp:
        writer = gguf.GGUFWriter(tmp, arch, endianess=reader.endianess)
        alignment = field_value(reader, gguf.Keys.General.ALIGNMENT)
        if alignment is not None:
            writer.data_alignment = int(alignment)
        for field in reader.fields.values():
            name = field.name
            if name == gguf.Keys.General.ARCHITECTURE or name.startswith("GGUF.") or drop_kv(name) or name in set_kv:
                continue
            kv = _copy_kv(field)
            writer.add_key_value(name, kv.value, kv.type, sub_type=kv.sub_type)
        for name, kv in set_kv.items():
            writer.add_key_value(name, kv.value, kv.type, sub_type=kv.sub_type)

        for t in kept:
            writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
        for name, arr in new_tensors:
            arr = np.ascontiguousarray(arr)
            writer.add_tensor_info(name, arr.shape, arr.dtype, arr.nbytes)

        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        total = sum(t.n_bytes for t in kept) + sum(a.nbytes for _, a in new_tensors)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(desc=f"writing {dst_p.name}", total=total, unit="B", unit_scale=True)
        for t in kept:
            writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
            if bar:
                bar.update(t.n_bytes)
        for _, arr in new_tensors:
            writer.write_tensor_data(np.ascontiguousarray(arr))
            if bar:
                bar.update(arr.nbytes)
        if bar:
            bar.close()
        writer.close()
    return dst_p
