"""Per-sequence skip masks: two sequences in one batch, one skipping, one not."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from first_gguf import _lib
from first_gguf._lib import llama_cpp

SKIP = [4, 5, 6, 12, 20]


def _ctx(model, n_seq):
    p = llama_cpp.llama_context_default_params()
    p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max = 512, 64, 64, n_seq
    p.n_threads = p.n_threads_batch = 2
    ctx = llama_cpp.llama_init_from_model(model._model, p)
    assert ctx
    return ctx


def _decode(ctx, items, n_vocab):
    """items: (token, pos, seq, want_logits). Returns logits rows of the wanted items, in order."""
    b = llama_cpp.llama_batch_init(len(items), 0, 1)
    try:
        b.n_tokens = len(items)
        for i, (t, pos, seq, out) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = t, pos, 1, out
            b.seq_id[i][0] = seq
        assert llama_cpp.llama_decode(ctx, b) == 0
        rows = [i for i, it in enumerate(items) if it[3]]
        return [np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), shape=(n_vocab,)).copy() for i in rows]
    finally:
        llama_cpp.llama_batch_free(b)


def _mask(ctx, seq, layers, n_layer):
    m = (ctypes.c_uint8 * n_layer)(*[1 if i in layers else 0 for i in range(n_layer)])
    assert _lib.first_set_skip_mask(ctx, seq, m, n_layer) == 0


@pytest.fixture()
def prompts(base_model):
    return base_model.tokenize("The weather today is"), base_model.tokenize("In Python, a list comprehension")


def test_mixed_batch_equals_each_sequence_alone(base_model, prompts):
    m = base_model
    p0, p1 = prompts
    nv, nl = m.n_vocab, m.n_layer

    # together: both prompts at full depth, then one batch with seq 0 masked and seq 1 not
    ctx = _ctx(m, 2)
    try:
        _decode(ctx, [(t, i, 0, False) for i, t in enumerate(p0)] + [(t, i, 1, False) for i, t in enumerate(p1)], nv)
        _mask(ctx, 0, SKIP, nl)
        both = _decode(ctx, [(p0[-1], len(p0), 0, True), (p1[-1], len(p1), 1, True)], nv)
        two_steps = [both]
        # a second mixed step (graph reuse with a MIXED block plan)
        two_steps.append(_decode(ctx, [(11, len(p0) + 1, 0, True), (12, len(p1) + 1, 1, True)], nv))
    finally:
        llama_cpp.llama_free(ctx)

    # alone, each in its own context
    alone = []
    for seq_prompt, masked, extra in ((p0, True, 11), (p1, False, 12)):
        ctx = _ctx(m, 1)
        try:
            _decode(ctx, [(t, i, 0, False) for i, t in enumerate(seq_prompt)], nv)
            if masked:
                _mask(ctx, 0, SKIP, nl)
            a = _decode(ctx, [(seq_prompt[-1], len(seq_prompt), 0, True)], nv)[0]
            b = _decode(ctx, [(extra, len(seq_prompt) + 1, 0, True)], nv)[0]
            alone.append((a, b))
        finally:
            llama_cpp.llama_free(ctx)

    for step in range(2):
        for seq in range(2):
            d = float(np.max(np.abs(two_steps[step][seq] - alone[seq][step])))
            print(f"step {step} seq {seq}: max |logit diff| batched vs alone = {d:.2e}")
            assert d < 1e-3
    # and the masked sequence really differs from an unmasked one
    assert float(np.max(np.abs(alone[0][0] - alone[1][0]))) > 0.1


def test_c_api_rejects_bad_masks(base_model):
    ctx = base_model._ctx
    nl = base_model.n_layer
    full = (ctypes.c_uint8 * nl)(*([1] * nl))
    assert _lib.first_set_skip_mask(ctx, 0, full, nl) == -4
    short = (ctypes.c_uint8 * 3)(1, 0, 1)
    assert _lib.first_set_skip_mask(ctx, 0, short, 3) == -3
    assert _lib.first_set_skip_mask(ctx, 1, short, 3) == -2  # n_seq_max is 1
    assert _lib.first_set_routing(ctx, 0, True) == -5          # no routers
    out = (ctypes.c_uint8 * nl)()
    assert _lib.first_get_skip_mask(ctx, 0, out, nl) == 0 and list(out) == [0] * nl
