"""The router file: what training writes and the converter consumes.

A safetensors file with one tensor per routed block and a JSON header
(safetensors ``__metadata__``, str -> str):

    router.<N>.weight   F32 [n_embd]       block N's router weight
    router.<N>.bias     F32 [1]            optional
    bypass.<N>.down     F32/F16 [rank, n_embd] optional bypass adapter of block N (with .up)
    bypass.<N>.up       F32/F16 [n_embd, rank]
    __metadata__:
      format            "first-gguf-routers"
      version           "1"
      n_layer, n_embd, n_out               shapes of the base model / routers
      blocks            JSON list of the routed blocks (every listed block must have its tensor;
                        unlisted blocks have no router and are never skipped by the router strategy)
      definition        constants.ROUTER_DEFINITION (the runtime's)
      bypass_rank       rank of the bypasses ("0": none); bypass_definition: constants.BYPASS_DEFINITION
      fingerprint       JSON: base model architecture, shapes, sha256 of a reference tensor
      static_rankings   JSON: {name: {"ranking": [...], ...provenance}} (optional; checked by
                        ranking_file.check_ranking)
      provenance        JSON: command, data, seed, ... (optional)

The fingerprint's reference tensor is the final norm (``output_norm.weight`` in
GGUF, ``model.norm.weight`` in Hugging Face checkpoints) as float32: norms are
never quantized, so a float checkpoint and its quantized GGUFs share it.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..constants import BYPASS_DEFINITION, ROUTER_DEFINITION
from .ranking_file import RankingError, check_ranking

FORMAT = "first-gguf-routers"
VERSION = "1"
REF_TENSOR_GGUF = "output_norm.weight"


class RouterFileError(ValueError):
    """The router file is missing, corrupt or does not fit; the message names the file."""


@dataclass
class RouterFile:
    n_layer: int
    n_embd: int
    weights: dict[int, np.ndarray]               # block -> F32 [n_embd]
    biases: dict[int, float] = field(default_factory=dict)
    fingerprint: dict = field(default_factory=dict)
    static_rankings: dict[str, dict] = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    definition: str = ROUTER_DEFINITION
    n_out: int = 1
    bypasses: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # block -> (down, up)

    @property
    def bypass_rank(self) -> int:
        return int(next(iter(self.bypasses.values()))[0].shape[0]) if self.bypasses else 0

    def routers(self) -> dict[int, tuple[np.ndarray, float | None]]:
        return {b: (w, self.biases.get(b)) for b, w in sorted(self.weights.items())}


def fingerprint_from_arrays(architecture: str, n_layer: int, n_embd: int, n_vocab: int, ref: np.ndarray) -> dict:
    ref = np.ascontiguousarray(np.asarray(ref, dtype=np.float32).reshape(-1))
    return {"architecture": architecture, "n_layer": int(n_layer), "n_embd": int(n_embd), "n_vocab": int(n_vocab),
            "ref_tensor": REF_TENSOR_GGUF, "ref_sha256": hashlib.sha256(ref.tobytes()).hexdigest()}


def fingerprint_gguf(path: str | os.PathLike) -> dict:
    import gguf
    from gguf.quants import dequantize

    from .gguf_edit import field_value, read_gguf

    r = read_gguf(path)
    arch = field_value(r, gguf.Keys.General.ARCHITECTURE)
    n_layer = field_value(r, gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch))
    n_embd = field_value(r, gguf.Keys.LLM.EMBEDDING_LENGTH.format(arch=arch))
    toks = r.get_field(gguf.Keys.Tokenizer.LIST)
    n_vocab = len(toks.data) if toks is not None else field_value(r, gguf.Keys.LLM.VOCAB_SIZE.format(arch=arch))
    t = next((t for t in r.tensors if t.name == REF_TENSOR_GGUF), None)
    if t is None:
        raise RouterFileError(f"{path}: no {REF_TENSOR_GGUF} tensor to fingerprint")
    ref = dequantize(t.data, t.tensor_type)
    return fingerprint_from_arrays(str(arch), int(n_layer), int(n_embd), int(n_vocab or 0), ref)


def compare_fingerprints(expected: dict, got: dict, *, made_for: str = "routers were trained for") -> list[str]:
    """Differences between a router file's (or sidecar's) fingerprint and a model's, as readable lines."""
    out = []
    for key in ("architecture", "n_layer", "n_embd", "n_vocab", "ref_sha256"):
        if key in expected and expected[key] != got.get(key):
            out.append(f"{key}: {made_for} {expected[key]!r}, the model has {got.get(key)!r}")
    return out


