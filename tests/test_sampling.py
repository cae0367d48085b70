"""Sampling on llama.cpp's sampler chain, argument checks, a closed Model, the skip shortfall warning."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

import first_gguf

MSG = [{"role": "user", "content": "Name a fruit."}]


@pytest.fixture(scope="module")
def m(base_gguf):
    model = first_gguf.load(base_gguf, n_ctx=1024, n_threads=1)
    yield model
    model.close()


def _first_logits(m, messages=MSG):
    tokens, _ = m.chat_prompt_tokens(messages)
    m.reset()
    with m.decoding(tokens) as d:
        return d.logits.astype(np.float64)


# ------------------------------------------------------------- greedy and the chain
def test_chain_greedy_equals_the_argmax_path(m):
    """temperature 0 takes np.argmax; a chain with a neutral bias ends in llama.cpp's greedy sampler: same tokens."""
    plain = m.chat(MSG, max_tokens=24)
    chain = m.chat(MSG, max_tokens=24, logit_bias={0: 0.0})
    assert plain.seed is None and len(plain.tokens) > 5
    assert chain.tokens == plain.tokens


def test_greedy_tokens_are_the_argmax_of_the_teacher_forced_logits(m):
    """Independent of the sampler: each greedy token is the argmax of its position's logits (Model.score)."""
    g = m.generate("The capital of France is", max_tokens=8)
    p = m.tokenize("The capital of France is")
    lp = m.score_tokens(p, g.tokens).logprobs
    for i, t in enumerate(g.tokens):
        with m.decoding(p + g.tokens[:i]) as d:
            assert int(np.argmax(d.logits)) == t
    assert all(x < 0 for x in lp)


def test_top_k_1_is_greedy_at_any_temperature(m):
    greedy = m.chat(MSG, max_tokens=16)
    assert m.chat(MSG, max_tokens=16, temperature=1.7, top_k=1, seed=3).tokens == greedy.tokens


def test_seeded_request_does_not_reuse_a_cached_prefix(m):
    """KV cached by another batch shape moves the logits (quantized kernels differ between one token and a
    batch), enough to change a sampled token: a seeded request evaluates its whole prompt even when the
    cache holds its prefix; an unseeded or greedy one keeps reusing it."""
    prompt = "The sea is"
    n = len(m.tokenize(prompt))
    a = m.generate(prompt, max_tokens=24, temperature=1.0, seed=7)
    m.generate(prompt + " deep and", max_tokens=4)          # the cache now holds a's prompt as a prefix
    b = m.generate(prompt, max_tokens=24, temperature=1.0, seed=7)
    assert b.tokens == a.tokens and b.n_prefill_tokens == n
    m.generate(prompt + " deep and", max_tokens=4)
    assert m.generate(prompt, max_tokens=4).n_prefill_tokens < n  # greedy: the prefix is reused


def test_seed_reproduces_whatever_ran_before(m, base_gguf):
    kw = dict(max_tokens=20, temperature=1.0, top_p=0.95, seed=1234)
    a = m.chat(MSG, **kw)
    m.chat(MSG, max_tokens=8, temperature=1.0)            # draws from the model's generator
    m.chat([{"role": "user", "content": "Something else."}], max_tokens=8, temperature=0.9, seed=7)
    b = m.chat(MSG, **kw)
    assert a.tokens == b.tokens and a.seed == b.seed == 1234
    texts = {tuple(m.chat(MSG, max_tokens=20, temperature=1.0, seed=s).tokens) for s in range(6)}
    assert len(texts) > 1  # the seed matters: this is sampling
    fresh = first_gguf.load(base_gguf, n_ctx=256, n_threads=1)
    try:
        assert fresh.chat(MSG, **kw).tokens == a.tokens
    finally:
        fresh.close()


