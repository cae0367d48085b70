"""What training learns: the routers (Routers), the bypass adapters (Bypasses) and the decode-only LoRA
(DecodeLora), with the runtime's definitions."""
from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING

from .family import _layers, gguf_architecture

if TYPE_CHECKING:
    import torch


def _params_to(obj, device):
    """Move an adapter object's parameters to ``device`` in place (the same Parameter objects: hooks and
    optimizer groups that hold them stay valid). Initialised on the CPU first, so every device starts from
    the same values for a seed."""
    for q in obj.parameters():
        q.data = q.data.to(device)
    return obj


class Routers:
    """Router parameters (fp32) and the runtime's router definition, in torch."""

    def __init__(self, n_layer: int, n_embd: int, seed: int = 0):
        import torch

        g = torch.Generator().manual_seed(seed)
        self.weight = torch.nn.Parameter(torch.randn(n_layer, n_embd, generator=g) * 0.02)
        self.bias = torch.nn.Parameter(torch.zeros(n_layer))

    def parameters(self):
        return [self.weight, self.bias]

    def to(self, device):
        return _params_to(self, device)

    def scores(self, normed: "torch.Tensor", prompt_mask: "torch.Tensor") -> "torch.Tensor":
        """normed [L, B, T, E] (attn-normed block inputs), prompt_mask [B, T] -> keep-scores [B, L]."""
        import torch

        logit = torch.einsum("lbte,le->lbt", normed.float(), self.weight) + self.bias[:, None, None]
        s = torch.sigmoid(logit) * prompt_mask[None].float()
        return (s.sum(-1) / prompt_mask.float().sum(-1)[None].clamp(min=1)).transpose(0, 1)


class Bypasses:
    """Per-block low-rank bypass h + U D rmsnorm(h) (fp32); the runtime's definition (constants.BYPASS_DEFINITION)."""

    def __init__(self, n_layer: int, n_embd: int, rank: int, eps: float, seed: int = 0):
        import torch

        g = torch.Generator().manual_seed(seed + 1)
        self.rank, self.eps = rank, eps
        self.down = torch.nn.Parameter(torch.randn(n_layer, rank, n_embd, generator=g) / math.sqrt(n_embd))
        self.up = torch.nn.Parameter(torch.zeros(n_layer, n_embd, rank))

    def parameters(self):
        return [self.down, self.up]

    def to(self, device):
        return _params_to(self, device)

    def delta(self, h: "torch.Tensor", il: int) -> "torch.Tensor":
        import torch

        x = h.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x @ self.down[il].t()) @ self.up[il].t()


LORA_TARGETS = {  # Hugging Face module -> GGUF tensor (blk.N.<name>.weight)
    "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
    "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
}


class DecodeLora:
    """A LoRA active only on positions that skip blocks (continuation tokens of a skipped pass), fp32.

    W x + (alpha / r) B A x on the linear layers of LORA_TARGETS in every block, where the mask set by
    ``active()`` is on; elsewhere (the prompt, the teacher pass, statics) the frozen model is untouched.
    That is the runtime's rule: the adapter is attached to the llama.cpp context only while a skip mask
    is set, i.e. for decoded / scored tokens after a full-depth prefill, never for the prompt.
    """

    def __init__(self, model, rank: int, seed: int = 0):
        import torch

        g = torch.Generator().manual_seed(seed + 2)
        self.rank, self.alpha = rank, float(2 * rank)
        self.scale = self.alpha / rank
        self.mask = None
        self.a: dict[tuple[int, str], torch.nn.Parameter] = {}
        self.b: dict[tuple[int, str], torch.nn.Parameter] = {}
        self._hooks = []
        core = _layers(model)
        for il, layer in enumerate(core.layers[: core.config.num_hidden_layers]):
            for name, mod in layer.named_modules():
                short = name.rsplit(".", 1)[-1]
                if short not in LORA_TARGETS or not isinstance(mod, torch.nn.Linear):
                    continue
                a = torch.nn.Parameter(torch.randn(rank, mod.in_features, generator=g) / math.sqrt(mod.in_features))
                b = torch.nn.Parameter(torch.zeros(mod.out_features, rank))
                self.a[il, short], self.b[il, short] = a, b
                self._hooks.append(mod.register_forward_hook(self._hook(a, b)))
        if not self.a:
            raise ValueError(f"decode-only LoRA: no linear layers named {sorted(LORA_TARGETS)} in the model")

    def _hook(self, a, b):
        def hook(mod, inp, out):
            if self.mask is None:
                return out
            d = (inp[0].float() @ a.t()) @ b.t() * self.scale
            return out + (self.mask * d).to(out.dtype)
        return hook

    @contextlib.contextmanager
    def active(self, mask):
        """mask [B, T, 1] (1: the position runs with the adapter)."""
        self.mask = mask.float()
        try:
            yield
        finally:
            self.mask = None

    def parameters(self):
        return [p for k in self.a for p in (self.a[k], self.b[k])]

    def to(self, device):
        return _params_to(self, device)

    def state_dict(self) -> dict:
        return {f"{il}.{n}.{ab}": t.detach().clone() for (il, n) in self.a
                for ab, t in (("a", self.a[il, n]), ("b", self.b[il, n]))}

    def load_state_dict(self, state: dict) -> None:
        import torch

        for (il, n) in self.a:
            self.a[il, n].data.copy_(state[f"{il}.{n}.a"].to(self.a[il, n].device, torch.float32))
            self.b[il, n].data.copy_(state[f"{il}.{n}.b"].to(self.b[il, n].device, torch.float32))

    def save_gguf(self, path, model, provenance: dict | None = None) -> None:
        """Write a llama.cpp LoRA adapter (general.type "adapter"), loadable by llama_adapter_lora_init."""
        from ..convert.lora_gguf import write_lora_gguf

        cfg = _layers(model).config
        pairs = {(il, LORA_TARGETS[n]): (self.a[il, n].detach().float().cpu().numpy(),
                                         self.b[il, n].detach().float().cpu().numpy())
                 for (il, n) in self.a}
        write_lora_gguf(path, pairs, alpha=self.alpha, n_head=cfg.num_attention_heads,
                        n_head_kv=cfg.num_key_value_heads, arch=gguf_architecture(cfg), provenance=provenance)
