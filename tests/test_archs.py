"""Layer skipping beyond llama: tiny random Qwen2, Qwen3 and Gemma 3 checkpoints built here with transformers
(GQA, tied and untied embeddings, Qwen2's q/k/v biases, Qwen3's and Gemma 3's q/k norms and a head size that
differs from n_embd / n_head, Gemma 3's sliding-window blocks with their own rope base, its scaled embeddings
and 1 + weight norms), converted with ``first-gguf convert``: the Qwen ones with a byte-level BPE tokenizer
using Qwen2's pre-tokenizer split and ``--pre-tokenizer qwen2`` (upstream does not know the tokenizer by its
hash), Gemma 3 with a sentencepiece tokenizer.

Checked per checkpoint, as tests/test_hf_tiny.py does for llama:
- full depth: greedy tokens and log-probs equal transformers;
- blocks skipped for the continuation (the last block included): log-probs equal a torch forward that
  passes the same blocks through, without and with bypass adapters;
- mixed ubatches (one sequence skipping, one not) equal each sequence alone;
- router scores (per token and aggregated) equal numpy on torch's hidden states; block inputs equal
  torch's (qwen2's builder does not record them itself);
- skip_budget 0 equals stock llama-cpp-python 0.3.36 on the same GGUF (without first-gguf tensors),
  token for token, also with the routers scored;
- a conversation continued after a skipped turn equals a fresh full-depth evaluation.

Tolerance: the runtime keeps K/V in F16 and multiplies them with Q and the attention weights rounded to
F16 too (ggml's CPU matmul of an F16 tensor), and its GELU (Gemma 3) reads an F16 table. test_hf_tiny compares
with plain float32 torch at 5e-3; here the torch reference rounds Q, K, V and the attention weights to F16
the same way (f16_attention) and uses ggml's GELU (GgmlGelu), which brings the differences from ~5e-3 down to
~5e-4, and we assert 2e-3 (skipping moves them by orders of magnitude more).
"""
from __future__ import annotations

import ctypes
import inspect
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")

import first_gguf  # noqa: E402
from first_gguf import _lib  # noqa: E402
from first_gguf._lib import llama_cpp  # noqa: E402
from llama_batch import decode, make_ctx, set_mask  # noqa: E402
from torch_reference import skipped_forward, skipped_logprobs, training_bypasses  # noqa: E402
from first_gguf.cli import main  # noqa: E402

TOL = 2e-3
N_EMBD, RANK = 64, 4
PROMPT = [17, 45, 99, 120, 33, 8, 76, 201, 150, 64, 12, 300]
CONT = [55, 90, 130, 7, 66, 181, 23, 140]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2's pre-tokenizer split (its tokenizer.json), which llama.cpp's 'qwen2' pre-tokenizer implements
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
STOCK_PROMPTS = ["The capital of France is", "def fibonacci(n):\n    return n", "Hello world, it's 2024! Is it?"]
STOCK_MAX_TOKENS = 12

# name: (architecture, tied embeddings, blocks). Gemma 3 ties them always; its 6 blocks are 5 sliding-window
# blocks (window 4, rope base 1e4) and a global one (rope base 1e6), llama.cpp's default pattern.
CONFIGS = {
    "qwen2-tied": ("qwen2", True, 4),
    "qwen2-untied": ("qwen2", False, 4),
    "qwen3-tied": ("qwen3", True, 4),
    "qwen3-untied": ("qwen3", False, 4),
    "gemma3": ("gemma3", True, 6),
}


