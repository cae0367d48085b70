"""Write a LoRA adapter in llama.cpp's GGUF adapter format (what ``llama_adapter_lora_init`` loads).

Layout (llama.cpp src/llama-adapter.cpp): ``general.type = "adapter"``,
``adapter.type = "lora"``, ``adapter.lora.alpha``; per adapted weight
``blk.N.<tensor>.weight.lora_a`` (numpy [rank, n_in]) and ``.lora_b`` (numpy
[n_out, rank]); the runtime adds ``alpha / rank * B A x``.

Llama q/k weights are stored in GGUF with their rows permuted for llama.cpp's
rope layout (convert_hf_to_gguf's ``LlamaModel.permute``); a LoRA trained on
the Hugging Face layout gets the same row permutation on ``lora_b`` of
attn_q / attn_k, so B A stays aligned with the permuted base weight. Qwen2,
Qwen3 and Gemma 3 are converted without that permutation (their rope is
llama.cpp's NEOX layout, the Hugging Face one), so their B is written as is.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

import gguf

from .gguf_edit import GGUFEditError, atomic_output

# architectures whose upstream converter permutes the q/k rows (convert_hf_to_gguf's LlamaModel.permute)
ROPE_PERMUTED_ARCHS = frozenset({"llama"})


def rope_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of a q/k projection (or of its LoRA B) from the Hugging Face layout to llama.cpp's."""
    if w.shape[0] % (2 * n_head):
        raise ValueError(f"cannot rope-permute {w.shape[0]} rows over {n_head} heads")
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_lora_gguf(path: str | os.PathLike, pairs: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]], *,
                    alpha: float, n_head: int, n_head_kv: int, arch: str = "llama",
                    provenance: dict | None = None, outtype: str = "f32") -> Path:
    """pairs: (block, GGUF tensor name without ``.weight``) -> (A [rank, n_in], B [n_out, rank]), HF layout;
    ``arch``: the model's GGUF architecture (llama.cpp refuses an adapter of another one), which also decides
    whether q/k rows are rope-permuted (ROPE_PERMUTED_ARCHS)."""
    out = Path(path)
    if not out.parent.is_dir():
        raise GGUFEditError(f"output folder does not exist: {out.parent}")
    if outtype not in ("f32", "f16"):
        raise ValueError(f"outtype must be 'f32' or 'f16'; got {outtype!r}")
    if not pairs:
        raise ValueError("no LoRA tensors to write")
    ranks = {a.shape[0] for a, _ in pairs.values()}
    if len(ranks) != 1:
        raise ValueError(f"LoRA tensors of several ranks {sorted(ranks)}; one rank expected")
    dtype = np.float32 if outtype == "f32" else np.float16
    with atomic_output(out) as tmp:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        w.add_string("first.lora.scope", "decode")  # applied only to tokens decoded with blocks skipped
        if provenance is not None:
            w.add_string("first.lora.provenance", json.dumps(provenance, sort_keys=True, default=str))
        for (il, name) in sorted(pairs):
            a, b = (np.asarray(x, dtype=np.float32) for x in pairs[il, name])
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
                raise ValueError(f"blk.{il}.{name}: A {a.shape} and B {b.shape} are not a LoRA pair")
            if not (np.isfinite(a).all() and np.isfinite(b).all()):
                raise ValueError(f"blk.{il}.{name}: LoRA holds NaN or Inf")
            if name == "attn_q" and arch in ROPE_PERMUTED_ARCHS:
                b = rope_permute(b, n_head)
            elif name == "attn_k" and arch in ROPE_PERMUTED_ARCHS:
                b = rope_permute(b, n_head_kv)
            w.add_tensor(f"blk.{il}.{name}.weight.lora_a", np.ascontiguousarray(a.astype(dtype)))
            w.add_tensor(f"blk.{il}.{name}.weight.lora_b", np.ascontiguousarray(b.astype(dtype)))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out
