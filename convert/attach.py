"""attach / strip: add first-gguf data (routers, bypass adapters, static rankings) to any GGUF, or remove it.

Every other key and tensor is copied bit-identically, whatever the quant type. ``attach_data`` turns a router
file and static ranking files into what ``attach`` and ``write_sidecar`` write: every command and function that
attaches a router file (``first-gguf attach``, ``first-gguf convert``, the known models' sidecars, the sidecar
``first-gguf train`` writes) goes through it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import gguf
import numpy as np

from ..constants import BYPASS_DEFINITION, FORMAT_VERSION, ROUTER_DEFINITION, SIDECAR_ADAPTER_TYPE, Keys, Tensors
from .gguf_edit import KV, GGUFEditError, rewrite_gguf
from .ranking_file import RankingError, check_ranking, check_ranking_name, read_ranking_file


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
        where = f"static ranking {name!r}"
        try:
            check_ranking_name(name, where)
            order = check_ranking(rankings[name], where, n_layer=n_layer)
        except RankingError as e:
            raise GGUFEditError(str(e)) from None
        kv[Keys.STATIC_RANKING.format(name=name)] = KV(order, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32)
        source = {k: v for k, v in rankings[name].items() if k != "ranking"}
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


@dataclass
class AttachData:
    """What a router file and static rankings add to a GGUF (see attach_data): ``kwargs()`` are the keyword
    arguments of attach() and write_sidecar()."""
    routers: dict[int, tuple[np.ndarray, float | None]] | None = None
    bypasses: dict[int, tuple[np.ndarray, np.ndarray]] | None = None
    rankings: dict[str, dict] = field(default_factory=dict)   # stored in this order; the first is the default
    router_source: dict | None = None                           # the router file's provenance
    fingerprint: dict | None = None                             # the model the router file was made for
    router_path: str | None = None                              # the router file, for messages
    ranking_sources: dict[str, str] = field(default_factory=dict)  # ranking name -> where it came from
    overridden: list[str] = field(default_factory=list)          # router-file rankings replaced by a given one

    def kwargs(self) -> dict:
        return {"routers": self.routers, "bypasses": self.bypasses, "rankings": self.rankings or None,
                "router_source": self.router_source}

    def check_base(self, base: str | os.PathLike, *, force: bool = False,
                   label: str | os.PathLike | None = None) -> None:
        """Refuse ``base`` (the GGUF the data will be attached to; named ``label`` in messages, default its path)
        when the router file was made for another model (unless ``force``) or a ranking names a block it does
        not have. Raises RouterFileError / RankingError naming the file that does not fit."""
        from .router_file import RouterFileError, compare_fingerprints, fingerprint_gguf

        label = base if label is None else label
        if self.routers or self.bypasses:
            diff = compare_fingerprints(self.fingerprint or {}, fingerprint_gguf(base))
            if diff and not force:
                raise RouterFileError(f"{self.router_path} does not fit {label} (pass force=True (--force) to "
                                      f"attach anyway):\n  " + "\n  ".join(diff))
        if self.rankings:
            n_layer = _info(base).n_layer
            for name, r in self.rankings.items():
                check_ranking(r, self.ranking_sources.get(name, f"static ranking {name!r}"), n_layer=n_layer)


def attach_data(router_file=None, rankings: Iterable = ()) -> AttachData:
    """The first-gguf data that ``router_file`` and ``rankings`` add to a GGUF: the one glue between router
    files and attach() / write_sidecar() (``attach(src, dst, **attach_data(rf, files).kwargs())``).

    router_file: a router file's path (read and checked with router_file.load_router_file), a loaded
        RouterFile, or None. Its routers, bypass adapters, provenance (``router_source``) and static rankings.
    rankings: static rankings given explicitly, each a ranking file's path (ranking_file.read_ranking_file)
        or a mapping as such a file holds, with its ``name``.

    The merge rule for rankings, the only one: the given rankings first, in the order given, then the router
    file's own rankings, in the file's order. **A given ranking overrides a same-named ranking inside the router
    file** (it keeps the given ranking's place; ``overridden`` lists those names). Two given rankings with the
    same name are refused. The first ranking stored is the default of ``skip_strategy="static"``.

    Call ``check_base`` with the GGUF before writing. Raises RouterFileError / RankingError naming the file.
    """
    from .router_file import RouterFile, load_router_file

    if isinstance(rankings, (str, os.PathLike)):  # one file
        rankings = [rankings]
    elif isinstance(rankings, Mapping):
        if "ranking" not in rankings:
            raise TypeError(f"rankings must be a list of ranking files or of mappings with a 'name' and a 'ranking'; "
                            f"got a mapping with keys {sorted(rankings)[:5]} (a {{name: ranking}} dict is not taken)")
        rankings = [rankings]  # one ranking
    data = AttachData()
    rf = None
    if router_file is not None:
        rf = router_file if isinstance(router_file, RouterFile) else load_router_file(router_file)
        data.router_path = "the router file" if isinstance(router_file, RouterFile) else str(router_file)
        data.routers, data.bypasses = rf.routers(), rf.bypasses or None
        data.router_source, data.fingerprint = rf.provenance, rf.fingerprint
    n_layer = rf.n_layer if rf is not None else None
    for item in rankings:
        if isinstance(item, Mapping):
            name = item.get("name")
            where = f"static ranking {name!r}" if isinstance(name, str) and name else "a static ranking"
            order = check_ranking(item, where, n_layer=n_layer, need_name=True)
            r = {**item, "ranking": order}
        else:
            r = read_ranking_file(item, n_layer=n_layer)
            where = f"ranking {item}"
        name = r["name"]
        if name in data.rankings:
            raise RankingError(f"{where}: 'name' {name!r} is also the name of {data.ranking_sources[name]}; two "
                               f"given rankings cannot share a name")
        data.rankings[name] = r
        data.ranking_sources[name] = where
    if rf is not None:
        for name, r in rf.static_rankings.items():
            if name in data.rankings:
                data.overridden.append(name)
            else:
                data.rankings[name] = r
                data.ranking_sources[name] = f"static ranking {name!r} of {data.router_path}"
    return data


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