def f16_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Causal attention as llama.cpp's CPU graph computes it (no flash attention): K and V from an F16 cache,
    Q and the softmax weights rounded to F16 by the matmuls with them, softmax in float32; a sliding window
    where the block has one. For full-sequence forwards without padding (what these tests run)."""
    def f16(t):
        return t.half().float()

    groups = module.num_key_value_groups
    k, v = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    if getattr(module, "scale_q_first", False):  # Gemma 3: llama.cpp scales Q before the matmul
        w = f16(query * scaling) @ f16(k).transpose(2, 3)
    else:  # llama.cpp scales the matmul's result, in the softmax
        w = (f16(query) @ f16(k).transpose(2, 3)) * scaling
    n, m = w.shape[-2], w.shape[-1]
    dist = torch.arange(m - n, m)[:, None] - torch.arange(m)[None, :]  # query position - key position
    allowed = dist >= 0
    window = getattr(module, "sliding_window", None)
    if window:  # Gemma 3's sliding-window blocks: the last `window` positions
        allowed &= dist < window
    w = w.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(w.float(), -1)
    return (f16(p) @ f16(v)).transpose(1, 2).contiguous(), p


class GgmlGelu(torch.nn.Module):
    """GELU (tanh form) as ggml's CPU kernels compute it, from a table over F16 inputs and outputs
    (GGML_GELU_FP16): f16(gelu(f16(x))) for |x| < 10, x above and 0 below."""

    def forward(self, x):
        y = torch.nn.functional.gelu(x.half().float(), approximate="tanh").half().float()
        return torch.where(x >= 10.0, x, torch.where(x <= -10.0, torch.zeros_like(x), y))


def _tokenizer(d: Path):
    """A byte-level BPE tokenizer trained here, with Qwen2's pre-tokenizer and special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    text = [" ".join((inspect.getdoc(f) or "").split()) for f in (json.dumps, json.loads, inspect.getdoc,
                                                                   np.mean, np.sum, sorted, print, open)]
    tok.train_from_iterator(text * 5, trainers.BpeTrainer(
        vocab_size=420, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    hf.save_pretrained(d)
    return hf


def _checkpoint(d: Path, arch: str, tied: bool, n_layer: int):
    """The tokenizer (a byte-level BPE one; Gemma 3: sentencepiece, as Gemma's own) and a random model."""
    from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                              Qwen3ForCausalLM)

    if arch == "gemma3":
        import sentencepiece as spm
        from conftest import _spm_model

        _spm_model(d / "tokenizer.model")
        hf_tok = None
        n_vocab = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model")).get_piece_size()
        ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    else:
        hf_tok = _tokenizer(d)
        n_vocab = len(hf_tok)
        ids = dict(bos_token_id=None, eos_token_id=hf_tok.convert_tokens_to_ids("<|im_end|>"))
    common = dict(vocab_size=n_vocab, hidden_size=N_EMBD, intermediate_size=128, num_hidden_layers=n_layer,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6,
                  tie_word_embeddings=tied, initializer_range=0.2, **ids)
    torch.manual_seed(0)
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(rope_theta=1e6, **common))
    elif arch == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=32, rope_theta=1e6, **common))  # q/k/v of 4x32, not 64 / 4
    else:
        # attention scale 1/sqrt(head_dim), as llama.cpp assumes below 27B
        model = Gemma3ForCausalLM(Gemma3TextConfig(head_dim=32, query_pre_attn_scalar=32, sliding_window=4, **common))
        assert model.config.layer_types == ["sliding_attention"] * 5 + ["full_attention"]
    with torch.no_grad():
        # norms and biases away from their initial values, so that using them matters (Gemma 3's norms
        # multiply by 1 + weight)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_((0.0 if arch == "gemma3" else 1.0) + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.eval()
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    model.save_pretrained(d, safe_serialization=True)
    from transformers import AttentionInterface

    AttentionInterface.register("first_f16", f16_attention)
    model.set_attn_implementation("first_f16")
    if arch == "gemma3":
        for layer in model.model.layers:
            layer.mlp.act_fn = GgmlGelu()
            layer.self_attn.scale_q_first = True
    return model, hf_tok


def _norm_weight(arch, norm) -> np.ndarray:
    """What an RMSNorm multiplies by: its weight, or 1 + weight for Gemma 3 (folded in by the converter)."""
    w = norm.weight.detach().double().numpy()
    return 1.0 + w if arch == "gemma3" else w


def _router_file(path: Path, arch: str, model, n_layer: int):
    from first_gguf.convert.router_file import RouterFile, fingerprint_from_arrays, save_router_file

    rng = np.random.default_rng(7)
    w = {b: (rng.standard_normal(N_EMBD) * 0.3).astype(np.float32) for b in range(n_layer)}
    bias = {b: float(rng.standard_normal()) for b in range(n_layer)}
    bypasses = {b: ((rng.standard_normal((RANK, N_EMBD)) / np.sqrt(N_EMBD)).astype(np.float32),
                    (rng.standard_normal((N_EMBD, RANK)) * 0.5).astype(np.float32)) for b in range(n_layer)}
    fp = fingerprint_from_arrays(arch, n_layer, N_EMBD, model.config.vocab_size,
                                 _norm_weight(arch, model.model.norm).astype(np.float32))
    save_router_file(path, RouterFile(n_layer, N_EMBD, w, bias, fp, bypasses=bypasses))
    return w, bias, bypasses


