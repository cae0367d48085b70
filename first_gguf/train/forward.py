"""The decoder in torch, as the runtime runs it: ``gated_forward`` (per-sequence block gates on continuation
positions, bypasses), the routers' input, and the KV-cached sampler of on-policy training
(``sample_prefill``, ``prefix_forward``, ``sample_decode``: a block runs only for the rows that keep it)."""
from __future__ import annotations

import contextlib
import inspect
from typing import Sequence

from .family import _autocast, _device, _layer_types, _layer_windows, _layers
from .parts import Bypasses, DecodeLora


def _block_rope(model, h, pos) -> list:
    """Per block: its rotary (cos, sin) tables for positions ``pos``; one table per attention type where the
    family has several rope bases (Gemma 3: local 1e4, global 1e6), else one table for every block."""
    core = _layers(model)
    L = core.config.num_hidden_layers
    if "layer_type" not in inspect.signature(core.rotary_emb.forward).parameters:
        return [core.rotary_emb(h, position_ids=pos)] * L
    types = _layer_types(core.config)
    tables = {t: core.rotary_emb(h, pos, t) for t in set(types)}
    return [tables[t] for t in types]


def _head(model, x):
    """Output logits of final-normed hidden states, with the final logit soft-capping where the config has one
    (as transformers and llama.cpp apply it)."""
    import torch

    head = model.get_output_embeddings()
    with torch.autocast(x.device.type, enabled=False):  # fp32 logits: bf16 rounds log-probs by up to ~0.06
        logits = head(x.to(torch.promote_types(head.weight.dtype, torch.float32)))
    cap = getattr(_layers(model).config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def _cont_positions(n_prompt, T):
    """[B, T, 1]: True at continuation positions (those that skip blocks; the prompt runs at full depth)."""
    import torch

    return (torch.arange(T, device=n_prompt.device)[None, :] >= n_prompt[:, None])[..., None]


def gated_forward(model, ids, n_prompt, gates=None, *, capture=False, bypass: Bypasses | None = None):
    """Forward with per-sequence block gates on continuation positions.

    ids [B, T]; n_prompt [B]; gates [B, L] (None: full depth). Positions t >= n_prompt[b]
    pass block l as h + g (block(h) - h) (+ (1 - g) U D rmsnorm(h) with bypasses); prompt positions run every
    block.
    Returns (final hidden states after the output norm [B, T, E], list of block inputs if capture).
    """
    import torch
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    core = _layers(model)
    h = core.embed_tokens(ids)
    pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
    kw = dict(config=core.config, inputs_embeds=h, attention_mask=None, past_key_values=None, position_ids=pos)
    windows = _layer_windows(model)
    full = create_causal_mask(**kw)
    sliding = create_sliding_window_causal_mask(**kw) if any(w is not None for w in windows) else None
    pe = _block_rope(model, h, pos)
    cont = _cont_positions(n_prompt, ids.shape[1])
    inputs = []
    for il, layer in enumerate(core.layers[: core.config.num_hidden_layers]):
        if capture:
            inputs.append(h)
        out = layer(h, attention_mask=full if windows[il] is None else sliding, position_embeddings=pe[il],
                    position_ids=pos)
        if isinstance(out, tuple):
            out = out[0]
        if gates is not None:
            g = gates[:, il][:, None, None].to(out.dtype)
            skipped = h if bypass is None else h + (1 - g) * bypass.delta(h, il).to(h.dtype)
            out = torch.where(cont, skipped + g * (out - h), out)
        h = out
    if capture:
        inputs.append(h)  # final pre-norm state (output of the last block)
    return core.norm(h), inputs


def attn_normed(model, inputs):
    """RMSNorm_attn of every block input: the routers' input, [L, B, T, E]."""
    import torch

    core = _layers(model)
    return torch.stack([core.layers[il].input_layernorm(inputs[il].float())
                        for il in range(core.config.num_hidden_layers)])


def choose_gates(scores, k, temperature: float):
    """Hard skip of the k lowest scores per row (straight-through soft gates). scores [B, L], k [B]."""
    import torch

    B, L = scores.shape
    order = torch.argsort(scores.detach(), dim=1)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(L, device=scores.device).expand(B, L))
    hard = (rank >= k[:, None]).float()
    srt = torch.gather(scores.detach(), 1, order)
    lo = torch.gather(srt, 1, (k - 1).clamp(min=0)[:, None])
    hi = torch.gather(srt, 1, k.clamp(max=L - 1)[:, None])
    tau = (lo + hi) / 2
    temp = temperature * (scores.detach().std(dim=1, keepdim=True) + 1e-4)
    soft = torch.sigmoid((scores - tau) / temp)
    return hard + (soft - soft.detach()), hard  # forward value exactly the hard gate


