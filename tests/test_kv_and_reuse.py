"""Decode semantics around the KV cache and graph reuse."""
from __future__ import annotations

import numpy as np
import pytest

import first_gguf

TURN1 = [{"role": "user", "content": "Name three colours."}]
PROBE = " Dog, cat and horse are common animals."


def _turn2(reply: str):
    return TURN1 + [{"role": "assistant", "content": reply}, {"role": "user", "content": "Now name three animals."}]


@pytest.fixture()
def fresh(router_gguf):
    m = first_gguf.load(router_gguf, n_ctx=2048, n_threads=2)
    yield m
    m.close()


def test_conversation_after_skipped_turn_equals_fresh_full_depth(router_model, fresh):
    m = router_model
    m.reset()
    g1 = m.chat(TURN1, 0.3, max_tokens=24)
    assert len(g1.skipped_layers) == 9
    msgs = _turn2(g1.text)
    tokens, _ = m.chat_prompt_tokens(msgs)
    prompt2 = m.detokenize(tokens)

    cont = m.score_details(prompt2, PROBE)
    ref = fresh.score_details(prompt2, PROBE)
    diff = float(np.max(np.abs(np.array(cont.logprobs) - np.array(ref.logprobs))))
    print(f"continued vs fresh: max |logprob diff| = {diff:.2e}")
    assert diff < 1e-4
    np.testing.assert_allclose(cont.router_scores, ref.router_scores, atol=1e-6)

    # the next reply, greedy at full depth, is token-identical
    m.chat(TURN1, 0.3, max_tokens=24)  # leave the cache as after a skipped turn again
    assert m.chat(msgs, 0.0, max_tokens=24).tokens == fresh.chat(msgs, 0.0, max_tokens=24).tokens


def test_stale_cells_would_change_the_result(router_model, fresh):
    """Control: reusing the cells written under a skip mask gives a different (wrong) answer,
    so the test above can fail."""
    m = router_model
    m.reset()
    p1, _ = m.chat_prompt_tokens(TURN1)
    g1 = fresh.chat(TURN1, 0.3, max_tokens=24)
    p2, _ = m.chat_prompt_tokens(_turn2(g1.text))
    assert p2[: len(p1)] == p1
    m._prefill(p1)
    m._set_mask(g1.skipped_layers)
    m._eval(p2[len(p1):-1], masked=True, logits="none")
    m._set_mask(())
    # what a naive prefix cache would do: treat the masked cells as valid
    m._cached += m._dirty
    m._cached_scores = np.concatenate([m._cached_scores, np.full((len(m._dirty), m.n_layer), np.nan, np.float32)])
    m._dirty = []
    stale, _, _ = m._prefill(p2)
    fresh.reset()
    good, _, _ = fresh._prefill(p2)
    m.reset()
    assert float(np.max(np.abs(stale - good))) > 0.1


def test_graph_reuse_follows_the_mask(router_model, fresh):
    m = router_model
    prompt, cont = "The quick brown fox", " jumps over the lazy dog and runs into the forest."
    a = m.score(prompt, cont, skip_layers=[5, 6])
    b = m.score(prompt, cont, skip_layers=[7, 8])
    a2 = m.score(prompt, cont, skip_layers=[5, 6])
    assert a == a2
    assert a != b
    assert b == fresh.score(prompt, cont, skip_layers=[7, 8])
    # single-token decode graphs too: generations back to back equal fresh ones
    g_a = m.generate(prompt, skip_layers=[3, 4, 10], max_tokens=12)
    g_b = m.generate(prompt, skip_layers=[11, 12, 20], max_tokens=12)
    assert g_b.tokens == fresh.generate(prompt, skip_layers=[11, 12, 20], max_tokens=12).tokens
    assert g_a.tokens == fresh.generate(prompt, skip_layers=[3, 4, 10], max_tokens=12).tokens


def test_skipping_the_last_block(router_model):
    g = router_model.generate("Hello there", skip_layers=[29], max_tokens=4)
    assert g.skipped_layers == [29] and len(g.tokens) >= 1
    lp = router_model.score("Hello there", " my friend", skip_layers=[28, 29])
    assert all(np.isfinite(lp))


def test_generation_with_skipping_changes_output_but_not_the_full_model(router_model):
    prompt = "Write a sentence about the sea."
    full1 = router_model.generate(prompt, 0.0, max_tokens=16)
    router_model.generate(prompt, 0.5, max_tokens=16)
    full2 = router_model.generate(prompt, 0.0, max_tokens=16)
    assert full1.tokens == full2.tokens
    lp_full = router_model.score(prompt, " The sea is deep and blue.")
    lp_skip = router_model.score(prompt, " The sea is deep and blue.", skip_layers=list(range(5, 20)))
    assert lp_full[0] == lp_skip[0]  # first token comes from the full-depth prompt
    assert lp_full[1:] != lp_skip[1:]
