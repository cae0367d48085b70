"""The shipped form of a trained router file: bypass adapters as float16, identity adapters dropped
(and, with --blocks, all but the named blocks' adapters).

    .venv/bin/python scripts/ship_routers.py stage5.safetensors \
        -o first_gguf/data/smollm2-135m-instruct.routers.safetensors --force

A bypass whose `up` matrix is exactly zero adds nothing (`h + up @ (...)` = `h`): the blocks training
never skipped keep the zero they started from. Dropping them is exact (the runtime uses the identity for a
skipped block without an adapter) and keeps the file small; float16 adapters cost <= 0.03 nats/token on
the default model. Routers, rankings, fingerprint and provenance are copied unchanged.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

import numpy as np

from first_gguf.convert.router_file import RouterFileError, load_router_file, save_router_file


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("routers", help="router file written by first-gguf train")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--force", action="store_true", help="overwrite OUTPUT")
    ap.add_argument("--blocks", default=None,
                    help="keep only these blocks' adapters (comma-separated); a skipped block without an adapter "
                         "passes its input through (plain skipping)")
    ap.add_argument("--rank", type=int, default=None,
                    help="keep the first RANK components of every adapter (down's rows, up's columns): for first-gguf "
                         "fit's reduced-rank bypasses, ordered by explained variance, exactly the rank-RANK fit")
    a = ap.parse_args()
    try:
        rf = load_router_file(a.routers)
        if not rf.bypasses:
            raise RouterFileError(f"{a.routers} has no bypass adapters: nothing to convert")
        keep = None
        if a.blocks is not None:
            try:
                keep = {int(x) for x in a.blocks.split(",") if x.strip()}
            except ValueError:
                raise RouterFileError(f"--blocks {a.blocks!r}: expected comma-separated block indices") from None
            missing = sorted(keep - set(rf.bypasses))
            if missing:
                raise RouterFileError(f"--blocks names blocks without an adapter in {a.routers}: {missing}")
        if a.rank is not None and not 1 <= a.rank <= rf.bypass_rank:
            raise RouterFileError(f"--rank {a.rank}: expected 1..{rf.bypass_rank} (the adapters' rank)")
        kept, dropped = {}, []
        for b, (down, up) in sorted(rf.bypasses.items()):
            if not np.any(np.asarray(up)) or (keep is not None and b not in keep):
                dropped.append(b)
                continue
            if a.rank is not None:
                down, up = np.asarray(down)[:a.rank], np.asarray(up)[:, :a.rank]
            down16, up16 = np.asarray(down, np.float16), np.asarray(up, np.float16)
            if not (np.isfinite(down16).all() and np.isfinite(up16).all()):
                raise RouterFileError(f"{a.routers}: bypass {b} overflows float16")
            kept[b] = (down16, up16)
        save_router_file(a.output, dataclasses.replace(rf, bypasses=kept), force=a.force)
    except (RouterFileError, OSError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {a.output}: {len(kept)} adapters as float16; dropped (identity or not in --blocks): {dropped}", file=sys.stderr)


if __name__ == "__main__":
    main()
