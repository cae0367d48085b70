"""attach / strip: add first-gguf data (routers, bypass adapters, static rankings) to any GGUF, or remove it.

Every other key and tensor is copied bit-identically, whatever the quant type.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import gguf
import numpy as np

from ..constants import BYPASS_DEFINITION, FORMAT_VERSION, ROUTER_DEFINITION, SIDECAR_ADAPTER_TYPE, Keys, Tensors
from .gguf_edit import KV, GGUFEditError, rewrite_gguf


def _info(path):
    from ..gguf_info import read_info

    try:
        return read_info(path)
    except ValueError as e:
        raise GGUFEditError(str(e)) from None


def _ranking_kv(n_layer: int, rankings: Mapping[str, Mapping]) -> dict[str, KV]:
    kv: dict[str, KV] = {}
    names = list(rankings)
    for name in names:
        if not name or not all(c.isalnum() or c in "_-" for c in name) or name in ("router", "static"):
            raise GGUFEditError(f"invalid static ranking name {name!r}; expected letters, digits, '_' or '-', "
                                f"not 'router' or 'static'")
        r = rankings[name]
        order = r.get("ranking") if isinstance(r, Mapping) else None
        if not isinstance(order, (list, tuple, np.ndarray)) or not all(
                isinstance(b, (int, np.integer)) and not isinstance(b, bool) for b in order):
            raise GGUFEditError(f"static ranking {name!r}: 'ranking' must be a list of block indices (integers); "
                                f"got {order!r}")
        order = [int(b) for b in order]
        if len(set(order)) != len(order) or any(not 0 <= b < n_layer for b in order):
            raise GGUFEditError(f"static ranking {name!r} must hold distinct block indices in [0, {n_layer}); "
                                f"got {order}")
        kv[Keys.STATIC_RANKING.format(name=name)] = KV(order, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32)
        source = {k: v for k, v in r.items() if k != "ranking"}
        kv[Keys.STATIC_RANKING_SOURCE.format(name=name)] = KV(json.dumps(source, sort_keys=True), gguf.GGUFValueType.STRING)
    kv[Keys.STATIC_RANKINGS] = KV(names, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING)
    return kv


def _first_data(src, info, routers, rankings, router_source, bypasses, bypass_dtype):
    """Checked first.* keys and tensors for ``info``'s model (see attach); raises GGUFEditError naming ``src``."""
    if not routers and not rankings and not bypasses:
        raise GGUFEditError("nothing to attach: give routers, bypasses and/or static rankings")
    if bypass_dtype not in ("f32", "f16"):
        raise GGUFEditError(f"bypass_dtype must be 'f32' or 'f16'; got {bypass_dtype!r}")
    if not info.supports_skip:
        from .._lib import unsupported_architecture

        raise GGUFEditError(f"{src}: {unsupported_architecture(info.architecture)}")
    set_kv: dict[str, KV] = {Keys.VERSION: KV(FORMAT_VERSION, gguf.GGUFValueType.UINT32)}
    tensors: list[tuple[str, np.ndarray]] = []
    if routers:
        errors = []
        for bid in sorted(routers):
            w, b = routers[bid]
            if not isinstance(bid, (int, np.integer)) or not 0 <= bid < info.n_layer:
                errors.append(f"router for block {bid}: the model has blocks 0..{info.n_layer - 1}")
                continue
            w = np.asarray(w, dtype=np.float32)
            if w.shape != (info.n_embd,):
                errors.append(f"router weight of block {bid} has shape {w.shape}; expected ({info.n_embd},)")
                continue
            if not np.all(np.isfinite(w)) or (b is not None and not np.isfinite(b)):
                errors.append(f"router of block {bid} holds NaN or Inf")
                continue
            tensors.append((Tensors.ROUTER_WEIGHT.format(bid=bid), w.reshape(1, info.n_embd)))
            if b is not None:
                tensors.append((Tensors.ROUTER_BIAS.format(bid=bid), np.asarray([b], dtype=np.float32)))
        if errors:
            raise GGUFEditError(f"cannot attach routers to {src}:\n  " + "\n  ".join(errors))
        set_kv[Keys.ROUTER_DEFINITION] = KV(ROUTER_DEFINITION, gguf.GGUFValueType.STRING)
        set_kv[Keys.ROUTER_N_OUT] = KV(1, gguf.GGUFValueType.UINT32)
        if router_source is not None:
            set_kv[Keys.ROUTER_SOURCE] = KV(json.dumps(dict(router_source), sort_keys=True), gguf.GGUFValueType.STRING)
    if bypasses:
        errors, ranks = [], set()
        for bid in sorted(bypasses):
            down, up = (np.asarray(a, dtype=np.float32) for a in bypasses[bid])
            if not isinstance(bid, (int, np.integer)) or not 0 <= bid < info.n_layer:
                errors.append(f"bypass for block {bid}: the model has blocks 0..{info.n_layer - 1}")
                continue
            r = down.shape[0] if down.ndim == 2 else -1
            if down.shape != (r, info.n_embd) or up.shape != (info.n_embd, r) or not 1 <= r <= info.n_embd:
                errors.append(f"bypass of block {bid}: down {down.shape} / up {up.shape}; expected (rank, "
                              f"{info.n_embd}) / ({info.n_embd}, rank)")
                continue
            if not (np.all(np.isfinite(down)) and np.all(np.isfinite(up))):
                errors.append(f"bypass of block {bid} holds NaN or Inf")
                continue
            ranks.add(r)
            dt = np.float16 if bypass_dtype == "f16" else np.float32
            tensors.append((Tensors.BYPASS_DOWN.format(bid=bid), down.astype(dt)))
            tensors.append((Tensors.BYPASS_UP.format(bid=bid), up.astype(dt)))
        if len(ranks) > 1:
            errors.append(f"bypasses of different ranks {sorted(ranks)}; expected one rank")
        if errors:
            raise GGUFEditError(f"cannot attach bypasses to {src}:\n  " + "\n  ".join(errors))
        set_kv[Keys.BYPASS_DEFINITION] = KV(BYPASS_DEFINITION, gguf.GGUFValueType.STRING)
        set_kv[Keys.BYPASS_RANK] = KV(int(ranks.pop()), gguf.GGUFValueType.UINT32)
        if router_source is not None:
            set_kv[Keys.BYPASS_SOURCE] = KV(json.dumps(dict(router_source), sort_keys=True), gguf.GGUFValueType.STRING)
    if rankings:
        set_kv.update(_ranking_kv(info.n_layer, rankings))

    return set_kv, tensors