def _cache_masks(model, valid, q_len: int) -> list:
    """Per block: the attention mask for ``q_len`` new query positions, the last ``q_len`` of the keys
    ``valid`` [B, K] (False: left padding). Causal among the new positions, and within a sliding-window
    block's window (``_layer_windows``; left padding is contiguous, so index distance = position distance);
    a padding query sees only itself (its output is never used; an all-masked row would give NaN).
    Boolean for SDPA, additive for other attention implementations."""
    import torch

    B, K = valid.shape
    dev = valid.device
    k_idx = torch.arange(K, device=dev)
    q_abs = torch.arange(K - q_len, K, device=dev)
    causal = valid[:, None, None, :] & (k_idx[None, None, None, :] <= q_abs[None, None, :, None])
    itself = (k_idx[None, :] == q_abs[:, None])[None, None]
    sdpa = _layers(model).config._attn_implementation == "sdpa"
    made = {}
    out = []
    for w in _layer_windows(model):
        if w not in made:
            m = causal if w is None else causal & (q_abs[None, None, :, None] - k_idx[None, None, None, :] < w)
            m = m | itself
            made[w] = m if sdpa else torch.zeros(m.shape, device=dev).masked_fill(~m, torch.finfo(torch.float32).min)
        out.append(made[w])
    return out


class _KV:
    """What a transformers attention layer calls ``update(keys, values, layer_idx)`` on (a duck-typed Cache),
    for one block and the rows that run it: ``fn(new_keys, new_values) -> (all keys, all values)``."""

    __slots__ = ("fn",)

    def __init__(self, fn):
        self.fn = fn

    def update(self, key_states, value_states, layer_idx=None, *args, **kwargs):
        return self.fn(key_states, value_states)


def _row_plan(keep, L: int) -> list:
    """Per block, the rows of a batch that run it, from ``keep`` [B, L] (bool; None: every row runs every
    block): None (every row), a LongTensor of row indices on keep's device, or [] (no row: not run at all).
    Computed once per pass / decode on the CPU, so the blocks need no device round trip."""
    if keep is None:
        return [None] * L
    kc = keep.detach().cpu()
    out = []
    for il in range(L):
        col = kc[:, il]
        if bool(col.all()):
            out.append(None)
        elif not bool(col.any()):
            out.append([])
        else:
            out.append(col.nonzero()[:, 0].to(keep.device))
    return out


def _rows(x, r):
    """Rows ``r`` (a _row_plan entry) of a batch-first tensor, a (cos, sin) pair, or x itself for every row."""
    if r is None:
        return x
    if isinstance(x, tuple):
        return tuple(_rows(t, r) for t in x)
    return x.index_select(0, r)


def _cached_blocks(model, h, plan, *, masks, pos, pe, kv, bypass: Bypasses | None, layers=None):
    """The blocks over new positions ``h`` [B, C, E] with cached keys (``masks``, ``pe``: per block; ``kv(il, rows)``:
    the block's _KV for those rows). ``plan``: _row_plan. A block runs only for the rows that keep it (the others'
    keys and values of the new positions are never read: a row skips the same blocks at every new position); a
    skipped row passes h (+ its bypass), as in the runtime. A block every row skips is not run at all.
    ``layers``: callables in place of the model's blocks (compile_decode's)."""
    core = _layers(model)
    for il, layer in enumerate(layers or core.layers[: core.config.num_hidden_layers]):
        r = plan[il]
        if r is not None:  # some rows skip: they pass h (+ bypass)
            base = h if bypass is None else h + bypass.delta(h, il).to(h.dtype)
            if isinstance(r, list):  # no row runs the block
                h = base
                continue
        o = layer(_rows(h, r), attention_mask=_rows(masks[il], r), position_ids=_rows(pos, r),
                  past_key_values=kv(il, r), use_cache=True, position_embeddings=_rows(pe[il], r))
        if isinstance(o, tuple):
            o = o[0]
        h = o if r is None else base.index_copy(0, r, o.to(base.dtype))
    return h


def _stop_ids(model) -> set[int]:
    ids = set()
    for src in (model.config, getattr(model, "generation_config", None)):
        e = getattr(src, "eos_token_id", None)
        ids |= set(e) if isinstance(e, (list, tuple)) else ({e} if isinstance(e, int) else set())
    return ids


