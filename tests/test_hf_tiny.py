"""A tiny random Llama checkpoint built here: convert to f32 GGUF with routers and compare the
runtime with a transformers (torch) forward.

Tolerance: the runtime keeps K/V in F16, so log-probs agree to ~1e-3, not bit-exactly;
we assert 5e-3 (skipping moves them by orders of magnitude more).
"""
from __future__ import annotations

import inspect
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

N_LAYER, N_EMBD, VOCAB = 4, 64, 256
TOL = 5e-3


def _spm_model(path):
    import io

    text = [" ".join((inspect.getdoc(f) or "").split()) for f in (json.dumps, json.loads, inspect.getdoc,
                                                                   np.mean, np.sum, sorted, print, open)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text * 20), model_writer=buf, vocab_size=VOCAB,
                                   model_type="bpe", character_coverage=1.0, byte_fallback=False,
                                   hard_vocab_limit=False, minloglevel=2)
    path.write_bytes(buf.getvalue())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("tiny-llama")
    _spm_model(d / "tokenizer.model")
    sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    cfg = LlamaConfig(vocab_size=sp.get_piece_size(), hidden_size=N_EMBD, intermediate_size=128,
                      num_hidden_layers=N_LAYER, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, initializer_range=0.2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(d, safe_serialization=True)
    return d, model


@pytest.fixture(scope="module")
def routers(tiny, tmp_path_factory):
    from first_gguf.convert.router_file import RouterFile, fingerprint_from_arrays, save_router_file

    d, model = tiny
    rng = np.random.default_rng(7)
    w = {b: rng.standard_normal(N_EMBD).astype(np.float32) for b in range(N_LAYER)}
    bias = {b: float(rng.standard_normal()) for b in range(N_LAYER)}
    fp = fingerprint_from_arrays("llama", N_LAYER, N_EMBD, model.config.vocab_size,
                                 model.model.norm.weight.detach().numpy())
    p = tmp_path_factory.mktemp("rf") / "tiny.routers.safetensors"
    return save_router_file(p, RouterFile(N_LAYER, N_EMBD, w, bias, fp)), w, bias


@pytest.fixture(scope="module")
def gguf_model(tiny, routers, tmp_path_factory):
    from click.testing import CliRunner

    import first_gguf
    from first_gguf.cli import main

    d, _ = tiny
    out = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    res = CliRunner().invoke(main, ["convert", str(d), "--routers", str(routers[0]), "--outtype", "f32",
                                    "-o", str(out)])
    assert res.exit_code == 0, res.output
    m = first_gguf.load(out, n_ctx=256, n_threads=2)
    yield m
    m.close()


def _torch_logprobs(model, prompt, cont, skip=()):
    """Prompt at full depth; continuation positions pass the blocks in ``skip`` through."""
    ids = torch.tensor([prompt + cont])
    n = len(prompt)
    hooks = []
    for il, layer in enumerate(model.model.layers):
        if il in skip:
            def hook(mod, args, kwargs, out, n=n):
                h_in = args[0] if args else kwargs["hidden_states"]
                o = out[0] if isinstance(out, tuple) else out
                o = o.clone()
                o[:, n:] = h_in[:, n:]
                return (o,) + tuple(out[1:]) if isinstance(out, tuple) else o
            hooks.append(layer.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            out = model(ids, output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    ls = torch.log_softmax(out.logits[0].double(), -1)
    return np.array([float(ls[n - 1 + i, t]) for i, t in enumerate(cont)]), out.hidden_states


PROMPT = [1, 17, 45, 99, 120, 33, 8, 76, 201, 150, 64, 12]
CONT = [55, 90, 130, 7, 66, 181, 23, 140]


@pytest.mark.parametrize("skip", [(), (1,), (1, 2), (3,)])
def test_logprobs_match_transformers(gguf_model, tiny, skip):
    _, model = tiny
    ref, _ = _torch_logprobs(model, PROMPT, CONT, skip)
    ours = np.array(gguf_model.score_tokens(PROMPT, CONT, skip_layers=list(skip)).logprobs)
    full, _ = _torch_logprobs(model, PROMPT, CONT)
    d = float(np.max(np.abs(ours - ref)))
    print(f"skip {skip}: max |logprob diff| vs transformers = {d:.2e} (skipping moves them by "
          f"{float(np.max(np.abs(ref - full))):.2f})")
    assert d < TOL
    if skip:
        assert float(np.max(np.abs(ref - full))) > 20 * TOL


def test_router_scores_match_torch(gguf_model, tiny, routers):
    _, model = tiny
    _, w, b = routers
    _, hidden = _torch_logprobs(model, PROMPT, CONT)
    res = gguf_model.score_tokens(PROMPT, CONT)
    for il in range(N_LAYER):
        x = model.model.layers[il].input_layernorm(hidden[il][0, : len(PROMPT)]).detach().numpy()
        ref = 1 / (1 + np.exp(-(x @ w[il] + b[il])))
        assert abs(res.router_scores[il] - float(ref.mean())) < 1e-3  # hidden states differ by the F16 K/V


def test_greedy_tokens_match_transformers(gguf_model, tiny):
    _, model = tiny
    ids = list(PROMPT)
    with torch.no_grad():
        for _ in range(8):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    last = None
    for last in gguf_model._stream(list(PROMPT), 0.0, max_tokens=8, temperature=0.0, top_p=1.0, stop=None,
                                   skip_strategy="router", skip_layers=None):
        pass
    assert last.generation.tokens == ids[len(PROMPT):][: len(last.generation.tokens)]
    assert len(last.generation.tokens) >= 4


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
    ref, _ = _torch_logprobs(merged, PROMPT, CONT)
    base, _ = _torch_logprobs(model, PROMPT, CONT)
    assert float(np.max(np.abs(ours - ref))) < TOL
    assert float(np.max(np.abs(ref - base))) > 20 * TOL  # the adapter really changed the model