def test_sampled_first_token_follows_top_k_softmax(m):
    """Empirical first-token frequencies over 300 seeds against numpy's softmax of the top 4 logits at T=1.3."""
    x = _first_logits(m)
    top = np.argsort(-x)[:4]
    p = np.exp((x[top] - x[top].max()) / 1.3)
    p /= p.sum()
    counts = {int(t): 0 for t in top}
    for s in range(300):
        t = m.chat(MSG, max_tokens=1, temperature=1.3, top_k=4, seed=s).tokens[0]
        counts[t] += 1  # KeyError: a token outside the top 4
    freq = np.array([counts[int(t)] for t in top]) / 300
    assert np.abs(freq - p).max() < 0.08, (freq, p)


def test_min_p_drops_unlikely_tokens(m):
    x = _first_logits(m)
    p = np.exp(x - x.max())
    allowed = set(np.flatnonzero(p >= 0.3).tolist())  # min_p 0.3: p >= 0.3 * p_max
    got = {m.chat(MSG, max_tokens=1, temperature=2.0, min_p=0.3, seed=s).tokens[0] for s in range(40)}
    assert got <= allowed


def test_logit_bias_bans_the_greedy_token(m):
    g = m.chat(MSG, max_tokens=4)
    banned = m.chat(MSG, max_tokens=4, logit_bias={g.tokens[0]: -100})
    assert banned.tokens[0] != g.tokens[0]
    x = _first_logits(m)
    x[g.tokens[0]] = -np.inf
    assert banned.tokens[0] == int(np.argmax(x))  # the next best, as numpy says


def test_repeat_penalty_changes_a_looping_reply(m):
    plain = m.generate("one one one one one one one", max_tokens=12)
    pen = m.generate("one one one one one one one", max_tokens=12, repeat_penalty=1.8)
    assert plain.tokens != pen.tokens


def test_logprobs_are_the_log_softmax_of_each_steps_logits(m):
    g = m.chat(MSG, max_tokens=10, logprobs=3)
    assert len(g.logprobs) == len(g.tokens) > 5
    tokens, _ = m.chat_prompt_tokens(MSG)
    m.reset()
    with m.decoding(tokens) as d:  # the same one-token steps, log-softmax in numpy
        for lp, t in zip(g.logprobs, g.tokens):
            x = d.logits.astype(np.float64)
            ls = x - x.max() - math.log(np.exp(x - x.max()).sum())
            order = np.argsort(-ls)[:3]
            assert lp.token == t and abs(lp.logprob - ls[t]) < 1e-9
            assert [u for u, _ in lp.top] == order.tolist() and np.allclose([v for _, v in lp.top], ls[order])
            d.step(t)
    # teacher-forced in one batch: equal up to kernel rounding. A batch takes other matmul paths (activation
    # quantization and accumulation order) than one-token steps; on AVX-512 machines (Intel and AMD EPYC) the
    # measured differences are 0.01-0.03 nats on average and up to 0.16 at single positions of this Q4_1
    # model, while a misaligned or wrongly masked position is off by nats: bound the mean tightly, the max loosely
    ref = np.array(m.score_tokens(tokens, g.tokens).logprobs)
    diff = np.abs(np.array([x.logprob for x in g.logprobs]) - ref)
    assert diff.mean() < 0.08 and diff.max() < 0.5, diff


def test_grammar_string_and_llama_grammar(m):
    from llama_cpp.llama_grammar import LlamaGrammar

    g = m.chat(MSG, max_tokens=8, grammar='root ::= "apple" | "pear"')
    assert g.text in ("apple", "pear") and g.finish_reason == "stop"
    g = m.chat(MSG, max_tokens=8, temperature=0.8, seed=1, grammar=LlamaGrammar.from_string('root ::= [0-9] [0-9]'))
    assert len(g.text) == 2 and g.text.isdigit()
    with pytest.raises(ValueError, match="grammar is not valid GBNF"):
        m.chat(MSG, grammar="root ::= (")


