"""Per-sequence skip masks: two sequences in one batch, one skipping, one not."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from first_gguf import _lib
from first_gguf._lib import llama_cpp
from llama_batch import decode, make_ctx, set_mask

SKIP = [4, 5, 6, 12, 20]


def _ctx(model, n_seq):
    return make_ctx(model, n_seq, n_ctx=512, n_threads=2)


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
        decode(ctx, [(t, i, 0, False) for i, t in enumerate(p0)] + [(t, i, 1, False) for i, t in enumerate(p1)], nv)
        set_mask(ctx, 0, SKIP, nl)
        both = decode(ctx, [(p0[-1], len(p0), 0, True), (p1[-1], len(p1), 1, True)], nv)
        two_steps = [both]
        # a second mixed step (graph reuse with a MIXED block plan)
        two_steps.append(decode(ctx, [(11, len(p0) + 1, 0, True), (12, len(p1) + 1, 1, True)], nv))
    finally:
        llama_cpp.llama_free(ctx)

    # alone, each in its own context
    alone = []
    for seq_prompt, masked, extra in ((p0, True, 11), (p1, False, 12)):
        ctx = _ctx(m, 1)
        try:
            decode(ctx, [(t, i, 0, False) for i, t in enumerate(seq_prompt)], nv)
            if masked:
                set_mask(ctx, 0, SKIP, nl)
            a = decode(ctx, [(seq_prompt[-1], len(seq_prompt), 0, True)], nv)[0]
            b = decode(ctx, [(extra, len(seq_prompt) + 1, 0, True)], nv)[0]
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