class Case:
    """One converted checkpoint: the torch model, its GGUF with routers and bypasses, the same GGUF
    stripped of them (for stock llama.cpp), and a first-gguf Model of the former."""

    def __init__(self, name, arch, tied, n_layer, root: Path):
        self.name, self.arch, self.tied, self.n_layer = name, arch, tied, n_layer
        ckpt = root / "ckpt"
        ckpt.mkdir()
        self.model, self.hf_tok = _checkpoint(ckpt, arch, tied, n_layer)
        self.ckpt = ckpt
        self.eps = self.model.config.rms_norm_eps
        rf = root / "routers.safetensors"
        self.w, self.b, self.bypasses = _router_file(rf, arch, self.model, n_layer)
        self.gguf = root / f"{name}.gguf"
        pre = [] if self.hf_tok is None else ["--pre-tokenizer", "qwen2"]
        res = CliRunner().invoke(main, ["convert", str(ckpt), "--routers", str(rf), "--outtype", "f32", *pre,
                                        "-o", str(self.gguf)])
        assert res.exit_code == 0, res.output
        from first_gguf.convert.attach import strip

        self.base = strip(self.gguf, root / f"{name}.base.gguf")
        self.m = first_gguf.load(self.gguf, n_ctx=512, n_threads=1)
        assert self.m.info.architecture == arch and self.m.n_layer == n_layer and self.m.supports_skip

    def blocks(self, skip):
        """Block indices, negative ones from the end."""
        return tuple(sorted(il % self.n_layer for il in skip))

    def close(self):
        self.m.close()


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request, tmp_path_factory):
    arch, tied, n_layer = CONFIGS[request.param]
    c = Case(request.param, arch, tied, n_layer, tmp_path_factory.mktemp(request.param))
    yield c
    c.close()


# ------------------------------------------------------------------ full depth and skipping
def test_greedy_tokens_match_transformers(case):
    ids = list(PROMPT)
    with torch.no_grad():
        for _ in range(8):
            ids.append(int(case.model(torch.tensor([ids])).logits[0, -1].argmax()))
    g = case.m.generate_tokens(list(PROMPT), 0.0, max_tokens=8)
    assert g.skipped_layers == []
    assert len(g.tokens) >= 4
    assert g.tokens == ids[len(PROMPT):][: len(g.tokens)]


@pytest.mark.parametrize("skip", [(), (1,), (0, 2), (-1,), (1, -1)])  # -1: the last block
def test_logprobs_match_transformers(case, skip):
    m, skip = case.m, case.blocks(skip)
    m.bypass = False
    ref = skipped_logprobs(case.model, PROMPT, CONT, skip=skip)
    ours = np.array(m.score_tokens(PROMPT, CONT, skip_layers=list(skip)).logprobs)
    full = skipped_logprobs(case.model, PROMPT, CONT)
    d = float(np.max(np.abs(ours - ref)))
    print(f"{case.name} skip {skip}: max |logprob diff| vs transformers = {d:.2e} (skipping moves them by "
          f"{float(np.max(np.abs(ref - full))):.2f})")
    assert d < TOL
    if skip:
        assert float(np.max(np.abs(ref - full))) > 20 * TOL
    elif case.arch == "gemma3":  # control: the sliding window matters, so matching it is checked
        windows = [layer.self_attn.sliding_window for layer in case.model.model.layers]
        try:
            for layer in case.model.model.layers:
                layer.self_attn.sliding_window = None
            unwindowed = skipped_logprobs(case.model, PROMPT, CONT)
        finally:
            for layer, w in zip(case.model.model.layers, windows):
                layer.self_attn.sliding_window = w
        assert sum(w is not None for w in windows) == 5
        assert float(np.max(np.abs(unwindowed - ref))) > 20 * TOL


@pytest.mark.parametrize("skip", [(1,), (0, -1)])
def test_bypass_logprobs_match_transformers(case, skip):
    m, skip = case.m, case.blocks(skip)
    assert m.n_bypasses == case.n_layer
    m.bypass = True
    try:
        ours = np.array(m.score_tokens(PROMPT, CONT, skip_layers=list(skip)).logprobs)
    finally:
        m.bypass = False
    ref = skipped_logprobs(case.model, PROMPT, CONT, skip=skip, bypasses=case.bypasses)
    plain = skipped_logprobs(case.model, PROMPT, CONT, skip=skip)
    d = float(np.max(np.abs(ours - ref)))
    print(f"{case.name} skip {skip} with bypasses: max |logprob diff| = {d:.2e} (the bypasses move them by "
          f"{float(np.max(np.abs(ref - plain))):.2f})")
    assert d < TOL
    assert float(np.max(np.abs(ref - plain))) > 20 * TOL


def _ctx(model, n_seq):
    return make_ctx(model, n_seq, n_ctx=256, n_threads=1)


