"""A router file from a training checkpoint (``OUTPUT.ckpt.pt``), to measure a run while it trains.

    .venv/bin/python scripts/ckpt_routers.py runs/op1.ckpt.pt --like first_gguf/data/smollm2-135m-instruct.routers.safetensors \
        -o runs/op1-step100.safetensors
    first-gguf attach BASE.gguf runs/op1-step100.safetensors --ranking first_gguf/data/...static-ranking.json -o x.gguf

The checkpoint holds the routers, bypasses (and the optimiser state) of the last checkpointed step, not the
static rankings `first-gguf train` computes at the end: fingerprint and rankings are copied from ``--like``
(the file the run started from), so ``router_mean`` / ``block_influence`` there describe the *old* routers;
use the router strategy or a ranking from outside (`--ranking`) when measuring such a file.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="OUTPUT.ckpt.pt written by first-gguf train")
    ap.add_argument("--like", required=True, help="router file for the same model (fingerprint, rankings)")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--force", action="store_true", help="overwrite OUTPUT")
    a = ap.parse_args()

    import torch

    from first_gguf.convert.router_file import RouterFileError, load_router_file, save_router_file

    try:
        like = load_router_file(a.like)
        try:
            st = torch.load(a.checkpoint, weights_only=False)
        except (OSError, RuntimeError, EOFError) as e:
            raise RouterFileError(f"cannot read checkpoint {a.checkpoint}: {e}") from None
        if not isinstance(st, dict) or "weight" not in st or "step" not in st:
            raise RouterFileError(f"{a.checkpoint} is not a first-gguf training checkpoint (no 'weight'/'step')")
        w, b = st["weight"].float().numpy(), st["bias"].float().numpy()
        if w.shape != (like.n_layer, like.n_embd):
            raise RouterFileError(f"{a.checkpoint}: routers {w.shape}; {a.like} is for {like.n_layer} x {like.n_embd}")
        bypasses = {}
        if "bypass_down" in st:
            down, up = st["bypass_down"].float().numpy(), st["bypass_up"].float().numpy()
            bypasses = {il: (down[il], up[il]) for il in range(like.n_layer)}
        prov = {"checkpoint": a.checkpoint, "step": int(st["step"]), "config": st.get("config"),
                "loss_curve": [h for h in st.get("history", []) if h["step"] % 10 == 0],
                "static_rankings_from": a.like}
        rf = dataclasses.replace(like, weights={il: w[il] for il in range(like.n_layer)},
                                 biases={il: float(b[il]) for il in range(like.n_layer)}, bypasses=bypasses,
                                 provenance=prov)
        save_router_file(a.output, rf, force=a.force)
    except (RouterFileError, OSError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {a.output}: step {st['step']}, {len(bypasses)} bypasses", file=sys.stderr)


if __name__ == "__main__":
    main()