def test_importing_llama_cpp_loads_no_second_libllama(m):
    import sys

    import llama_cpp
    import llama_cpp.llama_grammar  # noqa: F401

    from first_gguf import _lib

    assert sys.modules["llama_cpp.llama_cpp"] is _lib.llama_cpp and llama_cpp.llama_cpp._lib is _lib.lib
    maps = open("/proc/self/maps").read()
    libs = {line.split()[-1] for line in maps.splitlines() if "/libllama.so" in line}
    assert len(libs) == 1, libs


# ------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("kw,exc,words", [
    (dict(temperature=-1), ValueError, "temperature must be in [0, inf); got -1"),
    (dict(temperature="hot"), TypeError, "temperature must be a number in [0, inf); got 'hot'"),
    (dict(top_p=0), ValueError, "top_p must be in (0, 1]; got 0"),
    (dict(top_p=1.5), ValueError, "top_p must be in (0, 1]; got 1.5"),
    (dict(top_k=-1), ValueError, "top_k must be in [0, inf); got -1"),
    (dict(top_k=2.5), TypeError, "top_k must be an integer in [0, inf); got 2.5"),
    (dict(min_p=1.2), ValueError, "min_p must be in [0, 1]; got 1.2"),
    (dict(typical_p=0.0), ValueError, "typical_p must be in (0, 1]; got 0.0"),
    (dict(repeat_penalty=0), ValueError, "repeat_penalty must be in (0, inf); got 0"),
    (dict(presence_penalty=3), ValueError, "presence_penalty must be in [-2, 2]; got 3"),
    (dict(frequency_penalty=math.nan), ValueError, "frequency_penalty must be in [-2, 2]; got nan"),
    (dict(seed=-2), ValueError, "seed must be in [0, 4294967294] or -1 (a random seed); got -2"),
    (dict(seed=2 ** 32), ValueError, "seed must be in [0, 4294967294]"),
    (dict(logprobs=21), ValueError, "logprobs must be in [0, 20]; got 21"),
    (dict(logit_bias={10 ** 6: 1.0}), ValueError, "logit_bias key 1000000 is not a token id"),
    (dict(logit_bias={1: 500}), ValueError, "logit_bias[1] must be a number in [-100, 100]; got 500"),
    (dict(logit_bias=[1]), TypeError, "logit_bias must be a dict"),
    (dict(grammar=5), TypeError, "grammar must be a GBNF string or a llama_cpp.LlamaGrammar; got 5"),
    (dict(stop=5), TypeError, "stop must be a str or a list of str; got 5"),
    (dict(stop=["x", 3]), TypeError, "stop must be a str or a list of str; got ['x', 3]"),
    (dict(max_tokens=0), ValueError, "max_tokens must be >= 1; got 0"),
    (dict(top_q=0.5), TypeError, "unknown option 'top_q'"),
])
def test_bad_sampling_arguments_fail_before_the_stream_starts(m, kw, exc, words):
    for call in (lambda: m.stream_chat(MSG, **kw), lambda: m.stream_generate("Hi", **kw),
                 lambda: m.chat(MSG, **kw)):
        with pytest.raises(exc) as ei:
            call()  # the streaming forms raise here, not at the first next()
        assert words in str(ei.value)


def test_top_p_wording_is_one_everywhere(m):
    """The API, the CLI and the server (test_server.py) state one range for top_p."""
    from click.testing import CliRunner

    from first_gguf.cli import main
    from first_gguf.sampling import range_text

    assert range_text("top_p") == "(0, 1]"
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]; got 0"):
        m.generate("Hi", top_p=0)
    res = CliRunner().invoke(main, ["generate", "hi", "--top-p", "0", "--model", "/no/such.gguf"])
    assert res.exit_code == 1 and "--top-p: top_p must be in (0, 1]; got 0.0" in res.output, res.output


def test_n_threads_is_bounded(base_gguf):
    import os

    hi = 4 * os.cpu_count()
    for n in (0, hi + 1, 100000):
        with pytest.raises(ValueError, match=rf"n_threads must be in \[1, {hi}\].*got {n}"):
            first_gguf.load(base_gguf, n_threads=n)