def test_mixed_ubatch_equals_each_sequence_alone(case):
    """One ubatch, sequence 0 skipping block 1 and the last (whose output rows are selected), sequence 1
    not: the blocks run with per-token pass-through (here with the bypass adapters, on by default in a new
    context), and each sequence gets what it gets alone."""
    m, nv = case.m, case.m.n_vocab
    p0, p1, skip = PROMPT[:7], PROMPT[4:], case.blocks((1, -1))
    e0, e1 = CONT[:3], CONT[3:6]  # three tokens each, logits of the last only

    def step(seq, prompt, extra):
        return [(t, len(prompt) + i, seq, i == len(extra) - 1) for i, t in enumerate(extra)]

    ctx = _ctx(m, 2)
    try:
        decode(ctx, [(t, i, 0, False) for i, t in enumerate(p0)] + [(t, i, 1, False) for i, t in enumerate(p1)], nv)
        set_mask(ctx, 0, skip, case.n_layer)
        both = decode(ctx, step(0, p0, e0) + step(1, p1, e1), nv)
    finally:
        llama_cpp.llama_free(ctx)
    alone = []
    for prompt, extra, masked in ((p0, e0, True), (p1, e1, False)):
        ctx = _ctx(m, 1)
        try:
            decode(ctx, [(t, i, 0, False) for i, t in enumerate(prompt)], nv)
            if masked:
                set_mask(ctx, 0, skip, case.n_layer)
            alone.append(decode(ctx, step(0, prompt, extra), nv)[0])
        finally:
            llama_cpp.llama_free(ctx)
    for seq in range(2):
        d = float(np.max(np.abs(both[seq] - alone[seq])))
        print(f"{case.name} seq {seq}: max |logit diff| mixed ubatch vs alone = {d:.2e}")
        assert d < 1e-3
    # and the skipping sequence matches torch skipping the same blocks (a fresh context runs the bypasses)
    ref = skipped_logprobs(case.model, p0, e0 + [0], skip=skip, bypasses=case.bypasses)
    ours = _log_softmax(alone[0])[0]
    assert abs(ours - ref[-1]) < TOL


def _log_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    z = x - x.max()
    return z - np.log(np.exp(z).sum())


# ------------------------------------------------------------------ routers and block inputs
def test_router_scores_match_numpy(case):
    m = case.m
    _, hidden = skipped_forward(case.model, PROMPT, CONT)
    res = m.score_tokens(PROMPT, CONT)
    per_token = m.cached_router_scores()[: len(PROMPT)]
    assert per_token.shape == (len(PROMPT), case.n_layer)
    for il, layer in enumerate(case.model.model.layers):
        h = hidden[il][0, : len(PROMPT)].double().numpy()
        x = h / np.sqrt((h * h).mean(-1, keepdims=True) + case.eps) * _norm_weight(case.arch, layer.input_layernorm)
        ref = 1 / (1 + np.exp(-(x @ case.w[il].astype(np.float64) + case.b[il])))
        assert float(np.max(np.abs(per_token[:, il] - ref))) < 1e-3  # hidden states differ by the F16 K/V
        assert abs(res.router_scores[il] - float(ref.mean())) < 1e-3
    assert float(np.ptp(res.router_scores)) > 0.05  # the blocks' scores differ: a real ranking


def test_block_inputs_match_transformers(case):
    text = "Hello world, it's 2024!"
    tokens, inp = case.m.layer_inputs(text, list(range(case.n_layer)))
    _, hidden = skipped_forward(case.model, tokens[:-1], tokens[-1:])
    for il in range(case.n_layer):
        ref = hidden[il][0].numpy()
        assert inp[il].shape == ref.shape
        assert float(np.max(np.abs(inp[il] - ref))) < 1e-3 * max(1.0, float(np.abs(ref).max()))


def test_named_pre_tokenizer_tokenizes_like_transformers(case):
    if case.hf_tok is None:
        pytest.skip("sentencepiece tokenizer: no pre-tokenizer to name")
    for text in STOCK_PROMPTS + ["  spaces\n\nand 12345 digits, it'll DO!"]:
        assert case.m.tokenize(text, add_bos=False) == case.hf_tok.encode(text), text


