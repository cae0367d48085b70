"""What first-gguf reads from a GGUF header before llama.cpp loads it.

Reading the header with gguf-py (memory-mapped, no tensor data touched) lets
us validate router tensors and first.* metadata with messages that name the
file, tensor, expected and got, instead of llama.cpp's generic load failure.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from .constants import SIDECAR_ADAPTER_TYPE, Keys, Tensors
from .convert.gguf_edit import GGUFEditError, field_value, read_gguf
from .convert.ranking_file import RankingError, check_ranking


@dataclass
class GGUFInfo:
    path: Path
    architecture: str
    name: str | None
    n_layer: int
    n_embd: int
    file_type: str | None
    router_blocks: list[int]
    router_has_bias: bool
    static_rankings: dict[str, list[int]] = field(default_factory=dict)
    static_sources: dict[str, dict] = field(default_factory=dict)
    router_source: dict | None = None
    bypass_blocks: list[int] = field(default_factory=list)
    bypass_rank: int = 0
    sidecar: bool = False                 # a first-gguf sidecar (general.type adapter), not a model
    base_fingerprint: dict | None = None  # a sidecar's: the model it belongs to
    routers_path: Path | None = None      # where the first-gguf data was read from, when not ``path``

    @property
    def supports_skip(self) -> bool:
        from ._lib import supported_architectures

        return self.architecture in supported_architectures()

    @property
    def has_first_data(self) -> bool:
        """Routers, bypasses or static rankings inside this file (a sidecar then cannot be attached to it)."""
        return bool(self.router_blocks or self.bypass_blocks or self.static_rankings)

    @property
    def default_static_ranking(self) -> str | None:
        return next(iter(self.static_rankings), None)

    def to_dict(self) -> dict:
        """What ``first-gguf info --json`` prints."""
        return {
            "path": str(self.path),
            "routers_path": str(self.routers_path) if self.routers_path else None,
            "sidecar": self.sidecar,
            "architecture": self.architecture,
            "name": self.name,
            "file_type": self.file_type,
            "n_layer": self.n_layer,
            "n_embd": self.n_embd,
            "layer_skip_supported": self.supports_skip,
            "router_blocks": self.router_blocks,
            "router_bias": self.router_has_bias,
            "router_source": self.router_source,
            "bypass_blocks": self.bypass_blocks,
            "bypass_rank": self.bypass_rank,
            "static_rankings": self.static_rankings,
            "static_ranking_sources": self.static_sources,
        }

    def describe(self) -> list[str]:
        """What ``first-gguf info`` prints, one line each."""
        lines = [f"file           {self.path}{'  (a first-gguf sidecar)' if self.sidecar else ''}"]
        if self.routers_path:
            lines.append(f"sidecar        {self.routers_path}")
        lines.append(f"architecture   {self.architecture}  ({self.name or 'unnamed'}, {self.file_type or '?'})")
        lines.append(f"blocks         {self.n_layer}   n_embd {self.n_embd}")
        lines.append(f"layer skipping {'supported' if self.supports_skip else 'not supported by the patch'}")
        if self.router_blocks:
            lines.append(f"routers        {len(self.router_blocks)} blocks: {','.join(map(str, self.router_blocks))}"
                         f"{' (with bias)' if self.router_has_bias else ''}")
        else:
            lines.append("routers        none")
        if self.bypass_blocks:
            lines.append(f"bypasses       {len(self.bypass_blocks)} blocks, rank {self.bypass_rank} "
                         f"(a skipped block adds up @ down @ rmsnorm(h))")
        else:
            lines.append("bypasses       none (a skipped block passes its input through)")
        for i, (name, order) in enumerate(self.static_rankings.items()):
            method = self.static_sources.get(name, {}).get("method", "")
            lines.append(f"static ranking {name}{' (default)' if i == 0 else ''}: {','.join(map(str, order))}"
                         f"{'  [' + method + ']' if method else ''}")
        if not self.static_rankings:
            lines.append("static ranking none")
        return lines


def _json_or_text(value):
    if value is None:
        return None
    try:
        return json.loads(value)
    except (TypeError, ValueError):
        return {"text": value}


def read_info(path: str | Path) -> GGUFInfo:
    """Read and validate first-gguf's view of a GGUF file. Raises ValueError naming the problem."""
    p = Path(path)
    try:
        reader = read_gguf(p)
    except GGUFEditError as e:
        raise ValueError(str(e)) from None
    arch = field_value(reader, gguf.Keys.General.ARCHITECTURE)
    if not arch:
        raise ValueError(f"{p}: missing key general.architecture")
    n_layer = field_value(reader, gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch))
    n_embd = field_value(reader, gguf.Keys.LLM.EMBEDDING_LENGTH.format(arch=arch))
    if n_layer is None or n_embd is None:
        raise ValueError(f"{p}: missing {arch}.block_count or {arch}.embedding_length")
    n_layer, n_embd = int(n_layer), int(n_embd)
    ftype = field_value(reader, gguf.Keys.General.FILE_TYPE)
    ftype_name = None
    if ftype is not None:
        try:
            ftype_name = gguf.LlamaFileType(int(ftype)).name.removeprefix("MOSTLY_")
        except ValueError:
            ftype_name = str(ftype)

    tensors = {t.name: t for t in reader.tensors}
    errors: list[str] = []
    blocks: list[int] = []
    n_bias = 0
    bypass: dict[int, dict[str, list[int]]] = {}
    for name, t in tensors.items():
        if Tensors.is_bypass_tensor(name):
            parts = name.split(".")
            if len(parts) != 5 or not parts[1].isdigit() or parts[3] not in ("down", "up") or parts[4] != "weight":
                errors.append(f"unknown bypass tensor '{name}'; expected blk.N.bypass.down.weight or "
                              f"blk.N.bypass.up.weight")
            elif int(parts[1]) >= n_layer:
                errors.append(f"tensor '{name}' names block {parts[1]}; the model has {n_layer} blocks")
            elif t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                errors.append(f"tensor '{name}' has wrong type; expected F32 or F16, got {t.tensor_type.name}")
            elif len(t.shape) != 2:
                errors.append(f"tensor '{name}' has wrong shape; expected 2 dims, got {[int(x) for x in t.shape]}")
            else:
                bypass.setdefault(int(parts[1]), {})[parts[3]] = [int(x) for x in t.shape]
            continue
        if not Tensors.is_first_tensor(name):
            continue
        parts = name.split(".")
        if len(parts) != 4 or not parts[1].isdigit() or parts[3] not in ("weight", "bias"):
            errors.append(f"unknown router tensor '{name}'; expected blk.N.router.weight or blk.N.router.bias")
            continue
        bid = int(parts[1])
        if bid >= n_layer:
            errors.append(f"tensor '{name}' names block {bid}; the model has {n_layer} blocks")
            continue
        shape = [int(x) for x in t.shape]  # GGUF order: ne0 first
        expect = [n_embd, 1] if parts[3] == "weight" else [1]
        # gguf-py may drop trailing singleton dims
        norm = shape + [1] * (len(expect) - len(shape)) if len(shape) < len(expect) else shape
        if norm != expect:
            errors.append(f"tensor '{name}' has wrong shape; expected {expect}, got {shape}")
        if t.tensor_type != gguf.GGMLQuantizationType.F32:
            errors.append(f"tensor '{name}' has wrong type; expected F32, got {t.tensor_type.name}")
        elif parts[3] == "weight" and not np.all(np.isfinite(t.data)):
            errors.append(f"tensor '{name}' holds NaN or Inf values")
        if parts[3] == "weight":
            blocks.append(bid)
        else:
            n_bias += 1
            if Tensors.ROUTER_WEIGHT.format(bid=bid) not in tensors:
                errors.append(f"tensor '{name}' has no matching {Tensors.ROUTER_WEIGHT.format(bid=bid)}")
    ranks = set()
    for bid, d in sorted(bypass.items()):
        down, up = d.get("down"), d.get("up")
        if down is None or up is None:
            errors.append(f"block {bid} has bypass {'down' if down else 'up'} but not {'up' if down else 'down'}")
        elif down[0] != n_embd or up != [down[1], n_embd]:
            errors.append(f"bypass of block {bid} has wrong shape; expected down [{n_embd}, rank] and up "
                          f"[rank, {n_embd}], got {down} and {up}")
        else:
            ranks.add(down[1])
    if len(ranks) > 1:
        errors.append(f"bypasses of different ranks {sorted(ranks)}")
    if blocks or n_bias or bypass:
        from ._lib import supported_architectures

        if arch not in supported_architectures():
            errors.append(f"router tensors on architecture '{arch}', which the layer-skip patch does not cover "
                          f"(supported: {', '.join(supported_architectures())})")

    rankings: dict[str, list[int]] = {}
    sources: dict[str, dict] = {}
    names = field_value(reader, Keys.STATIC_RANKINGS) or []
    for rname in names:
        ranking = field_value(reader, Keys.STATIC_RANKING.format(name=rname))
        if ranking is None:
            errors.append(f"{Keys.STATIC_RANKINGS} lists '{rname}' but {Keys.STATIC_RANKING.format(name=rname)} is missing")
            continue
        try:
            where = f"static ranking '{rname}' ({Keys.STATIC_RANKING.format(name=rname)})"
            ranking = check_ranking({"ranking": ranking}, where, n_layer=n_layer)
        except RankingError as e:
            errors.append(str(e))
            continue
        rankings[rname] = ranking
        src = _json_or_text(field_value(reader, Keys.STATIC_RANKING_SOURCE.format(name=rname)))
        if src is not None:
            sources[rname] = src

    gtype = field_value(reader, gguf.Keys.General.TYPE)
    sidecar = gtype == gguf.GGUFType.ADAPTER and field_value(reader, gguf.Keys.Adapter.TYPE) == SIDECAR_ADAPTER_TYPE
    base_fp = _json_or_text(field_value(reader, Keys.BASE_FINGERPRINT)) if sidecar else None
    if sidecar and not isinstance(base_fp, dict):
        errors.append(f"sidecar without a valid {Keys.BASE_FINGERPRINT} (the model it belongs to)")
    if errors:
        raise ValueError(f"{p}: invalid first-gguf data:\n  " + "\n  ".join(errors))

    return GGUFInfo(
        path=p,
        architecture=str(arch),
        name=field_value(reader, gguf.Keys.General.NAME),
        n_layer=n_layer,
        n_embd=n_embd,
        file_type=ftype_name,
        router_blocks=sorted(blocks),
        router_has_bias=n_bias > 0,
        static_rankings=rankings,
        static_sources=sources,
        router_source=_json_or_text(field_value(reader, Keys.ROUTER_SOURCE)),
        bypass_blocks=sorted(bypass),
        bypass_rank=ranks.pop() if ranks else 0,
        sidecar=sidecar,
        base_fingerprint=base_fp,
    )


