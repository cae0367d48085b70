"""Router scores computed in the graph against a numpy reference.

numpy reads the router and attn_norm tensors from the GGUF and the model's own
block-input hidden states (llama.cpp's layer-input outputs), and applies the
documented definition: sigmoid(w . (RMSNorm(h) * attn_norm) + b), averaged
over the prompt tokens.
"""
from __future__ import annotations

import gguf
import numpy as np

PROMPT = "Summarize: The mitochondria is the powerhouse of the cell. It produces energy for the body."


def _numpy_scores(gguf_path, hidden: dict[int, np.ndarray]) -> np.ndarray:
    r = gguf.GGUFReader(gguf_path)
    t = {x.name: x for x in r.tensors}
    eps = float(r.get_field("llama.attention.layer_norm_rms_epsilon").contents())
    n_tok = next(iter(hidden.values())).shape[0]
    out = np.zeros((n_tok, len(hidden)))
    for il, h in hidden.items():
        h = h.astype(np.float64)
        w_norm = np.asarray(t[f"blk.{il}.attn_norm.weight"].data, dtype=np.float64)
        w = np.asarray(t[f"blk.{il}.router.weight"].data, dtype=np.float64).reshape(-1)
        b = float(np.asarray(t[f"blk.{il}.router.bias"].data).reshape(-1)[0])
        x = h / np.sqrt((h * h).mean(axis=1, keepdims=True) + eps) * w_norm
        out[:, il] = 1.0 / (1.0 + np.exp(-(x @ w + b)))
    return out


def test_router_scores_match_numpy(router_model, router_gguf):
    m = router_model
    tokens, hidden = m.layer_inputs(PROMPT, list(range(m.n_layer)))
    ref = _numpy_scores(router_gguf, hidden)

    gen = m.generate(PROMPT, 0.0, max_tokens=1)
    per_token = m.cached_router_scores()[: len(tokens)]
    assert per_token.shape == ref.shape
    diff = float(np.max(np.abs(per_token - ref)))
    print(f"max |router score diff| per token = {diff:.2e}")
    assert diff < 1e-4
    # the aggregation is the mean over prompt tokens
    np.testing.assert_allclose(gen.router_scores, ref.mean(axis=0), atol=1e-5)
    # scores really depend on the input (not a constant)
    assert ref.std(axis=0).max() > 1e-3


def test_router_strategy_skips_lowest_scores(router_model):
    m = router_model
    gen = m.generate(PROMPT, 0.3, max_tokens=4)
    k = int(0.3 * m.n_layer)
    assert len(gen.skipped_layers) == k
    order = np.argsort(np.array(gen.router_scores), kind="stable")
    assert gen.skipped_layers == sorted(order[:k].tolist())


def test_routing_is_input_adaptive(router_model):
    m = router_model
    a = m.generate("Translate to French: good morning", 0.2, max_tokens=2)
    b = m.generate("def add(a, b):\n    return a + b\n\n# tests\n", 0.2, max_tokens=2)
    assert a.router_scores != b.router_scores


def test_prefix_cache_keeps_router_aggregation_exact(router_model, router_gguf):
    """Scores of a cached prefix are reused: aggregation equals a fresh evaluation."""
    import first_gguf

    m = router_model
    m.reset()
    m.generate("Tell me a story about a dragon.", 0.0, max_tokens=8)
    cont = m.generate("Tell me a story about a dragon. Make it short.", 0.0, max_tokens=1)
    fresh = first_gguf.load(router_gguf, n_ctx=2048, n_threads=2)
    try:
        ref = fresh.generate("Tell me a story about a dragon. Make it short.", 0.0, max_tokens=1)
    finally:
        fresh.close()
    np.testing.assert_allclose(cont.router_scores, ref.router_scores, atol=1e-6)
    assert cont.n_prefill_tokens < cont.n_prompt_tokens  # the prefix really came from the cache
