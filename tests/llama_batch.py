"""Raw llama.cpp contexts and batches for the multi-sequence tests (test_multi_sequence, test_archs):
several sequences in one ubatch, each with its own skip mask, read back row by row."""
from __future__ import annotations

import ctypes

import numpy as np

from first_gguf import _lib
from first_gguf._lib import llama_cpp


def make_ctx(model, n_seq, *, n_ctx, n_threads):
    p = llama_cpp.llama_context_default_params()
    p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max = n_ctx, 64, 64, n_seq
    p.n_threads = p.n_threads_batch = n_threads
    ctx = llama_cpp.llama_init_from_model(model._model, p)
    assert ctx
    return ctx


def decode(ctx, items, n_vocab):
    """items: (token, pos, seq, want_logits). Returns the logits rows of the wanted items, in order."""
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


def set_mask(ctx, seq, layers, n_layer):
    mask = (ctypes.c_uint8 * n_layer)(*[1 if i in layers else 0 for i in range(n_layer)])
    assert _lib.first_set_skip_mask(ctx, seq, mask, n_layer) == 0
