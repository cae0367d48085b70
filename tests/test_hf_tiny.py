"""A tiny random Llama checkpoint built here: convert to f32 GGUF with routers and compare the
runtime with a transformers (torch) forward.

Tolerance: the runtime keeps K/V in F16, so log-probs agree to ~1e-3, not bit-exactly;
we assert 5e-3 (skipping moves them by orders of magnitude more).
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import N_LAYER
from torch_reference import skipped_forward, skipped_logprobs

TOL = 5e-3


PROMPT = [1, 17, 45, 99, 120, 33, 8, 76, 201, 150, 64, 12]
CONT = [55, 90, 130, 7, 66, 181, 23, 140]


@pytest.mark.parametrize("skip", [(), (1,), (1, 2), (3,)])
def test_logprobs_match_transformers(tiny_gguf_model, tiny, skip):
    _, model = tiny
    ref = skipped_logprobs(model, PROMPT, CONT, skip=skip)
    ours = np.array(tiny_gguf_model.score_tokens(PROMPT, CONT, skip_layers=list(skip)).logprobs)
    full = skipped_logprobs(model, PROMPT, CONT)
    d = float(np.max(np.abs(ours - ref)))
    print(f"skip {skip}: max |logprob diff| vs transformers = {d:.2e} (skipping moves them by "
          f"{float(np.max(np.abs(ref - full))):.2f})")
    assert d < TOL
    if skip:
        assert float(np.max(np.abs(ref - full))) > 20 * TOL


def test_router_scores_match_torch(tiny_gguf_model, tiny, tiny_routers):
    _, model = tiny
    _, w, b = tiny_routers
    _, hidden = skipped_forward(model, PROMPT, CONT)
    res = tiny_gguf_model.score_tokens(PROMPT, CONT)
    for il in range(N_LAYER):
        x = model.model.layers[il].input_layernorm(hidden[il][0, : len(PROMPT)]).detach().numpy()
        ref = 1 / (1 + np.exp(-(x @ w[il] + b[il])))
        assert abs(res.router_scores[il] - float(ref.mean())) < 1e-3  # hidden states differ by the F16 K/V


def test_greedy_tokens_match_transformers(tiny_gguf_model, tiny):
    _, model = tiny
    ids = list(PROMPT)
    with torch.no_grad():
        for _ in range(8):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    g = tiny_gguf_model.generate_tokens(list(PROMPT), 0.0, max_tokens=8)
    assert g.tokens == ids[len(PROMPT):][: len(g.tokens)]
    assert len(g.tokens) >= 4


def test_convert_errors(tmp_path, tiny):
    from first_gguf.convert.gguf_edit import GGUFEditError
    from first_gguf.convert.hf import convert_hf

    with pytest.raises(GGUFEditError, match="not found"):
        convert_hf(tmp_path / "nope", tmp_path / "o.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(GGUFEditError, match="no config.json"):
        convert_hf(tmp_path / "empty", tmp_path / "o.gguf")
    with pytest.raises(GGUFEditError, match="unknown outtype 'q4'"):
        convert_hf(tiny[0], tmp_path / "o.gguf", outtype="q4")
    assert not (tmp_path / "o.gguf").exists()


def test_convert_with_lora_merges_the_adapter(tiny, tmp_path):
    import copy

    from peft import LoraConfig, get_peft_model

    import first_gguf
    from first_gguf.convert.hf import convert_hf

    d, model = tiny
    torch.manual_seed(1)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                                 target_modules=["q_proj", "v_proj", "down_proj"]))
    peft_model.save_pretrained(tmp_path / "lora")
    merged = peft_model.merge_and_unload().eval()
    out = convert_hf(d, tmp_path / "merged.gguf", outtype="f32", lora=tmp_path / "lora")
    with first_gguf.load(out, n_ctx=256) as m:
        ours = np.array(m.score_tokens(PROMPT, CONT).logprobs)
    ref = skipped_logprobs(merged, PROMPT, CONT)
    base = skipped_logprobs(model, PROMPT, CONT)
    assert float(np.max(np.abs(ours - ref))) < TOL
    assert float(np.max(np.abs(ref - base))) > 20 * TOL  # the adapter really changed the model
