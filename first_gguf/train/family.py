"""The frozen model and the facts of its family: loading a Hugging Face checkpoint or a GGUF (dequantized by
transformers), the Hugging Face model types and their llama.cpp architectures, norms that multiply by
1 + weight, sliding-window blocks; the model's device and bf16 autocast."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def load_frozen_model(path: str):
    """A frozen causal LM from a Hugging Face directory or a GGUF file (dequantized by transformers)."""
    import torch
    from transformers import AutoModelForCausalLM

    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, torch_dtype=torch.float32)
        model.hf_quantizer = None
    elif p.is_dir() and (p / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(str(p), torch_dtype=torch.float32)
    else:
        raise ValueError(f"model not found or not understood: {p}; expected a GGUF file or a Hugging Face "
                         f"checkpoint directory with config.json")
    gguf_architecture(model.config, source=p)  # refuses a family the layer-skip patch does not cover
    model.eval()
    for q in model.parameters():
        q.requires_grad_(False)
    return model


# Hugging Face model_type -> llama.cpp architecture (GGUF general.architecture); which of these the runtime
# supports is asked from the patched library (_lib.supported_architectures), not kept here
HF_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3"}
# architectures whose RMSNorms multiply by 1 + weight (the converter stores 1 + weight in the GGUF)
NORM_PLUS_ONE = frozenset({"gemma3"})
# architectures whose llama.cpp builder has sliding-window blocks (config.layer_types "sliding_attention")
SLIDING_WINDOW_ARCHS = frozenset({"gemma3"})


def gguf_architecture(config, source="model") -> str:
    """The llama.cpp architecture of a transformers config; a ValueError naming the family and the supported
    ones when the layer-skip runtime does not cover it."""
    try:
        from .. import _lib

        supported = _lib.supported_architectures()
    except ImportError:  # training needs only torch: without the runtime (e.g. the GPU machine), the families
        supported = tuple(sorted(set(HF_MODEL_TYPES.values())))  # it covered when this was written
    arch = HF_MODEL_TYPES.get(config.model_type)
    if arch is None or arch not in supported:
        known = sorted(t for t, a in HF_MODEL_TYPES.items() if a in supported)
        raise ValueError(f"{source}: model type {config.model_type!r} is not supported for router training; "
                         f"supported model types: {', '.join(known)} (llama.cpp architectures "
                         f"{', '.join(supported)})")
    return arch


def gguf_norm_weight(model, norm) -> "np.ndarray":
    """What an RMSNorm multiplies by, as the GGUF stores it (Gemma: 1 + weight), float32."""
    w = norm.weight.detach().float().cpu().numpy()
    return (1.0 + w).astype(np.float32) if gguf_architecture(model.config) in NORM_PLUS_ONE else w


def _device(model) -> "torch.device":
    return next(model.parameters()).device


def _autocast(device, enabled: bool):
    """bf16 autocast for the blocks on ``device`` (a torch.device or a tensor's device)."""
    import torch

    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=enabled)


def _layers(model):
    return model.model


def _layer_windows(model) -> list[int | None]:
    """Per block: its attention window (Gemma 3's sliding-window blocks), or None for full attention. The
    same rule as llama.cpp's SWA mask: position q sees k when q - k < window. Only for the architectures
    whose llama.cpp builder has sliding-window blocks (SLIDING_WINDOW_ARCHS): llama.cpp's qwen2 attends
    to every position even where a config sets use_sliding_window, and training follows the runtime."""
    cfg = _layers(model).config
    if gguf_architecture(cfg) not in SLIDING_WINDOW_ARCHS:
        return [None] * cfg.num_hidden_layers
    return [cfg.sliding_window if t == "sliding_attention" else None for t in _layer_types(cfg)]


def _layer_types(cfg) -> list[str]:
    """Per block: its attention type from the config (``layer_types``; full attention where a config has none)."""
    L = cfg.num_hidden_layers
    return list((getattr(cfg, "layer_types", None) or ["full_attention"] * L)[:L])