def save_router_file(path: str | os.PathLike, rf: RouterFile, *, force: bool = False) -> Path:
    from safetensors.numpy import save_file

    p = Path(path)
    if p.exists() and not force:
        raise RouterFileError(f"output file exists: {p}; pass force=True (--force) to overwrite")
    _validate(rf, p)
    tensors = {f"router.{b}.weight": np.ascontiguousarray(w, dtype=np.float32) for b, w in rf.weights.items()}
    tensors.update({f"router.{b}.bias": np.asarray([v], dtype=np.float32) for b, v in rf.biases.items()})
    for b, (down, up) in rf.bypasses.items():  # float16 stays float16 (the shipped file), anything else float32
        dt = np.float16 if np.asarray(down).dtype == np.float16 else np.float32
        tensors[f"bypass.{b}.down"] = np.ascontiguousarray(down, dtype=dt)
        tensors[f"bypass.{b}.up"] = np.ascontiguousarray(up, dtype=dt)
    meta = {
        "format": FORMAT, "version": VERSION,
        "n_layer": str(rf.n_layer), "n_embd": str(rf.n_embd), "n_out": str(rf.n_out),
        "blocks": json.dumps(sorted(rf.weights)),
        "definition": rf.definition,
        "fingerprint": json.dumps(rf.fingerprint, sort_keys=True),
        "static_rankings": json.dumps(rf.static_rankings, sort_keys=True),
        "provenance": json.dumps(rf.provenance, sort_keys=True),
        "bypass_rank": str(rf.bypass_rank),
    }
    if rf.bypasses:
        meta["bypass_definition"] = BYPASS_DEFINITION
    from .gguf_edit import atomic_output

    with atomic_output(p) as tmp:
        save_file(tensors, tmp, metadata=meta)
    return p


def _validate(rf: RouterFile, p: Path) -> None:
    errors = []
    if rf.n_out != 1:
        errors.append(f"n_out is {rf.n_out}; the runtime supports 1")
    if not rf.weights:
        errors.append("no router weights")
    for b, w in rf.weights.items():
        if not 0 <= b < rf.n_layer:
            errors.append(f"router.{b}.weight: block {b} outside 0..{rf.n_layer - 1}")
        w = np.asarray(w)
        if w.shape != (rf.n_embd,):
            errors.append(f"router.{b}.weight has shape {tuple(w.shape)}; expected ({rf.n_embd},)")
        elif not np.all(np.isfinite(w)):
            errors.append(f"router.{b}.weight holds NaN or Inf")
    for b, v in rf.biases.items():
        if b not in rf.weights:
            errors.append(f"router.{b}.bias has no matching router.{b}.weight")
        elif not np.isfinite(v):
            errors.append(f"router.{b}.bias is {v}")
    rank = rf.bypass_rank
    for b, (down, up) in rf.bypasses.items():
        down, up = np.asarray(down), np.asarray(up)
        if not 0 <= b < rf.n_layer:
            errors.append(f"bypass.{b}: block {b} outside 0..{rf.n_layer - 1}")
        elif down.shape != (rank, rf.n_embd) or up.shape != (rf.n_embd, rank):
            errors.append(f"bypass.{b}.down/up have shapes {down.shape}/{up.shape}; expected ({rank}, {rf.n_embd}) and "
                          f"({rf.n_embd}, {rank}) (one rank for every block)")
        elif not (np.all(np.isfinite(down)) and np.all(np.isfinite(up))):
            errors.append(f"bypass.{b} holds NaN or Inf")
    for name, r in rf.static_rankings.items():
        try:
            check_ranking(r, f"static ranking {name!r}", n_layer=rf.n_layer)
        except RankingError as e:
            errors.append(str(e))
    if errors:
        raise RouterFileError(f"{p}: invalid router file:\n  " + "\n  ".join(errors))