def read_with_sidecar(base: str | Path, sidecar: str | Path) -> GGUFInfo:
    """The model ``base`` as the runtime sees it with the first-gguf ``sidecar`` attached: base's header,
    the sidecar's routers, bypasses and rankings. Raises ValueError naming both files and what differs
    when the sidecar is not a first-gguf sidecar, belongs to another model (architecture, block count,
    width, vocabulary or the fingerprint tensor differ), or base already carries first-gguf data."""
    from .convert.router_file import RouterFileError, compare_fingerprints, fingerprint_gguf

    side = read_info(sidecar)
    if not side.sidecar:
        raise ValueError(f"{sidecar}: not a first-gguf sidecar (expected general.type 'adapter' and "
                         f"adapter.type '{SIDECAR_ADAPTER_TYPE}'; first-gguf attach --sidecar writes one)")
    info = read_info(base)
    if info.sidecar:
        raise ValueError(f"{base}: is a first-gguf sidecar, not a model; pass the base GGUF as the model")
    if info.has_first_data:
        raise ValueError(f"{base} already carries first-gguf data, so the sidecar {sidecar} cannot be attached "
                         f"to it; use the untouched base GGUF (first-gguf strip)")
    try:
        got = fingerprint_gguf(base)
    except RouterFileError as e:
        raise ValueError(str(e)) from None
    diff = compare_fingerprints(side.base_fingerprint, got, made_for="the sidecar was made for")
    if diff:
        raise ValueError(f"sidecar {sidecar} does not belong to {base}: " + "; ".join(diff))
    info.router_blocks, info.router_has_bias = side.router_blocks, side.router_has_bias
    info.static_rankings, info.static_sources = side.static_rankings, side.static_sources
    info.router_source, info.bypass_blocks, info.bypass_rank = side.router_source, side.bypass_blocks, side.bypass_rank
    info.routers_path = side.path
    return info
