"""A router file from a training checkpoint (``OUTPUT.ckpt.pt``), to measure a run while it trains
(``first-gguf routers from-checkpoint``).

The checkpoint holds the routers, bypasses (and the optimiser state) of the last checkpointed step, not the
static rankings ``first-gguf train`` computes at the end: fingerprint and rankings are copied from ``like``
(a router file for the same model, e.g. the file the run started from), so ``router_mean`` /
``block_influence`` there describe the *old* routers; use the router strategy or a ranking from outside
(``attach --ranking``) when measuring such a file.

A run with ``--lora-rank`` also checkpoints its decode-only LoRA: ``lora_out`` (with ``model``, the base GGUF)
writes it as the llama.cpp adapter the run would write at its end (head counts and architecture from the
base); a checkpoint without one is refused. The checkpoint is read through first_gguf.train.checkpoint's
readers only.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import NamedTuple

from ..convert.router_file import RouterFileError, load_router_file, save_router_file
from .checkpoint import checkpoint_bypasses, checkpoint_lora, checkpoint_meta, checkpoint_routers, read_checkpoint


class FromCheckpoint(NamedTuple):
    path: Path               # the router file written
    step: int                # the checkpoint's step
    n_bypasses: int
    lora: Path | None        # the decode-only LoRA adapter written, if asked for
    lora_rank: int | None


def _lora_shape(model: str | os.PathLike) -> tuple[str, int, int]:
    """(architecture, n_head, n_head_kv) of the base GGUF ``model``; RouterFileError naming it otherwise."""
    import gguf

    from ..convert.gguf_edit import field_value

    try:
        reader = gguf.GGUFReader(model)
    except (OSError, ValueError) as e:
        raise RouterFileError(f"cannot read --model {model}: {e}") from None
    arch = field_value(reader, gguf.Keys.General.ARCHITECTURE)
    n_head = field_value(reader, gguf.Keys.Attention.HEAD_COUNT.format(arch=arch)) if arch else None
    if not arch or not n_head:
        raise RouterFileError(f"--model {model}: no general.architecture / attention.head_count (not a model GGUF?)")
    n_head_kv = field_value(reader, gguf.Keys.Attention.HEAD_COUNT_KV.format(arch=arch)) or n_head
    return str(arch), int(n_head), int(n_head_kv)


def router_file_from_checkpoint(checkpoint: str | os.PathLike, like: str | os.PathLike, output: str | os.PathLike,
                                *, lora_out: str | os.PathLike | None = None, model: str | os.PathLike | None = None,
                                force: bool = False) -> FromCheckpoint:
    """Write ``output``: the routers and bypasses of ``checkpoint`` with the fingerprint and static rankings of
    the router file ``like``; with ``lora_out``, also the checkpoint's decode-only LoRA as a llama.cpp adapter
    for the base GGUF ``model``. Everything is checked before anything is written; errors (RouterFileError or
    ValueError) name the file or option at fault."""
    if lora_out is not None and not model:
        raise RouterFileError("--lora-out needs --model BASE.gguf (the model the run trained on)")
    for p in (output, lora_out):
        if p is not None and Path(p).exists() and not force:
            raise RouterFileError(f"output file exists: {p}; pass force=True (--force) to overwrite")
    ref = load_router_file(like)
    state = read_checkpoint(checkpoint)  # a ValueError naming the file when it is not a training checkpoint
    meta = checkpoint_meta(state)
    w, b = checkpoint_routers(state)
    if w.shape != (ref.n_layer, ref.n_embd):
        raise RouterFileError(f"{checkpoint}: routers of shape {w.shape}; {like} is for {ref.n_layer} x {ref.n_embd} "
                              f"(a router file for the model the run trained on)")
    bypasses = checkpoint_bypasses(state)
    lora, shape = None, None
    if lora_out is not None:
        lora = checkpoint_lora(state)
        if lora is None:
            raise RouterFileError(f"{checkpoint} has no decode-only LoRA (the run had no --lora-rank)")
        shape = _lora_shape(model)
    prov = {"checkpoint": str(checkpoint), "step": meta["step"], "config": meta["config"],
            "loss_curve": [h for h in meta["history"] if h["step"] % 10 == 0],
            "static_rankings_from": str(like)}
    rf = dataclasses.replace(ref, weights={il: w[il] for il in range(ref.n_layer)},
                             biases={il: float(b[il]) for il in range(ref.n_layer)}, bypasses=bypasses,
                             provenance=prov)
    path = save_router_file(output, rf, force=force)
    lora_path, rank = None, None
    if lora is not None:
        from ..convert.lora_gguf import write_lora_gguf

        arch, n_head, n_head_kv = shape
        rank = int(next(iter(lora.values()))[0].shape[0])
        lora_path = write_lora_gguf(lora_out, lora, alpha=2.0 * rank, n_head=n_head, n_head_kv=n_head_kv, arch=arch,
                                    provenance={"checkpoint": str(checkpoint), "step": meta["step"], "rank": rank})
    return FromCheckpoint(path, meta["step"], len(bypasses), lora_path, rank)


__all__ = ["FromCheckpoint", "router_file_from_checkpoint"]