def eog_token_ids(model_path: str) -> set[int]:
    """The tokens that end a generation in the runtime (llama.cpp's ``llama_vocab_is_eog``) for a GGUF;
    for a Hugging Face checkpoint, the tokenizer's and config's end-of-sequence ids. Without the runtime
    (the GPU machine), a GGUF's eos / eot / eom token ids from its metadata."""
    if str(model_path).endswith(".gguf"):
        try:
            import llama_cpp  # noqa: F401  (the runtime: absent on the GPU machine)

            from .. import load
        except ImportError:
            import gguf

            r = gguf.GGUFReader(str(model_path))
            out = set()
            for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
                f = r.fields.get(key)
                if f is not None:
                    out.add(int(f.parts[f.data[0]][0]))
            return out
        with load(model_path, n_ctx=64) as m:
            return m.eog_tokens()
    from transformers import AutoConfig, AutoTokenizer

    out = set()
    try:
        tok = AutoTokenizer.from_pretrained(model_path)
        out |= {tok.eos_token_id} if tok.eos_token_id is not None else set()
    except (OSError, ValueError):
        pass
    e = getattr(AutoConfig.from_pretrained(model_path), "eos_token_id", None)
    return out | (set(e) if isinstance(e, (list, tuple)) else ({e} if isinstance(e, int) else set()))


