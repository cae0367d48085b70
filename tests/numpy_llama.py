"""A plain numpy forward of a llama-architecture GGUF, independent of llama.cpp.

Weights are dequantized with gguf-py. Reference for masked decoding: prompt
tokens run every block; continuation tokens pass the blocks in ``skip``
through unchanged (their K/V in those blocks are never read, because every
later token of the sequence skips the same blocks and attention is causal).
"""
from __future__ import annotations

import gguf
import numpy as np
from gguf.quants import dequantize


class NumpyLlama:
    def __init__(self, path):
        r = gguf.GGUFReader(path)
        f = lambda k: r.get_field(k).contents()  # noqa: E731
        self.n_layer = int(f("llama.block_count"))
        self.n_head = int(f("llama.attention.head_count"))
        self.n_head_kv = int(f("llama.attention.head_count_kv"))
        self.eps = float(f("llama.attention.layer_norm_rms_epsilon"))
        fb = r.get_field("llama.rope.freq_base")
        self.freq_base = float(fb.contents()) if fb is not None else 10000.0
        self.w = {}
        for t in r.tensors:
            self.w[t.name] = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(
                [int(x) for x in reversed(t.shape)])
        self.n_embd = self.w["token_embd.weight"].shape[1]
        self.head_dim = self.n_embd // self.n_head

    def _norm(self, x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + self.eps) * w

    def _rope(self, x, pos):  # x [T, H, D], adjacent pairs (llama.cpp ROPE_TYPE_NORM)
        d = self.head_dim
        inv = self.freq_base ** (-np.arange(0, d, 2) / d)
        ang = pos[:, None] * inv[None, :]
        cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = x0 * cos - x1 * sin
        out[..., 1::2] = x0 * sin + x1 * cos
        return out

    def logits(self, tokens, n_prompt: int, skip=()) -> np.ndarray:
        w = self.w
        T = len(tokens)
        pos = np.arange(T, dtype=np.float64)
        h = w["token_embd.weight"][tokens].astype(np.float64)
        cont = np.arange(T) >= n_prompt
        mask = np.triu(np.full((T, T), -np.inf), 1)
        g = self.n_head // self.n_head_kv
        for il in range(self.n_layer):
            p = f"blk.{il}."
            x = self._norm(h, w[p + "attn_norm.weight"])
            q = (x @ w[p + "attn_q.weight"].T).reshape(T, self.n_head, self.head_dim)
            k = (x @ w[p + "attn_k.weight"].T).reshape(T, self.n_head_kv, self.head_dim)
            v = (x @ w[p + "attn_v.weight"].T).reshape(T, self.n_head_kv, self.head_dim)
            q, k = self._rope(q, pos), self._rope(k, pos)
            k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
            att = np.einsum("thd,shd->hts", q, k) / np.sqrt(self.head_dim) + mask
            att = np.exp(att - att.max(-1, keepdims=True))
            att /= att.sum(-1, keepdims=True)
            o = np.einsum("hts,shd->thd", att, v).reshape(T, -1) @ w[p + "attn_output.weight"].T
            h2 = h + o
            x2 = self._norm(h2, w[p + "ffn_norm.weight"])
            gate = x2 @ w[p + "ffn_gate.weight"].T
            up = x2 @ w[p + "ffn_up.weight"].T
            out = h2 + ((gate / (1 + np.exp(-gate))) * up) @ w[p + "ffn_down.weight"].T
            if il in skip:
                out[cont] = h[cont]
            h = out
        h = self._norm(h, w["output_norm.weight"])
        head = w.get("output.weight", w["token_embd.weight"])
        return h @ head.T

    def continuation_logprobs(self, prompt_tokens, cont_tokens, skip=()) -> np.ndarray:
        toks = list(prompt_tokens) + list(cont_tokens)
        lg = self.logits(toks, len(prompt_tokens), skip)
        lg = lg - lg.max(-1, keepdims=True)
        ls = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
        n = len(prompt_tokens)
        return np.array([ls[n - 1 + i, t] for i, t in enumerate(cont_tokens)])