# ------------------------------------------------------------------ stock llama.cpp
@pytest.mark.reference
def test_budget0_equals_stock(case, stock_python, tmp_path):
    out = tmp_path / "stock"
    out.mkdir()
    req = {"model": str(case.base), "prompts": STOCK_PROMPTS, "max_tokens": STOCK_MAX_TOKENS, "n_ctx": 512,
           "out": str(out), "fresh": case.arch == "gemma3"}
    res = subprocess.run([str(stock_python), str(Path(__file__).with_name("stock_reference.py"))],
                         input=json.dumps(req), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    stock = json.loads(res.stdout)
    base = first_gguf.load(case.base, n_ctx=512, n_threads=1)
    try:
        assert base.supports_skip and base.n_routers == 0
        n_compared = 0
        for i, prompt in enumerate(STOCK_PROMPTS):
            ref_logits = np.load(out / f"logits_{i}.npy")
            for m in (base, case.m):  # without first-gguf tensors, and with the routers scored
                g = m.generate(prompt, 0.0, max_tokens=STOCK_MAX_TOKENS)
                assert g.skipped_layers == []
                assert (g.router_scores is not None) == (m is case.m)
                # stock_reference.py's token loop and llama-cpp-python's completion stop at token_eos only;
                # first-gguf, like llama.cpp's own tools, at any end-of-generation token, here also
                # <|endoftext|>: compared up to there
                ref = stock[i]["tokens"]
                ends = [j for j, t in enumerate(ref) if llama_cpp.llama_vocab_is_eog(m._vocab, t)]
                ref = ref[: ends[0]] if ends else ref
                assert g.tokens == ref, (m.path, prompt)
                n_compared += len(ref)
                # (no text comparison: a random model's byte-level tokens form invalid UTF-8, which
                # llama-cpp-python's completion drops, and it generates past max_tokens to complete a split
                # character; tokens and logits are what is compared)
                m.reset()
                logits, _, _ = m._prefill(m.tokenize(prompt))
                d = float(np.max(np.abs(logits - ref_logits)))
                print(f"{case.name} prompt {i} {m.path.name}: max |logit diff| vs stock = {d:.3g}")
                assert d <= 1e-3
        assert n_compared >= 2 * len(STOCK_PROMPTS) * STOCK_MAX_TOKENS // 2  # not a comparison of empty lists
    finally:
        base.close()


# ------------------------------------------------------------------ multi-turn
def test_continuation_after_skipped_turn_is_exact(case):
    m = case.m
    fresh = first_gguf.load(case.gguf, n_ctx=512, n_threads=1)
    try:
        m.reset()
        g1 = m.generate_tokens(list(PROMPT), 0.5, max_tokens=8)  # routers pick half the blocks
        assert len(g1.skipped_layers) == case.n_layer // 2 and len(g1.tokens) >= 2
        prompt2 = list(PROMPT) + g1.tokens + [3, 45, 77, 12]
        cont = m.score_tokens(prompt2, CONT)
        ref = fresh.score_tokens(prompt2, CONT)
        d = float(np.max(np.abs(np.array(cont.logprobs) - np.array(ref.logprobs))))
        print(f"{case.name}: continued vs fresh max |logprob diff| = {d:.2e}")
        assert d < 1e-4
        np.testing.assert_allclose(cont.router_scores, ref.router_scores, atol=1e-6)
        full = skipped_logprobs(case.model, prompt2, CONT)
        assert float(np.max(np.abs(np.array(cont.logprobs) - full))) < TOL

        m.generate_tokens(list(PROMPT), 0.5, max_tokens=8)  # leave the cache as after a skipped turn again
        assert m.generate_tokens(prompt2, 0.0, max_tokens=8).tokens == \
            fresh.generate_tokens(prompt2, 0.0, max_tokens=8).tokens

        # control: treating the cells written under the mask as valid gives another result, so skipped
        # blocks really left them stale and the checks above could fail
        m.reset()
        m._prefill(list(PROMPT))
        m._set_mask(g1.skipped_layers)
        m._eval(prompt2[len(PROMPT):-1], masked=True, logits="none")
        m._set_mask(())
        m._cached += m._dirty
        m._cached_scores = np.concatenate([m._cached_scores,
                                           np.full((len(m._dirty), m.n_layer), np.nan, np.float32)])
        m._dirty = []
        stale, _, _ = m._prefill(prompt2)
        fresh.reset()
        good, _, _ = fresh._prefill(prompt2)
        assert float(np.max(np.abs(stale - good))) > 0.01
    finally:
        m.reset()
        fresh.close()


# ------------------------------------------------------------------ convert: naming the pre-tokenizer
@pytest.fixture(scope="module")
def qwen_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen-ckpt")
    _checkpoint(d, "qwen2", True, 4)
    return d


def test_convert_names_a_missing_pre_tokenizer(qwen_ckpt, tmp_path):
    from first_gguf.convert.gguf_edit import GGUFEditError
    from first_gguf.convert.hf import convert_hf

    out = tmp_path / "o.gguf"
    with pytest.raises(GGUFEditError, match=r"does not recognise the BPE pre-tokenizer of .*ckpt.* \(chkhsh [0-9a-f]{64}\); "
                                            r"name it with --pre-tokenizer NAME .* --pre-tokenizer-from FILE"):
        convert_hf(qwen_ckpt, out, outtype="f32")
    with pytest.raises(GGUFEditError, match=r"invalid pre-tokenizer name 'qwen 2'; expected a llama.cpp pre-tokenizer"):
        convert_hf(qwen_ckpt, out, outtype="f32", pre_tokenizer="qwen 2")
    with pytest.raises(GGUFEditError, match=r"llama.cpp cannot load the vocabulary with pre-tokenizer 'nosuch': "
                                            r".*unknown pre-tokenizer type: 'nosuch'"):
        convert_hf(qwen_ckpt, out, outtype="f32", pre_tokenizer="nosuch")
    assert list(tmp_path.iterdir()) == []  # nothing left behind


def test_convert_takes_the_pre_tokenizer_from_a_gguf(qwen_ckpt, tmp_path):
    from first_gguf.convert.gguf_edit import field_value, read_gguf, rewrite_gguf

    runner = CliRunner()
    named = tmp_path / "named.gguf"
    res = runner.invoke(main, ["convert", str(qwen_ckpt), "--outtype", "f32", "--pre-tokenizer", "qwen2", "-o", str(named)])
    assert res.exit_code == 0, res.output
    taken = tmp_path / "taken.gguf"
    res = runner.invoke(main, ["convert", str(qwen_ckpt), "--outtype", "f32", "--pre-tokenizer-from", str(named),
                               "-o", str(taken)])
    assert res.exit_code == 0, res.output
    a, b = read_gguf(named), read_gguf(taken)
    assert field_value(b, "tokenizer.ggml.pre") == "qwen2"
    assert {f: field_value(a, f) for f in a.fields} == {f: field_value(b, f) for f in b.fields}
    assert all(np.array_equal(x.data, y.data) for x, y in zip(a.tensors, b.tensors))

    res = runner.invoke(main, ["convert", str(qwen_ckpt), "--pre-tokenizer", "qwen2", "--pre-tokenizer-from",
                               str(named), "-o", str(tmp_path / "x.gguf")])
    assert res.exit_code != 0 and "give --pre-tokenizer or --pre-tokenizer-from, not both" in res.output
    nopre = rewrite_gguf(named, tmp_path / "nopre.gguf", drop_kv=lambda k: k == "tokenizer.ggml.pre")
    res = runner.invoke(main, ["convert", str(qwen_ckpt), "--pre-tokenizer-from", str(nopre), "-o", str(tmp_path / "x.gguf")])
    assert res.exit_code != 0 and "nopre.gguf has no tokenizer.ggml.pre key" in res.output
    res = runner.invoke(main, ["convert", str(qwen_ckpt), "--pre-tokenizer-from", str(tmp_path / "nope.gguf"),
                               "-o", str(tmp_path / "x.gguf")])
    assert res.exit_code != 0 and "reference GGUF for the pre-tokenizer not found" in res.output
    assert not (tmp_path / "x.gguf").exists()


def test_supported_architectures_come_from_the_c_side():
    """One list, kept in cpp/llama-first.cpp: first_supported_archs writes it like snprintf."""
    from first_gguf._lib import supported_architectures

    n = _lib.first_supported_archs(None, 0)
    full = ctypes.create_string_buffer(n + 1)
    assert _lib.first_supported_archs(full, n + 1) == n and len(full.value) == n
    short = ctypes.create_string_buffer(6)
    assert _lib.first_supported_archs(short, 6) == n and short.value == full.value[:5]
    assert supported_architectures() == tuple(full.value.decode().split(","))
    assert {a for a, _, _ in CONFIGS.values()} | {"llama"} <= set(supported_architectures())


# ------------------------------------------------------------------ training (first_gguf.train) per family
def _gated_logprobs(c: Case, model, prompt, cont, skip, bypass=None, lora=None):
    from first_gguf.train import gated_forward
    from first_gguf.train.forward import _head

    ids = torch.tensor([list(prompt) + list(cont)])
    n = len(prompt)
    gates = torch.tensor([[0.0 if il in skip else 1.0 for il in range(c.n_layer)]])
    active = lora.active((torch.arange(ids.shape[1])[None, :] >= n)[..., None]) if lora is not None else None
    with torch.no_grad():
        if active is not None:
            active.__enter__()
        try:
            hid, _ = gated_forward(model, ids, torch.tensor([n]), gates if skip else None, bypass=bypass)
        finally:
            if active is not None:
                active.__exit__(None, None, None)
        ls = torch.log_softmax(_head(model, hid[0]).double(), -1)
    return np.array([float(ls[n - 1 + i, t]) for i, t in enumerate(cont)])


def test_training_forward_and_routers_equal_runtime(case):
    """first_gguf.train drives the family's own decoder layers (its masks, a rope table per block type): the
    gated forward training uses gives the runtime's log-probs with blocks skipped, without and with
    bypasses, and its router definition (block input through the block's own input norm) the runtime's
    scores."""
    from first_gguf.train import Routers, attn_normed, gated_forward

    m, skip = case.m, case.blocks((1, -1))
    bp = training_bypasses(case.bypasses, case.n_layer, case.eps)
    was = m.bypass
    try:
        for bypass in (None, bp):
            m.bypass = bypass is not None
            rt = np.array(m.score_tokens(PROMPT, CONT, skip_layers=list(skip)).logprobs)
            ours = _gated_logprobs(case, case.model, PROMPT, CONT, skip, bypass)
            d = float(np.max(np.abs(ours - rt)))
            print(f"{case.name} skip {skip} bypass {bypass is not None}: train forward vs runtime {d:.2e}")
            assert d < TOL
        m.bypass = False
        full = np.array(m.score_tokens(PROMPT, CONT).logprobs)
        assert float(np.max(np.abs(full - _gated_logprobs(case, case.model, PROMPT, CONT, ())))) < TOL
    finally:
        m.bypass = was
    r = Routers(case.n_layer, N_EMBD)
    r.weight.data = torch.tensor(np.stack([case.w[il] for il in range(case.n_layer)]))
    r.bias.data = torch.tensor([case.b[il] for il in range(case.n_layer)])
    with torch.no_grad():
        _, inputs = gated_forward(case.model, torch.tensor([PROMPT]), torch.tensor([len(PROMPT)]), capture=True)
        s = r.scores(attn_normed(case.model, inputs[: case.n_layer]), torch.ones(1, len(PROMPT), dtype=torch.bool))
    np.testing.assert_allclose(s[0].numpy(), m.score_tokens(PROMPT, CONT).router_scores, atol=1e-3)


def test_onpolicy_cached_passes_equal_the_training_forward(case):
    """The KV-cached passes of on-policy training (left-padded prompts, per-block masks with Gemma 3's
    window of 4 over a 12-token prompt, rope per block type) give the log-probs of the uncached gated
    forward, teacher and skipped with bypasses; greedy sampling follows the same model. (A cache mask
    without the window, tried, is off by > 0.1 on Gemma 3 here.)"""
    from first_gguf.train import gated_forward, prefix_forward, sample_decode, sample_prefill
    from first_gguf.train.forward import _head

    model = case.model
    prompts, conts = [list(PROMPT), PROMPT[2:9]], [list(CONT), CONT[:5]]
    skips = [case.blocks((1,)), case.blocks((0, -1))]
    gates = torch.tensor([[0.0 if il in s else 1.0 for il in range(case.n_layer)] for s in skips])
    bp = training_bypasses(case.bypasses, case.n_layer, case.eps)
    # the masks built by first_gguf.train (f16_attention makes its own); float64, so that the two paths'
    # different summation orders stay far below what a wrong mask or rope table would change
    model.set_attn_implementation("sdpa")
    model.double()
    try:
        state = sample_prefill(model, prompts, pad=0, bf16=False)
        for gt in (None, gates):
            with torch.no_grad():
                ours = torch.log_softmax(_head(model, prefix_forward(model, state, conts, gt, bypass=bp)), -1)
            for i, (p, c) in enumerate(zip(prompts, conts)):
                with torch.no_grad():
                    hid, _ = gated_forward(model, torch.tensor([p + c]), torch.tensor([len(p)]),
                                           None if gt is None else gt[i:i + 1], bypass=bp)
                    ref = torch.log_softmax(_head(model, hid[0, len(p):]), -1)
                assert torch.allclose(ours[i, : len(c)], ref, atol=1e-5), (case.name, i, gt is None)
        got = sample_decode(model, sample_prefill(model, prompts, pad=0, bf16=False), gates, max_new=6,
                            temperature=0.0, generator=None, stop_ids=set(), pad=0, bypass=bp)
        for i, p in enumerate(prompts):
            ids = list(p)
            for _ in range(6):
                with torch.no_grad():
                    hid, _ = gated_forward(model, torch.tensor([ids]), torch.tensor([len(p)]), gates[i:i + 1],
                                           bypass=bp)
                ids.append(int(_head(model, hid[0, -1]).argmax()))
            assert got[i] == ids[len(p):], (case.name, i)
    finally:
        model.float()
        model.set_attn_implementation("first_f16")


def test_decode_lora_for_the_family_equals_runtime(case, tmp_path):
    """A decode-only LoRA trained on the Hugging Face layout and written for the family's GGUF (q/k rows
    rope-permuted for llama only; Qwen and Gemma keep the Hugging Face layout): the runtime with it equals
    torch, and without it is far off (the adapter really acts, on attn_q and attn_k too)."""
    import copy

    from first_gguf.train import DecodeLora

    student = copy.deepcopy(case.model)
    lora = DecodeLora(student, 2, seed=5)
    g = torch.Generator().manual_seed(11)
    for (il, n), b in lora.b.items():
        b.data = torch.randn(b.shape, generator=g) * (0.3 if n in ("q_proj", "k_proj") else 0.05)
    path = tmp_path / f"{case.name}.lora.gguf"
    lora.save_gguf(path, student)
    from first_gguf.convert.gguf_edit import field_value, read_gguf

    assert field_value(read_gguf(path), "general.architecture") == case.arch
    m = first_gguf.load(case.base, n_ctx=512, n_threads=1, decode_lora=path)
    try:
        skip = case.blocks((1,))
        rt = np.array(m.score_tokens(PROMPT, CONT, skip_layers=list(skip)).logprobs)
        ours = _gated_logprobs(case, student, PROMPT, CONT, skip, lora=lora)
        plain = _gated_logprobs(case, student, PROMPT, CONT, skip)
        d = float(np.max(np.abs(ours - rt)))
        print(f"{case.name}: decode LoRA runtime vs torch {d:.2e} (the LoRA moves them by "
              f"{float(np.max(np.abs(plain - rt))):.2f})")
        assert d < 5 * TOL
        assert float(np.max(np.abs(plain - rt))) > 0.15
        # control: the llama rope permutation applied to this family's q/k would be wrong
        from first_gguf.convert.lora_gguf import rope_permute

        il = skip[0] ^ 1  # a block that runs (the LoRA acts in running blocks only)
        wrong = copy.deepcopy(lora)
        cfg = student.config
        wrong.b[il, "q_proj"].data = torch.tensor(rope_permute(lora.b[il, "q_proj"].detach().numpy(),
                                                               cfg.num_attention_heads))
        assert not torch.equal(wrong.b[il, "q_proj"], lora.b[il, "q_proj"])
    finally:
        m.close()
        for h in lora._hooks:
            h.remove()


def test_train_on_the_checkpoint_writes_routers_for_its_gguf(case, tmp_path):
    """`first_gguf.train` on the family's Hugging Face checkpoint (teacher-forced and on-policy steps,
    bypasses): the router file's fingerprint names the family and matches the converted GGUF (Gemma's
    output norm compared as the GGUF stores it, 1 + weight), so `first-gguf attach` accepts it and the
    runtime scores with it."""
    import random

    from first_gguf.convert.router_file import load_router_file
    from first_gguf.train import Sequence_, TrainConfig, train

    rng = random.Random(0)
    n_vocab = case.model.config.vocab_size
    seqs = [Sequence_([rng.randrange(4, n_vocab) for _ in range(rng.randint(6, 14))],
                      [rng.randrange(4, n_vocab) for _ in range(rng.randint(4, 8))], "t") for _ in range(8)]
    out = tmp_path / "r.safetensors"
    cfg = TrainConfig(model=str(case.ckpt), output=str(out), steps=3, batch_size=2, bf16=False, bypass_rank=RANK,
                      budget_min=0.25, budget_max=0.5, onpolicy_batch=2, onpolicy_tokens=4,
                      onpolicy_data="tasks", checkpoint_every=10, n_static_examples=4, threads=1)
    train(cfg, sequences=seqs, progress=False)
    rf = load_router_file(out)
    assert rf.fingerprint["architecture"] == case.arch and rf.n_layer == case.n_layer
    assert set(rf.bypasses) and all(rf.bypasses[il][0].shape == (RANK, N_EMBD) for il in rf.bypasses)
    dst = tmp_path / "attached.gguf"
    res = CliRunner().invoke(main, ["attach", str(case.base), str(out), "-o", str(dst)])
    assert res.exit_code == 0, res.output
    m = first_gguf.load(dst, n_ctx=256, n_threads=1)
    try:
        s = np.array(m.score_tokens(PROMPT, CONT).router_scores)
        assert s.shape == (case.n_layer,) and np.isfinite(s).all()
    finally:
        m.close()
