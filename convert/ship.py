"""The shipped form of a router file (``first-gguf routers ship``): bypass adapters as float16, identity
adapters dropped (and, with ``blocks``, all but the named blocks' adapters; with ``rank``, the first ``rank``
components of each).

A bypass whose ``up`` matrix is exactly zero adds nothing (``h + up @ (...)`` = ``h``): the blocks training
never skipped keep the zero they started from. Dropping them is exact (the runtime uses the identity for a
skipped block without an adapter) and keeps the file small; float16 adapters cost <= 0.03 nats/token on the
default model. Routers, rankings, fingerprint and provenance are copied unchanged.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Iterable, NamedTuple

import numpy as np

from .router_file import RouterFileError, load_router_file, save_router_file


class Shipped(NamedTuple):
    path: Path
    kept: list[int]       # blocks whose adapter was written (float16)
    dropped: list[int]    # blocks whose adapter was dropped: the identity, or not in ``blocks``


def parse_blocks(text: str, what: str = "--blocks") -> set[int]:
    """'1,9,10' -> {1, 9, 10}; RouterFileError naming ``what`` and the text otherwise."""
    try:
        blocks = {int(x) for x in text.split(",") if x.strip()}
    except ValueError:
        raise RouterFileError(f"{what} {text!r}: expected comma-separated block indices") from None
    if not blocks:
        raise RouterFileError(f"{what} {text!r}: expected at least one block index")
    return blocks


def ship_router_file(src: str | os.PathLike, dst: str | os.PathLike, *, blocks: Iterable[int] | None = None,
                     rank: int | None = None, force: bool = False) -> Shipped:
    """Write ``dst``: the router file ``src`` with float16 bypass adapters, identity adapters (``up`` all zero)
    dropped; ``blocks``: keep only these blocks' adapters (a skipped block without one passes its input
    through); ``rank``: keep the first ``rank`` components of every adapter (down's rows, up's columns; for
    first-gguf fit's reduced-rank bypasses, ordered by explained variance, exactly the rank-``rank`` fit).
    Raises RouterFileError naming the file or the value that is wrong; nothing is written then."""
    dst = Path(dst)
    if dst.exists() and not force:  # before reading src: an existing output is the commonest mistake
        raise RouterFileError(f"output file exists: {dst}; pass force=True (--force) to overwrite")
    rf = load_router_file(src)
    if not rf.bypasses:
        raise RouterFileError(f"{src} has no bypass adapters: nothing to convert")
    keep = None
    if blocks is not None:
        keep = {int(b) for b in blocks}
        missing = sorted(keep - set(rf.bypasses))
        if missing:
            raise RouterFileError(f"--blocks names blocks without an adapter in {src}: {missing} (it has "
                                  f"{sorted(rf.bypasses)})")
    if rank is not None and not 1 <= rank <= rf.bypass_rank:
        raise RouterFileError(f"--rank {rank}: expected 1..{rf.bypass_rank} (the rank of {src}'s adapters)")
    kept, dropped = {}, []
    for b, (down, up) in sorted(rf.bypasses.items()):
        if not np.any(np.asarray(up)) or (keep is not None and b not in keep):
            dropped.append(b)
            continue
        if rank is not None:
            down, up = np.asarray(down)[:rank], np.asarray(up)[:, :rank]
        with np.errstate(over="ignore"):
            down16, up16 = np.asarray(down, np.float16), np.asarray(up, np.float16)
        if not (np.isfinite(down16).all() and np.isfinite(up16).all()):
            raise RouterFileError(f"{src}: bypass {b} overflows float16")
        kept[b] = (down16, up16)
    path = save_router_file(dst, dataclasses.replace(rf, bypasses=kept), force=force)
    return Shipped(path, sorted(kept), dropped)


__all__ = ["Shipped", "parse_blocks", "ship_router_file"]