def load_router_file(path: str | os.PathLike) -> RouterFile:
    from safetensors import SafetensorError
    from safetensors.numpy import safe_open

    p = Path(path)
    if not p.is_file():
        raise RouterFileError(f"router file not found: {p}")
    try:
        with safe_open(str(p), framework="np") as f:
            meta = f.metadata() or {}
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise RouterFileError(f"corrupt or truncated safetensors file: {p}: {e}") from None
    if meta.get("format") != FORMAT:
        raise RouterFileError(f"{p}: not a first-gguf router file (metadata format={meta.get('format')!r}, "
                              f"expected {FORMAT!r})")
    if meta.get("version") != VERSION:
        raise RouterFileError(f"{p}: router file version {meta.get('version')!r}; this first-gguf reads {VERSION!r}")
    try:
        n_layer, n_embd, n_out = int(meta["n_layer"]), int(meta["n_embd"]), int(meta.get("n_out", "1"))
        fp = json.loads(meta.get("fingerprint") or "{}")
        ranks = json.loads(meta.get("static_rankings") or "{}")
        prov = json.loads(meta.get("provenance") or "{}")
        blocks = json.loads(meta["blocks"])
    except (KeyError, ValueError) as e:
        raise RouterFileError(f"{p}: malformed metadata: {e}") from None
    if meta.get("definition") != ROUTER_DEFINITION:
        raise RouterFileError(f"{p}: routers use definition {meta.get('definition')!r}; "
                              f"the runtime's is {ROUTER_DEFINITION!r}")
    weights, biases, errors = {}, {}, []
    downs, ups = {}, {}
    if any(k.startswith("bypass.") for k in arrays) and meta.get("bypass_definition") != BYPASS_DEFINITION:
        raise RouterFileError(f"{p}: bypasses use definition {meta.get('bypass_definition')!r}; "
                              f"the runtime's is {BYPASS_DEFINITION!r}")
    for name, arr in arrays.items():
        parts = name.split(".")
        if len(parts) == 3 and parts[0] == "bypass" and parts[1].isdigit() and parts[2] in ("down", "up"):
            if arr.dtype not in (np.float32, np.float16) or arr.ndim != 2:
                errors.append(f"{name} has dtype {arr.dtype} and {arr.ndim} dims; expected a 2-D float32 or "
                              f"float16 matrix")
            else:
                (downs if parts[2] == "down" else ups)[int(parts[1])] = arr
            continue
        if len(parts) != 3 or parts[0] != "router" or not parts[1].isdigit() or parts[2] not in ("weight", "bias"):
            errors.append(f"unexpected tensor {name!r}")
            continue
        if arr.dtype != np.float32:
            errors.append(f"{name} has dtype {arr.dtype}; expected float32")
            continue
        if parts[2] == "weight":
            weights[int(parts[1])] = arr
        else:
            if arr.shape != (1,):
                errors.append(f"{name} has shape {arr.shape}; expected (1,)")
                continue
            biases[int(parts[1])] = float(arr[0])
    missing = sorted(set(blocks) - set(weights))
    if missing:
        errors.append(f"blocks {missing} are listed in the metadata but their router.N.weight tensors are missing")
    extra = sorted(set(weights) - set(blocks))
    if extra:
        errors.append(f"tensors for blocks {extra} are not listed in the metadata 'blocks'")
    if errors:
        raise RouterFileError(f"{p}: invalid router file:\n  " + "\n  ".join(errors))
    for b in sorted(set(downs) ^ set(ups)):
        errors.append(f"bypass.{b}: has {'down' if b in downs else 'up'} but not {'up' if b in downs else 'down'}")
    if errors:
        raise RouterFileError(f"{p}: invalid router file:\n  " + "\n  ".join(errors))
    rf = RouterFile(n_layer, n_embd, weights, biases, fp, ranks, prov, meta["definition"], n_out,
                    {b: (downs[b], ups[b]) for b in sorted(downs)})
    _validate(rf, p)
    return rf
