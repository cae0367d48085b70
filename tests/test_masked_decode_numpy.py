"""Masked decoding against an independent numpy forward of the same GGUF.

llama.cpp quantizes activations for Q4_1 matmuls and keeps K/V in F16, so the
two agree to about 0.1 nats per token, not bit-exactly; skipping blocks moves
log-probs by 0.5-1 nats. The test checks that the runtime lands on the numpy
result for the same skip set and clearly away from wrong semantics (blocks
also skipped for the prompt).
"""
from __future__ import annotations

import numpy as np
import pytest

from numpy_llama import NumpyLlama

PROMPT = "The history of the Roman Empire is"
CONT = " long and full of wars, emperors and roads that connected the provinces."


@pytest.fixture(scope="module")
def ref(base_gguf):
    return NumpyLlama(base_gguf)


@pytest.mark.parametrize("skip", [(5, 6, 7), (3, 10, 15, 20, 25), (29,)])
def test_masked_decode_matches_numpy(base_model, ref, skip):
    pt, ct = base_model.tokenize(PROMPT), base_model.tokenize(CONT, add_bos=False)
    ours = np.array(base_model.score(PROMPT, CONT, skip_layers=list(skip)))
    same = ref.continuation_logprobs(pt, ct, skip)
    full = ref.continuation_logprobs(pt, ct, ())
    # wrong semantics: the prompt skips the blocks too (what per-token early exit without KV care computes)
    lg = ref.logits(pt + ct, 0, skip)
    lg = lg - lg.max(-1, keepdims=True)
    ls = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
    wrong = np.array([ls[len(pt) - 1 + i, t] for i, t in enumerate(ct)])

    d_same = float(np.mean(np.abs(ours - same)))
    d_full = float(np.mean(np.abs(ours - full)))
    d_wrong = float(np.mean(np.abs(ours - wrong)))
    print(f"skip {skip}: mean |diff| vs numpy same mask {d_same:.3f}, vs full {d_full:.3f}, "
          f"vs prompt-also-skipped {d_wrong:.3f}")
    assert d_same < 0.15
    assert d_same < 0.5 * d_full
    if len(skip) > 1:  # the last block's prompt K/V barely matter, so (29,) cannot tell these apart
        assert d_same < 0.5 * d_wrong
