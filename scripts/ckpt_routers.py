"""A router file from a training checkpoint (``OUTPUT.ckpt.pt``), to measure a run while it trains.

    .venv/bin/python scripts/ckpt_routers.py runs/op1.ckpt.pt --like first_gguf/data/smollm2-135m-instruct.routers.safetensors \
        -o runs/op1-step100.safetensors
    first-gguf attach BASE.gguf runs/op1-step100.safetensors --ranking first_gguf/data/...static-ranking.json -o x.gguf

The checkpoint holds the routers, bypasses (and the optimiser state) of the last checkpointed step, not the
static rankings `first-gguf train` computes at the end: fingerprint and rankings are copied from ``--like``
(the file the run started from), so ``router_mean`` / ``block_influence`` there describe the *old* routers;
use the router strategy or a ranking from outside (`--ranking`) when measuring such a file.

A run with ``--lora-rank`` also checkpoints its decode-only LoRA: ``--lora-out X.lora.gguf --model BASE.gguf``
writes it as the llama.cpp adapter the run would write at its end (head counts and architecture from BASE);
a checkpoint without one is refused.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys



def check_lora_args(st: dict, a) -> tuple[str, int, int]:
    """Refuse --lora-out before anything is written; (architecture, n_head, n_head_kv) of --model."""
    from pathlib import Path

    import gguf

    from first_gguf.convert.gguf_edit import field_value
    from first_gguf.convert.router_file import RouterFileError
    from first_gguf.train.checkpoint import checkpoint_lora

    if not a.model:
        raise RouterFileError("--lora-out needs --model BASE.gguf (the model the run trained on)")
    if checkpoint_lora(st) is None:
        raise RouterFileError(f"{a.checkpoint} has no decode-only LoRA (the run had no --lora-rank)")
    if Path(a.lora_out).exists() and not a.force:
        raise RouterFileError(f"{a.lora_out} exists; pass --force to overwrite")
    try:
        reader = gguf.GGUFReader(a.model)
    except (OSError, ValueError) as e:
        raise RouterFileError(f"cannot read --model {a.model}: {e}") from None
    arch = field_value(reader, gguf.Keys.General.ARCHITECTURE)
    n_head = field_value(reader, gguf.Keys.Attention.HEAD_COUNT.format(arch=arch))
    if not arch or not n_head:
        raise RouterFileError(f"{a.model}: no general.architecture / attention.head_count (not a model GGUF?)")
    n_head_kv = field_value(reader, gguf.Keys.Attention.HEAD_COUNT_KV.format(arch=arch)) or n_head
    return str(arch), int(n_head), int(n_head_kv)


def write_checkpoint_lora(st: dict, a, arch: str, n_head: int, n_head_kv: int) -> None:
    """The checkpoint's decode-only LoRA (first_gguf.train.checkpoint.checkpoint_lora) as a llama.cpp adapter,
    with DecodeLora's alpha (2 x rank)."""
    from first_gguf.convert.lora_gguf import write_lora_gguf
    from first_gguf.train.checkpoint import checkpoint_lora, checkpoint_meta

    pairs = checkpoint_lora(st)
    rank = next(iter(pairs.values()))[0].shape[0]
    write_lora_gguf(a.lora_out, pairs, alpha=2.0 * rank, n_head=n_head, n_head_kv=n_head_kv, arch=arch,
                    provenance={"checkpoint": a.checkpoint, "step": checkpoint_meta(st)["step"], "rank": rank})
    print(f"wrote {a.lora_out}: rank {rank}, {len(pairs)} LoRA pairs", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="OUTPUT.ckpt.pt written by first-gguf train")
    ap.add_argument("--like", required=True, help="router file for the same model (fingerprint, rankings)")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--force", action="store_true", help="overwrite OUTPUT")
    ap.add_argument("--lora-out", help="also write the checkpoint's decode-only LoRA (llama.cpp adapter GGUF)")
    ap.add_argument("--model", help="the base GGUF (head counts, architecture); needed with --lora-out")
    a = ap.parse_args()

    from first_gguf.convert.router_file import RouterFileError, load_router_file, save_router_file
    from first_gguf.train.checkpoint import checkpoint_bypasses, checkpoint_meta, checkpoint_routers, read_checkpoint

    try:
        like = load_router_file(a.like)
        st = read_checkpoint(a.checkpoint)  # a ValueError naming the file when it is not a training checkpoint
        meta = checkpoint_meta(st)
        w, b = checkpoint_routers(st)
        if w.shape != (like.n_layer, like.n_embd):
            raise RouterFileError(f"{a.checkpoint}: routers {w.shape}; {a.like} is for {like.n_layer} x {like.n_embd}")
        bypasses = checkpoint_bypasses(st)
        prov = {"checkpoint": a.checkpoint, "step": meta["step"], "config": meta["config"],
                "loss_curve": [h for h in meta["history"] if h["step"] % 10 == 0],
                "static_rankings_from": a.like}
        rf = dataclasses.replace(like, weights={il: w[il] for il in range(like.n_layer)},
                                 biases={il: float(b[il]) for il in range(like.n_layer)}, bypasses=bypasses,
                                 provenance=prov)
        shape = check_lora_args(st, a) if a.lora_out else None
        save_router_file(a.output, rf, force=a.force)
        if shape is not None:
            write_checkpoint_lora(st, a, *shape)
    except (RouterFileError, OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {a.output}: step {meta['step']}, {len(bypasses)} bypasses", file=sys.stderr)


if __name__ == "__main__":
    main()