def sample_prefill(model, prompts: Sequence[Sequence[int]], *, pad: int, bf16: bool = True) -> dict:
    """Full-depth prefill of a left-padded batch of prompts with a KV cache (no grad), on the model's device:
    the sampler's state, with the routers' input (attn-normed block inputs [L, B, P, E]) and the prompt mask
    ``valid`` [B, P]. The cached keys / values (``kv``: per block) are only read afterwards."""
    import torch

    core = _layers(model)
    dev = _device(model)
    L = core.config.num_hidden_layers
    B, P = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, P), pad, dtype=torch.long)
    valid = torch.zeros((B, P), dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(list(p))
        valid[i, P - len(p):] = True
    ids, valid = ids.to(dev), valid.to(dev)
    pos = (valid.long().cumsum(1) - 1).clamp(min=0)  # every prompt starts at position 0, as in the runtime
    # every block keeps all its keys (no sliding-window cache that drops old ones), so the masks of
    # _cache_masks index the same K columns in every block
    kv = []

    def keep(k, v):
        kv.append((k, v))
        return k, v

    with torch.no_grad(), _autocast(dev, bf16):
        h = core.embed_tokens(ids)
        pe, masks = _block_rope(model, h, pos), _cache_masks(model, valid, P)
        inputs = []
        for il, layer in enumerate(core.layers[:L]):
            inputs.append(h)
            h = layer(h, attention_mask=masks[il], position_ids=pos, past_key_values=_KV(keep), use_cache=True,
                      position_embeddings=pe[il])
            if isinstance(h, tuple):
                h = h[0]
        normed = attn_normed(model, inputs)
        logits = _head(model, core.norm(h[:, -1:])).float()
    return {"kv": kv, "valid": valid, "next_pos": pos[:, -1:] + 1, "logits": logits, "normed": normed,
            "bf16": bf16, "pad": pad}


def prefix_forward(model, state: dict, conts: Sequence[Sequence[int]], gates=None, *,
                   bypass: Bypasses | None = None, lora: DecodeLora | None = None):
    """Final hidden states (after the output norm) [B, C, E] of the continuations ``conts`` (right-padded)
    after the full-depth prompt cached by ``sample_prefill``: the continuation half of ``gated_forward``
    (blocks of ``gates`` [B, L] skipped, bypasses, the decode LoRA on every continuation position; None:
    full depth, the teacher), without recomputing the prompt; a block runs only for the rows that keep it.
    Differentiable in the bypasses and LoRA."""
    import torch

    core = _layers(model)
    dev = _device(model)
    B, C = len(conts), max(len(c) for c in conts)
    ids = torch.full((B, C), state["pad"], dtype=torch.long)
    for i, c in enumerate(conts):
        ids[i, : len(c)] = torch.tensor(list(c))
    ids = ids.to(dev)
    valid = torch.cat([state["valid"], torch.ones(B, C, dtype=torch.bool, device=dev)], 1)
    pos = state["next_pos"] + torch.arange(C, device=dev)[None, :]
    h = core.embed_tokens(ids)
    pe, masks = _block_rope(model, h, pos), _cache_masks(model, valid, C)
    keep = None if gates is None else gates.detach() > 0.5
    plan = _row_plan(keep, core.config.num_hidden_layers)
    prefix = state["kv"]

    def kv(il, r):
        pk, pv = (_rows(t, r) for t in prefix[il])
        return _KV(lambda k, v: (torch.cat([pk.to(k.dtype), k], 2), torch.cat([pv.to(v.dtype), v], 2)))

    # the LoRA mask broadcasts over rows: a block may run for some rows only
    ctx = lora.active(torch.ones(1, 1, 1, device=dev)) if lora is not None and keep is not None \
        else contextlib.nullcontext()
    with ctx:
        h = _cached_blocks(model, h, plan, masks=masks, pos=pos, pe=pe, kv=kv, bypass=bypass)
    return core.norm(h)


def sample_decode(model, state: dict, gates, *, max_new: int, temperature: float, generator, stop_ids: set[int],
                  pad: int, bypass: Bypasses | None = None, lora: DecodeLora | None = None) -> list[list[int]]:
    """Sample continuations after ``sample_prefill`` with the blocks of ``gates`` [B, L] (0: skipped)
    skipped for every new token, as the runtime decodes: a skipped block passes h (+ its bypass) and is not
    computed for that row (each block runs on the rows that keep it, with a key / value buffer of those rows
    only), the decode LoRA is active for every new token. Temperature 0: greedy. The tokens stay on the
    device until the end (a finished sequence gets ``pad``; the batch stops early when every sequence has
    stopped, checked every 8 tokens). Returns each sequence's tokens, up to and including the first stop token."""
    import torch

    core = _layers(model)
    dev = _device(model)
    L = core.config.num_hidden_layers
    valid, next_pos, logits = state["valid"], state["next_pos"].clone(), state["logits"]
    B, P = valid.shape
    keep = gates.detach().to(dev) > 0.5
    plan = _row_plan(keep, L)
    # per block: key / value buffers of the rows that run it, prompt copied in, max_new - 1 columns to fill
    bufs = []
    for il, (pk, pv) in enumerate(state["kv"]):
        r = plan[il]
        if isinstance(r, list):
            bufs.append(None)
            continue
        kb, vb = (torch.zeros(t.shape[0] if r is None else len(r), t.shape[1], P + max_new, t.shape[3],
                              dtype=t.dtype, device=dev) for t in (pk, pv))
        kb[:, :, :P], vb[:, :, :P] = _rows(pk, r), _rows(pv, r)
        bufs.append((kb, vb))
    col = [P]

    def kv(il, r):
        kb, vb = bufs[il]

        def put(k, v):
            j = col[0]
            kb[:, :, j:j + 1], vb[:, :, j:j + 1] = k, v
            return kb[:, :, :j + 1], vb[:, :, :j + 1]
        return _KV(put)

    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=dev)
    toks = torch.full((B, max_new), pad, dtype=torch.long, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    valid = torch.cat([valid, torch.ones(B, max_new, dtype=torch.bool, device=dev)], 1)
    lora_ctx = (lambda: lora.active(torch.ones(1, 1, 1, device=dev))) if lora is not None \
        else contextlib.nullcontext
    with torch.no_grad(), _autocast(dev, state["bf16"]):
        for step in range(max_new):
            lg = logits[:, -1].float()
            if temperature > 0:
                tok = torch.multinomial(torch.softmax(lg / temperature, -1), 1, generator=generator)[:, 0]
            else:
                tok = lg.argmax(-1)
            tok = torch.where(done, torch.full_like(tok, pad), tok)
            toks[:, step] = tok
            done = done | torch.isin(tok, stop)
            if step == max_new - 1 or (step % 8 == 7 and bool(done.all())):
                break
            h = core.embed_tokens(tok[:, None])
            j = P + step
            col[0] = j
            pe, masks = _block_rope(model, h, next_pos), _cache_masks(model, valid[:, :j + 1], 1)
            with lora_ctx():
                h = _cached_blocks(model, h, plan, masks=masks, pos=next_pos, pe=pe, kv=kv, bypass=bypass,
                                   layers=getattr(model, "_first_decode_layers", None))
            next_pos = next_pos + 1
            logits = _head(model, core.norm(h)).float()
    out = []
    for row in toks.cpu().tolist():
        n = next((i + 1 for i, t in enumerate(row) if t in stop_ids), None)
        out.append(row[:n] if n is not None else row[: step + 1])
    return out


def compile_decode(model) -> None:
    """torch.compile the decoder layers for the sampler's decode steps only (``sample_decode`` uses them; the
    scoring passes with gradients stay eager). Dynamic shapes: the rows that run a block and the cache length
    change from call to call. Opt-in (``compile``, CUDA only: on this project's 2-core CPU the first step of a
    4-block model spent 193 s compiling and then ran no faster); see docs/gpu_recipe.md."""
    import torch

    core = _layers(model)
    model._first_decode_layers = [torch.compile(layer, dynamic=True)
                                  for layer in core.layers[: core.config.num_hidden_layers]]