def test_a_closed_model_says_so_everywhere(base_gguf):
    c = first_gguf.load(base_gguf, n_ctx=128, n_threads=1)
    c.close()
    calls = {
        "reset": lambda: c.reset(), "generate": lambda: c.generate("Hi"), "chat": lambda: c.chat(MSG),
        "stream_generate": lambda: c.stream_generate("Hi"), "stream_chat": lambda: c.stream_chat(MSG),
        "score": lambda: c.score("a", "b"), "score_tokens": lambda: c.score_tokens([1], [2]),
        "tokenize": lambda: c.tokenize("x"), "detokenize": lambda: c.detokenize([1]),
        "bypass": lambda: c.bypass, "set bypass": lambda: setattr(c, "bypass", False),
        "check_skip": lambda: c.check_skip(0.1), "decoding": lambda: c.decoding([1]),
        "generate_tokens": lambda: c.generate_tokens([1, 2]), "layer_inputs": lambda: c.layer_inputs("x", [0]),
        "chat_prompt_tokens": lambda: c.chat_prompt_tokens(MSG), "make_sampler": lambda: c.make_sampler(),
        "cached_router_scores": lambda: c.cached_router_scores(), "token_bytes": lambda: c.token_bytes(1),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match="model is closed"):
            call()
            pytest.fail(name)
    c.close()  # twice is fine


# -------------------------------------------------------------- skip shortfall
def test_fewer_blocks_than_the_budget_asks_warns_once_and_is_reported(base_gguf, tmp_path):
    from first_gguf.convert.attach import attach

    path = attach(base_gguf, tmp_path / "short.gguf",
                  rankings={"short": {"ranking": [3, 7], "method": "test"}})
    s = first_gguf.load(path, n_ctx=256, n_threads=1)
    try:
        with pytest.warns(UserWarning, match=r"asks for 6 skipped blocks but skip_strategy 'short' can skip only 2"):
            g = s.generate("Hi", 0.2, max_tokens=2, skip_strategy="short")
        assert g.skipped_layers == [3, 7] and g.n_skip_requested == 6
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            g = s.generate("Hi", 0.2, max_tokens=2, skip_strategy="short")  # once only
            full = s.generate("Hi", 0.05, max_tokens=2, skip_strategy="short")  # k = 1: no shortfall
        assert g.n_skip_requested == 6 and full.n_skip_requested == 1 == len(full.skipped_layers)
    finally:
        s.close()


def test_a_cut_inside_a_multibyte_character_drops_its_bytes(m):
    """max_tokens (or an end-of-generation token) ending a reply inside a character: its incomplete bytes are
    dropped, as llama-cpp-python drops them, streamed or not; never a U+FFFD."""
    prompt = m.tokenize("Hi")
    emoji = m.tokenize("🙂", add_bos=False)
    nihon = m.tokenize("日本", add_bos=False)
    assert len(emoji) == 2 and len(nihon) == 3  # the tokenizer splits them inside the UTF-8 bytes

    def forced(tokens):
        it = iter(tokens)
        return lambda logits: next(it)

    eos = m._llama.token_eos()
    for tokens, n, want in [(emoji, 1, ""), (emoji, 2, "🙂"), (nihon, 1, ""), (nihon, 2, "日"), (nihon, 3, "日本"),
                            ([*nihon[:1], eos], 5, "")]:
        g = m.generate_tokens(prompt, max_tokens=n, sampler=forced(tokens))
        assert g.text == want, (tokens, n, g.text)
        chunks = list(m.stream_tokens(prompt, max_tokens=n, sampler=forced(tokens)))
        assert "".join(c.text for c in chunks) == want and chunks[-1].generation.text == want
        g = m.generate_tokens(prompt, max_tokens=n, sampler=forced(tokens), stop="\n")  # the held-back path
        assert g.text == want


