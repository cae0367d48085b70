"""Shared fixtures.

The real default model (SmolLM2-135M-Instruct Q4_1, 93 MB) is downloaded and
verified by the setup command and cached; tests that need a GGUF with routers
or malformed data build it from that file in a temporary folder.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
STOCK_PYTHON = ROOT / "build" / "stock-venv" / "bin" / "python"


@pytest.fixture(scope="session")
def base_gguf() -> Path:
    from first_gguf.default_model import base_gguf_path

    return base_gguf_path()


@pytest.fixture(scope="session")
def router_weights(base_gguf):
    """Seeded random routers for every block, scaled so scores spread over (0, 1)."""
    from first_gguf.gguf_info import read_info

    info = read_info(base_gguf)
    rng = np.random.default_rng(1234)
    return {il: (rng.standard_normal(info.n_embd).astype(np.float32) * 0.2, float(rng.standard_normal()))
            for il in range(info.n_layer)}


@pytest.fixture(scope="session")
def router_gguf(tmp_path_factory, base_gguf, router_weights) -> Path:
    from first_gguf.convert.attach import attach

    out = tmp_path_factory.mktemp("routers") / "smollm2-routers.gguf"
    return attach(base_gguf, out, routers=router_weights,
                  rankings={"test_rank": {"ranking": list(range(29, -1, -1)), "method": "test"}})


@pytest.fixture(scope="session")
def base_model(base_gguf):
    import first_gguf

    m = first_gguf.load(base_gguf, n_ctx=2048, n_threads=2)
    yield m
    m.close()


@pytest.fixture(scope="session")
def router_model(router_gguf):
    import first_gguf

    m = first_gguf.load(router_gguf, n_ctx=2048, n_threads=2)
    yield m
    m.close()


@pytest.fixture(scope="session")
def stock_python() -> Path:
    if not STOCK_PYTHON.exists():
        pytest.fail(f"stock reference interpreter missing: {STOCK_PYTHON}; run scripts/build_stock_reference.sh "
                    f"(the README's test command does)")
    return STOCK_PYTHON


# ------------------------------------------------------------- tiny random Llama
N_LAYER, N_EMBD, VOCAB = 4, 64, 400


def _spm_model(path):
    import inspect
    import io

    import sentencepiece as spm

    text = [" ".join((inspect.getdoc(f) or "").split()) for f in (json.dumps, json.loads, inspect.getdoc,
                                                                   np.mean, np.sum, sorted, print, open)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text * 20), model_writer=buf, vocab_size=VOCAB,
                                   model_type="bpe", character_coverage=1.0, byte_fallback=True,
                                   hard_vocab_limit=False, minloglevel=2)
    path.write_bytes(buf.getvalue())


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny random Llama checkpoint (transformers) with a sentencepiece tokenizer, built here."""
    pytest.importorskip("torch")
    import sentencepiece as spm
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("tiny-llama")
    _spm_model(d / "tokenizer.model")
    sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    cfg = LlamaConfig(vocab_size=sp.get_piece_size(), hidden_size=N_EMBD, intermediate_size=128,
                      num_hidden_layers=N_LAYER, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, rms_norm_eps=1e-5, rope_theta=10000.0,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, initializer_range=0.2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(d, safe_serialization=True)
    return d, model


@pytest.fixture(scope="session")
def tiny_routers(tiny, tmp_path_factory):
    from first_gguf.convert.router_file import RouterFile, fingerprint_from_arrays, save_router_file

    d, model = tiny
    rng = np.random.default_rng(7)
    w = {b: rng.standard_normal(N_EMBD).astype(np.float32) for b in range(N_LAYER)}
    bias = {b: float(rng.standard_normal()) for b in range(N_LAYER)}
    fp = fingerprint_from_arrays("llama", N_LAYER, N_EMBD, model.config.vocab_size,
                                 model.model.norm.weight.detach().numpy())
    p = tmp_path_factory.mktemp("rf") / "tiny.routers.safetensors"
    return save_router_file(p, RouterFile(N_LAYER, N_EMBD, w, bias, fp)), w, bias


@pytest.fixture(scope="session")
def tiny_gguf_model(tiny, tiny_routers, tmp_path_factory):
    from click.testing import CliRunner

    import first_gguf
    from first_gguf.cli import main

    d, _ = tiny
    out = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    res = CliRunner().invoke(main, ["convert", str(d), "--routers", str(tiny_routers[0]), "--outtype", "f32",
                                    "-o", str(out)])
    assert res.exit_code == 0, res.output
    m = first_gguf.load(out, n_ctx=1024, n_threads=2)
    yield m
    m.close()


@pytest.fixture(scope="session")
def tiny1(tiny_gguf_model):
    """The same tiny model (routers, no chat template) on one thread: llama.cpp's threads spin, so two of
    them on a machine whose other core is busy make a test many times slower."""
    import first_gguf

    m = first_gguf.load(tiny_gguf_model.path, n_ctx=1024, n_threads=1)
    yield m
    m.close()
