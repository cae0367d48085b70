"""An independent torch reference for layer skipping: a transformers model's own forward, changed by forward
hooks only, never first_gguf.train (whose gated forward the tests check against the runtime too).

What it computes is the runtime's masked decode, teacher-forced: the prompt runs every block; every
continuation position passes the blocks in ``skip`` through, as the identity or, where ``bypasses`` has the
block, as its bypass adapter ``h + up @ down @ rmsnorm(h)`` (no norm weight; eps the model's
``rms_norm_eps``); with ``lora`` the decode-only LoRA adds ``scale * B @ A @ x`` to the named linear layers on
continuation positions only (the runtime attaches the adapter only while a skip mask is set, never for the
prompt). Everything else is the model's own forward: its dtype and attention implementation (test_archs
installs an F16-rounding one), Gemma 3's embedding scale and sliding windows, a final soft-capping.
Log-probs are taken in float64.

Used by test_hf_tiny, test_archs, test_bypass and test_decode_lora, e.g.::

    from torch_reference import skipped_logprobs
    ref = skipped_logprobs(model, PROMPT, CONT, skip=(1, 2), bypasses={il: (down, up), ...})
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch


def runtime_weight(a, dtype: str = "f32") -> torch.Tensor:
    """A float32 tensor of ``a`` as the runtime computes with it when stored as ``dtype`` ("f32" or "f16",
    the GGUF's storage: F16 values are rounded once and then used in float32)."""
    if dtype not in ("f32", "f16"):
        raise ValueError(f"dtype {dtype!r}: expected 'f32' or 'f16'")
    a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    a = a.astype(np.float16) if dtype == "f16" else a
    return torch.tensor(a.astype(np.float32))


def bypass_tensors(bypasses: Mapping[int, tuple], n_layer: int, dtype: str = "f32"):
    """``{block: (down [rank, n_embd], up [n_embd, rank])}`` for every block 0..n_layer-1 stacked into
    (down [n_layer, rank, n_embd], up [n_layer, n_embd, rank]) float32 tensors, rounded through F16 for
    ``dtype`` "f16"."""
    missing = [il for il in range(n_layer) if il not in bypasses]
    if missing:
        raise ValueError(f"no bypass for blocks {missing}")
    return (torch.stack([runtime_weight(bypasses[il][0], dtype) for il in range(n_layer)]),
            torch.stack([runtime_weight(bypasses[il][1], dtype) for il in range(n_layer)]))


def training_bypasses(bypasses: Mapping[int, tuple], n_layer: int, eps: float, dtype: str = "f32"):
    """The same adapters as a first_gguf.train ``Bypasses`` (what tests of the training forward pass to
    ``gated_forward`` / ``train``). The only use of first_gguf.train here, imported on call: the
    references below never use it."""
    from first_gguf.train import Bypasses

    down, up = bypass_tensors(bypasses, n_layer, dtype)
    bp = Bypasses(n_layer, down.shape[2], down.shape[1], eps=eps)
    bp.down.data, bp.up.data = down, up
    return bp


def _rmsnorm(h, eps):
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)


def _tensor(x) -> torch.Tensor:
    return x.detach().float() if isinstance(x, torch.Tensor) else torch.tensor(np.asarray(x, np.float32))


def skipped_forward(model, prompt: Sequence[int], cont: Sequence[int], *, skip=(),
                    bypasses: Mapping[int, tuple] | None = None, bypass_dtype: str = "f32",
                    lora: Mapping[tuple[int, str], tuple] | None = None, lora_scale: float = 1.0,
                    eps: float | None = None):
    """Log-probs of ``cont`` after ``prompt`` (float64, one per continuation token) and the model's hidden
    states (``output_hidden_states``: block inputs, then the last block's output normed), with the
    continuation skipping the blocks in ``skip``.

    model: a transformers causal LM (``model.model.layers``; Llama, Qwen2/3, Gemma 3).
    bypasses: ``{block: (down [rank, n_embd], up [n_embd, rank])}``; a skipped block with an entry passes
      ``h + up @ down @ rmsnorm(h)``, one without passes ``h``. ``bypass_dtype`` "f16": the weights rounded
      as an F16 GGUF stores them. ``eps``: the bypass norm's, default ``model.config.rms_norm_eps``.
    lora: ``{(block, linear layer's name, e.g. "q_proj"): (A [rank, in], B [out, rank])}`` (tensors or
      arrays); each such layer's output gains ``lora_scale * B @ A @ x`` on continuation positions.
    """
    ids = torch.tensor([list(prompt) + list(cont)])
    n = len(prompt)
    eps = model.config.rms_norm_eps if eps is None else eps
    layers = model.model.layers
    hooks = []

    def skip_hook(il):
        def hook(mod, args, kwargs, out):
            h_in = args[0] if args else kwargs["hidden_states"]
            o = (out[0] if isinstance(out, tuple) else out).clone()
            h = h_in[:, n:]
            if bypasses is not None and il in bypasses:
                down, up = (runtime_weight(a, bypass_dtype) for a in bypasses[il])
                hf = h.float()
                h = (hf + _rmsnorm(hf, eps) @ down.T @ up.T).to(h.dtype)
            o[:, n:] = h
            return (o,) + tuple(out[1:]) if isinstance(out, tuple) else o
        return hook

    def lora_hook(a, b):
        def hook(mod, args, out):
            d = (args[0].float() @ a.T) @ b.T * lora_scale
            d[:, :n] = 0  # the prompt runs without the adapter
            return out + d.to(out.dtype)
        return hook

    try:
        for (il, name), (a, b) in (lora or {}).items():
            mods = [m for path, m in layers[il].named_modules()
                    if path.rsplit(".", 1)[-1] == name and isinstance(m, torch.nn.Linear)]
            if len(mods) != 1:
                raise ValueError(f"LoRA target {name!r}: {len(mods)} linear layers of that name in block {il}")
            hooks.append(mods[0].register_forward_hook(lora_hook(_tensor(a), _tensor(b))))
        for il in sorted(set(skip)):
            hooks.append(layers[il].register_forward_hook(skip_hook(il), with_kwargs=True))
        with torch.no_grad():
            out = model(ids, output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    ls = torch.log_softmax(out.logits[0].double(), -1)
    return np.array([float(ls[n - 1 + i, t]) for i, t in enumerate(cont)]), out.hidden_states


def skipped_logprobs(model, prompt: Sequence[int], cont: Sequence[int], **kw) -> np.ndarray:
    """``skipped_forward``'s log-probs only (same keywords)."""
    return skipped_forward(model, prompt, cont, **kw)[0]