def test_seed_minus_one_is_a_random_seed_that_is_reported(m, base_gguf):
    """seed=-1 (and 0xFFFFFFFF, LLAMA_DEFAULT_SEED) is llama.cpp's and llama-cpp-python's "random seed": a seed
    drawn from the OS, reported in Generation.seed, which replays the reply."""
    from first_gguf.sampling import SEED_MAX

    g1 = m.chat(MSG, max_tokens=8, temperature=1.0, seed=-1)
    g2 = m.chat(MSG, max_tokens=8, temperature=1.0, seed=0xFFFFFFFF)
    assert all(isinstance(g.seed, int) and 0 <= g.seed <= SEED_MAX for g in (g1, g2))
    assert g1.seed != g2.seed  # 1 in 4e9 to collide
    assert m.chat(MSG, max_tokens=8, temperature=1.0, seed=g1.seed).tokens == g1.tokens
    with first_gguf.load(base_gguf, n_ctx=64, n_threads=1, seed=-1) as m2:
        assert 0 <= m2.seed <= SEED_MAX
    with pytest.raises(ValueError, match=r"seed must be >= 0 or -1 \(a random seed\); got -2"):
        first_gguf.load(base_gguf, n_ctx=64, n_threads=1, seed=-2)


def test_streaming_holds_back_only_a_tail_that_may_start_a_stop_string(m):
    """With a stop string, each chunk carried its token's text only after a fixed lag (the longest stop's
    length - 1); now a chunk holds back only a tail that is a prefix of a stop string, as llama-cpp-python."""
    prompt = m.tokenize("Hi")
    words = m.tokenize(" one two QQ three four", add_bos=False)
    assert [m.token_bytes(t).decode() for t in words] == [" one", " two", " Q", "Q", " three", " four"]

    def forced():
        it = iter(words)
        return lambda logits: next(it)

    chunks = list(m.stream_tokens(prompt, max_tokens=len(words), sampler=forced(), stop=["QQQ", "#####"]))
    assert [c.token for c in chunks] == [*words, None]
    # " Q" and "Q" may start "QQQ": held until " three" shows they do not
    assert [c.text for c in chunks] == [" one", " two", " ", "", "QQ three", " four", ""]
    assert chunks[-1].generation.text == " one two QQ three four"
    # a stop string that is found is cut, whatever was held
    g = m.generate_tokens(prompt, max_tokens=len(words), sampler=forced(), stop=["QQ th"])
    assert g.text == " one two " and g.finish_reason == "stop"


def test_the_sampling_vocabulary_is_defined_once():
    """sampling.py holds the option names, defaults and chat defaults; Model's explicit signatures, the CLI's
    options, the server's fields and the benchmark's sampled run agree with them."""
    import dataclasses
    import inspect

    from click.testing import CliRunner

    pytest.importorskip("fastapi")
    from first_gguf import bench, cli, server
    from first_gguf.model import Model
    from first_gguf.sampling import CHAT_DEFAULTS, NUMERIC_OPTIONS, SAMPLING_KEYWORDS, SamplingParams

    defaults = {f.name: f.default for f in dataclasses.fields(SamplingParams)}
    defaults["logit_bias"] = None
    for method in (Model.generate,):
        sig = inspect.signature(method).parameters
        assert {k: sig[k].default for k in SAMPLING_KEYWORDS} == defaults, method.__name__
    assert set(server.SAMPLING_FIELDS) == set(NUMERIC_OPTIONS) | {"seed", "logit_bias"}
    assert bench.SAMPLED == {**CHAT_DEFAULTS, "seed": 0}
    for cmd, want in (("generate", {}), ("chat", CHAT_DEFAULTS)):
        params = {p.name: p for p in cli.main.commands[cmd].params}
        for name in NUMERIC_OPTIONS:
            assert params[name].default == want.get(name, defaults[name]), (cmd, name)
    out = CliRunner().invoke(cli.main, ["generate", "--help"]).output
    assert all("--" + n.replace("_", "-") in out for n in NUMERIC_OPTIONS)
    with pytest.raises(TypeError, match="unknown sampling option 'top_q'"):
        SamplingParams.check(100, top_q=0.5)