def attach(src: str | os.PathLike, dst: str | os.PathLike, *,
           routers: Mapping[int, tuple[np.ndarray, float | None]] | None = None,
           rankings: Mapping[str, Mapping] | None = None,
           router_source: Mapping | None = None,
           bypasses: Mapping[int, tuple[np.ndarray, np.ndarray]] | None = None,
           bypass_dtype: str = "f32",
           force: bool = False, progress: bool = False) -> Path:
    """Write ``dst`` = ``src`` + routers, bypass adapters and/or static rankings.

    routers: block index -> (weight [n_embd], bias or None). bypasses: block index
    -> (down [rank, n_embd], up [n_embd, rank]), one rank for all, stored as
    ``bypass_dtype`` ("f32" or "f16"). Existing first-gguf data of the same kind
    in ``src`` is replaced. ``force`` overwrites ``dst``. ``write_sidecar`` writes
    the same data to a small file of its own instead.
    """
    info = _info(src)
    set_kv, tensors = _first_data(src, info, routers, rankings, router_source, bypasses, bypass_dtype)

    def drop_kv(key: str) -> bool:
        if routers and key.startswith("first.router."):
            return True
        if bypasses and key.startswith("first.bypass."):
            return True
        if rankings and key.startswith(("first.static_ranking", Keys.STATIC_RANKINGS)):
            return True
        return False

    def drop_tensor(name: str) -> bool:  # replaced, not merged: a new router set may cover other blocks
        return bool(routers and Tensors.is_router_tensor(name) or bypasses and Tensors.is_bypass_tensor(name))

    return rewrite_gguf(src, dst, set_kv=set_kv, drop_kv=drop_kv, add_tensors=tensors, drop_tensor=drop_tensor,
                        force=force, progress=progress)


def strip(src: str | os.PathLike, dst: str | os.PathLike, *, force: bool = False, progress: bool = False) -> Path:
    """Write ``dst`` = ``src`` without any first-gguf tensor or key (loads in stock llama.cpp)."""
    from .gguf_edit import read_gguf, refuse_sidecar

    refuse_sidecar(read_gguf(src), src, "strip")
    return rewrite_gguf(src, dst, drop_kv=lambda k: k.startswith(Keys.PREFIX), drop_tensor=Tensors.is_first_tensor,
                        force=force, progress=progress)


def write_sidecar(base: str | os.PathLike, dst: str | os.PathLike, *,
                  routers: Mapping[int, tuple[np.ndarray, float | None]] | None = None,
                  rankings: Mapping[str, Mapping] | None = None,
                  router_source: Mapping | None = None,
                  bypasses: Mapping[int, tuple[np.ndarray, np.ndarray]] | None = None,
                  bypass_dtype: str = "f32", force: bool = False) -> Path:
    """Write a sidecar GGUF for the model ``base``: the same first-gguf data attach() would add (same
    arguments), in a file of its own that leaves ``base`` untouched, as llama.cpp's LoRA adapters do.

    Header: ``general.type = "adapter"``, ``adapter.type = "first-gguf"``, the base's architecture,
    block count and width, and ``first.base.fingerprint`` (convert.router_file.fingerprint_gguf of
    ``base``), which the runtime checks before using the sidecar (first_gguf.gguf_info.read_with_sidecar).
    """
    from .gguf_edit import atomic_output
    from .router_file import fingerprint_gguf

    info = _info(base)
    if info.has_first_data:
        raise GGUFEditError(f"{base} already carries first-gguf data; a sidecar is for an untouched base GGUF "
                            f"(first-gguf strip removes it)")
    set_kv, tensors = _first_data(base, info, routers, rankings, router_source, bypasses, bypass_dtype)
    fingerprint = fingerprint_gguf(base)
    p = Path(dst)
    if p.exists() and not force:
        raise GGUFEditError(f"output file exists: {p}; pass force=True (--force) to overwrite")
    with atomic_output(p) as tmp:
        w = gguf.GGUFWriter(str(tmp), info.architecture)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, SIDECAR_ADAPTER_TYPE)
        if info.name:
            w.add_name(f"{info.name} (first-gguf routers)")
        w.add_block_count(info.n_layer)
        w.add_embedding_length(info.n_embd)
        w.add_string(Keys.BASE_FINGERPRINT, json.dumps(fingerprint, sort_keys=True))
        for key, kv in set_kv.items():
            w.add_key_value(key, kv.value, kv.type, kv.sub_type)
        for name, arr in tensors:
            w.add_tensor(name, np.ascontiguousarray(arr))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return p
