"""first_gguf.Llama, the llama-cpp-python drop-in (docs/llama_dropin.md).

* skip_budget=0 (and no skip options at all) gives stock llama-cpp-python's responses: an unpatched build
  (build/stock-venv) runs the same calls and the dicts must be equal but for id / created and the added
  "first_gguf" key, including after requests that skipped blocks (their tokens must not be reused as a
  full-depth prefix);
* with skip_budget > 0 the skipped blocks and the greedy tokens are first_gguf.Model's for the same prompt;
* the responses keep llama-cpp-python's shapes (non-streaming and stream chunks, completion and chat);
* bad options are refused with errors naming the value.
"""
from __future__ import annotations

import itertools
import json
import re
import subprocess

import pytest

from first_gguf import Llama
from first_gguf.llama import REPORT_KEY

P1 = "The capital of France is"
P2 = "def add(a, b):\n"
M1 = [{"role": "user", "content": "Name a fruit."}]
N = 16
OPTS = dict(n_ctx=512, n_threads=1, n_threads_batch=1, seed=0, verbose=False)

# The calls both sides make, in this order. Ours makes a request that skips blocks before the calls at
# SKIPPED_BEFORE (the previous call again, with skip_budget=0.3); "P1 + skipped" and "M1 + skipped" are
# filled in with what those skipped requests generated, so a later prompt starts with tokens that were
# evaluated with blocks skipped, and the budget-0 reply is stock's only if they are evaluated again.
SKIPPED_BEFORE = (2, 5, 7)
CALLS = [
    ("completion", dict(prompt=P1, max_tokens=N, temperature=0.0)),
    ("call", dict(prompt=P2, max_tokens=N, temperature=0.0, stop=["\n\n"])),
    ("completion_stream", dict(prompt=P1, max_tokens=N, temperature=0.0)),
    ("chat", dict(messages=M1, max_tokens=N, temperature=0.0)),
    ("chat_stream", dict(messages=M1, max_tokens=N, temperature=0.0)),
    ("chat", dict(messages="M1 + skipped", max_tokens=N, temperature=0.0)),
    ("generate", dict(prompt=P1, max_tokens=N)),
    ("completion", dict(prompt="P1 + skipped", max_tokens=N, temperature=0.0)),
]

STOCK_SCRIPT = r'''
import itertools, json, sys
import llama_cpp
assert "first_gguf" not in sys.modules
req = json.load(sys.stdin)
llm = llama_cpp.Llama(model_path=req["model"], **req["opts"])
out = []
for kind, kw in req["calls"]:
    if kind == "completion":
        out.append(llm.create_completion(**kw))
    elif kind == "call":
        out.append(llm(**kw))
    elif kind == "completion_stream":
        out.append(list(llm.create_completion(stream=True, **kw)))
    elif kind == "chat":
        out.append(llm.create_chat_completion(**kw))
    elif kind == "chat_stream":
        out.append(list(llm.create_chat_completion(stream=True, **kw)))
    elif kind == "generate":
        toks = llm.tokenize(kw["prompt"].encode(), add_bos=True, special=True)
        out.append([int(t) for t in itertools.islice(llm.generate(toks, temp=0.0, repeat_penalty=1.0), kw["max_tokens"])])
json.dump(out, sys.stdout)
'''


def run_call(llm, kind, kw, **skip):
    if kind == "completion":
        return llm.create_completion(**kw, **skip)
    if kind == "call":
        return llm(**kw, **skip)
    if kind == "completion_stream":
        return list(llm.create_completion(stream=True, **kw, **skip))
    if kind == "chat":
        return llm.create_chat_completion(**kw, **skip)
    if kind == "chat_stream":
        return list(llm.create_chat_completion(stream=True, **kw, **skip))
    if kind == "generate":
        toks = llm.tokenize(kw["prompt"].encode(), add_bos=True, special=True)
        return [int(t) for t in itertools.islice(llm.generate(toks, temp=0.0, repeat_penalty=1.0, **skip),
                                                 kw["max_tokens"])]
    raise AssertionError(kind)


def strip(obj, reports: list | None = None):
    """The response without the fields that differ run to run (id, created) and without first_gguf's key
    (appended to ``reports``)."""
    if isinstance(obj, list):
        return [strip(o, reports) for o in obj]
    if isinstance(obj, dict):
        d = dict(obj)
        d.pop("id", None)
        d.pop("created", None)
        rep = d.pop(REPORT_KEY, None)
        if reports is not None and "object" in obj:
            reports.append(rep)
        return d
    return obj


def shape(obj):
    """Keys and value types, recursively (list: the shapes of its items, as a set)."""
    if isinstance(obj, dict):
        return {k: shape(v) for k, v in obj.items() if k != REPORT_KEY}
    if isinstance(obj, list):
        return sorted({json.dumps(shape(v), sort_keys=True) for v in obj})
    return type(obj).__name__


@pytest.fixture(scope="module")
def llm():
    """The default model by name: its shipped sidecar (routers on every block, bypass adapters) attached."""
    m = Llama("smollm2-135m-instruct", **OPTS)
    yield m
    m.close()


@pytest.fixture(scope="module")
def ref_model():
    import first_gguf

    m = first_gguf.load("smollm2-135m-instruct", n_ctx=512, n_threads=1)
    yield m
    m.close()


@pytest.fixture(scope="module")
def stock(stock_python, base_gguf, ours):
    req = {"model": str(base_gguf), "opts": OPTS, "calls": ours[0]}
    res = subprocess.run([str(stock_python), "-c", STOCK_SCRIPT], input=json.dumps(req), capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout)


@pytest.fixture(scope="module")
def ours(llm):
    """CALLS at skip_budget 0 (alternately by default and explicitly), with skipped requests before some of
    them: the results at budget 0 must still be stock's."""
    out, skipped, calls, fill = [], [], [], {}
    for i, (kind, kw) in enumerate(CALLS):
        if i in SKIPPED_BEFORE:  # a request that skips blocks, leaving tokens evaluated with skipped blocks behind
            pkind, pkw = calls[-1]
            res = run_call(llm, pkind, pkw, skip_budget=0.3)
            skipped.append((pkind, res, llm.last_skip_report))
            if pkind == "generate":
                fill["P1 + skipped"] = P1 + llm.detokenize(res).decode("utf-8")
            elif pkind == "chat_stream":
                reply = "".join(c["choices"][0]["delta"].get("content", "") for c in res)
                fill["M1 + skipped"] = M1 + [{"role": "assistant", "content": reply},
                                             {"role": "user", "content": "And a colour?"}]
        kw = {k: fill.get(v, v) if isinstance(v, str) else v for k, v in kw.items()}
        calls.append((kind, kw))
        out.append(run_call(llm, kind, kw, **({} if i % 2 else {"skip_budget": 0.0})))
    return calls, out, skipped


@pytest.mark.reference
def test_budget0_equals_stock(ours, stock, llm):
    _, results, _ = ours
    assert len(results) == len(stock)
    for (kind, _kw), got, want in zip(CALLS, results, stock):
        reports = []
        assert strip(got, reports) == strip(want), kind
        if kind != "generate":
            assert reports and all(r == {"skipped_layers": [], "skip_budget": 0.0, "skip_strategy": "router",
                                         "n_skip_requested": 0, "bypassed_layers": []} for r in reports), kind
        if kind in ("completion", "call", "chat"):
            text = got["choices"][0].get("text", got["choices"][0].get("message", {}).get("content"))
            assert text.strip(), f"{kind} generated nothing: a vacuous comparison"


@pytest.mark.reference
def test_response_shapes_are_llama_cpp_pythons(ours, stock):
    """Every response and stream chunk has the keys and value types of stock's, skipping or not."""
    _, results, skipped = ours
    for (kind, _kw), got, want in zip(CALLS, results, stock):
        assert shape(got) == shape(want), kind
    by_kind = {kind: want for (kind, _), want in zip(CALLS, stock)}
    for kind, s, _report in skipped:
        assert shape(s) == shape(by_kind[kind]), kind


def test_skipped_requests_report_their_blocks(ours, llm):
    _, _, skipped = ours
    k = llm.n_skip_for_budget(0.3)
    assert k == 9
    assert [kind for kind, _, _ in skipped] == ["call", "chat_stream", "generate"]
    for kind, s, report in skipped:
        chunks = [{REPORT_KEY: report}] if kind == "generate" else s if isinstance(s, list) else [s]
        for c in chunks:
            rep = c[REPORT_KEY]
            assert rep == report
            assert rep["skip_budget"] == 0.3 and rep["skip_strategy"] == "router" and rep["n_skip_requested"] == k
            assert len(rep["skipped_layers"]) == k and rep["skipped_layers"] == sorted(rep["skipped_layers"])
            assert set(rep["bypassed_layers"]) <= set(rep["skipped_layers"]) and rep["bypassed_layers"]
        assert len({json.dumps(c[REPORT_KEY]) for c in chunks}) == 1  # one choice per request


def _text(res):
    ch = res["choices"][0]
    return ch["text"] if "text" in ch else ch["message"]["content"]


@pytest.mark.parametrize("budget,strategy", [(0.3, "router"), (0.2, "static"), (0.1, "last")])
def test_completion_skips_what_model_skips(llm, ref_model, budget, strategy):
    """Same prompt, budget and strategy: first_gguf.Model's blocks, greedy tokens and text."""
    gen = ref_model.generate(P1, budget, max_tokens=N, skip_strategy=strategy)
    res = llm.create_completion(P1, max_tokens=N, temperature=0.0, skip_budget=budget, skip_strategy=strategy)
    rep = res[REPORT_KEY]
    assert gen.skipped_layers and rep["skipped_layers"] == gen.skipped_layers
    assert rep["bypassed_layers"] == gen.bypassed_layers and rep["n_skip_requested"] == gen.n_skip_requested
    assert rep["skip_strategy"] == gen.skip_strategy
    assert _text(res) == gen.text
    assert res["usage"]["completion_tokens"] == len(gen.tokens)
    toks = llm.tokenize(P1.encode(), add_bos=True, special=True)
    ids = list(itertools.islice(llm.generate(toks, temp=0.0, repeat_penalty=1.0, skip_budget=budget,
                                             skip_strategy=strategy), len(gen.tokens)))
    assert ids == gen.tokens
    assert llm.last_skip_report["skipped_layers"] == gen.skipped_layers


def test_chat_skips_what_model_skips(llm, ref_model):
    """The chat prompt llama-cpp-python renders, skipped as Model skips it (the routers see the whole prompt,
    template included); streaming gives the same text and report as the whole response."""
    res = llm.create_chat_completion(M1, max_tokens=N, temperature=0.0, skip_budget=0.3)
    n_prompt = res["usage"]["prompt_tokens"]
    prompt = [int(t) for t in llm.input_ids[:n_prompt]]
    gen = ref_model.generate_tokens(prompt, 0.3, max_tokens=N)
    assert res[REPORT_KEY]["skipped_layers"] == gen.skipped_layers and gen.skipped_layers
    assert res["choices"][0]["message"]["content"] == gen.text
    assert res["usage"]["completion_tokens"] == len(gen.tokens)
    chunks = list(llm.create_chat_completion(M1, max_tokens=N, temperature=0.0, skip_budget=0.3, stream=True))
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == gen.text
    assert all(c[REPORT_KEY] == res[REPORT_KEY] for c in chunks)


def test_prompt_continuing_a_skipped_generation_is_full_depth(llm, ref_model):
    """A prompt that starts with a skipped generation's prompt and text: the skipped tokens are evaluated
    again at full depth, so the budget-0 reply is the full-depth model's (Model's, which equals stock)."""
    first = llm.create_completion(P1, max_tokens=N, temperature=0.0, skip_budget=0.3)
    cont = P1 + _text(first)
    res = llm.create_completion(cont, max_tokens=N, temperature=0.0)
    assert _text(res) == ref_model.generate(cont, 0.0, max_tokens=N).text
    assert res[REPORT_KEY]["skipped_layers"] == []
    llm.create_completion(P1, max_tokens=N, temperature=0.0, skip_budget=0.3)
    assert llm.n_tokens > len(llm.tokenize(P1.encode())) and llm._first_n_clean < llm.n_tokens
    state = llm.save_state()  # a saved state never carries the tokens evaluated with skipped blocks
    assert state.n_tokens == llm._first_n_clean == first["usage"]["prompt_tokens"]


def test_ram_cache_with_skipping(llm, ref_model):
    """llama-cpp-python's LlamaRAMCache: a state saved after a skipped request holds only the full-depth
    prefix and its router scores, so a prompt restored from it continues at full depth and skips the blocks
    Model skips for the whole prompt."""
    from llama_cpp import LlamaRAMCache

    llm.set_cache(LlamaRAMCache(capacity_bytes=1 << 30))
    try:
        first = llm.create_completion(P1, max_tokens=N, temperature=0.0, skip_budget=0.3)
        cont = P1 + _text(first)
        llm.reset()  # the next prompt's prefix comes from the cache
        res = llm.create_completion(cont, max_tokens=N, temperature=0.0)
        assert _text(res) == ref_model.generate(cont, 0.0, max_tokens=N).text
        llm.reset()
        res = llm.create_completion(cont, max_tokens=N, temperature=0.0, skip_budget=0.3)
        gen = ref_model.generate(cont, 0.3, max_tokens=N)
        assert res[REPORT_KEY]["skipped_layers"] == gen.skipped_layers and _text(res) == gen.text
    finally:
        llm.set_cache(None)


def test_stream_equals_whole_response_when_skipping(llm):
    whole = llm(P2, max_tokens=N, temperature=0.0, stop=["\n\n"], skip_budget=0.2, skip_strategy="static")
    chunks = list(llm(P2, max_tokens=N, temperature=0.0, stop=["\n\n"], skip_budget=0.2, skip_strategy="static",
                      stream=True))
    assert "".join(c["choices"][0]["text"] for c in chunks) == _text(whole)
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert all(c[REPORT_KEY] == whole[REPORT_KEY] for c in chunks)
    assert whole[REPORT_KEY]["skipped_layers"] == sorted(llm.static_rankings[next(iter(llm.static_rankings))][:6])


def test_auto_strategy_is_reported_resolved(llm):
    res = llm.create_completion(P1, max_tokens=2, temperature=0.0, skip_budget=0.1, skip_strategy="auto")
    assert res[REPORT_KEY]["skip_strategy"] == "router" and len(res[REPORT_KEY]["skipped_layers"]) == 3


# ------------------------------------------------------------------- errors
@pytest.mark.parametrize("budget,exc", [(1.0, ValueError), (-0.1, ValueError), (1.5, ValueError),
                                        ("0.3", TypeError), (True, TypeError)])
def test_bad_skip_budget(llm, budget, exc):
    for call in (lambda **k: llm.create_completion(P1, max_tokens=2, **k),
                 lambda **k: llm(P1, max_tokens=2, **k),
                 lambda **k: llm.create_chat_completion(M1, max_tokens=2, **k)):
        for stream in (False, True):  # refused before a stream is returned
            with pytest.raises(exc, match="skip_budget") as ei:
                call(skip_budget=budget, stream=stream)
            assert repr(budget) in str(ei.value)
    assert llm._first_pending is None and llm._first_state is None


def test_unknown_strategy(llm):
    with pytest.raises(ValueError, match=r"unknown skip_strategy 'fastest'.*router.*static"):
        llm.create_chat_completion(M1, max_tokens=2, skip_budget=0.2, skip_strategy="fastest")
    with pytest.raises(TypeError, match="skip_strategy must be a str"):
        llm.create_completion(P1, max_tokens=2, skip_budget=0.2, skip_strategy=3)


def test_routers_file_missing(base_gguf, tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ValueError, match=re.escape(f"router sidecar not found: {missing}")):
        Llama(str(base_gguf), routers=missing, **OPTS)


def test_unknown_model_name():
    with pytest.raises(ValueError, match=r"unknown model name 'smollm9'.*smollm2-135m-instruct"):
        Llama("smollm9", **OPTS)
    with pytest.raises(ValueError, match="Model path does not exist"):  # a path: llama-cpp-python's words
        Llama("/nonexistent/model.gguf", **OPTS)


def test_plain_gguf_without_routers(base_gguf):
    """A path loads as in llama-cpp-python (no sidecar): router skipping is refused, naming the file;
    skip_strategy='last' works."""
    m = Llama(str(base_gguf), **OPTS)
    try:
        assert m.n_routers == 0 and m.routers_path is None
        with pytest.raises(ValueError, match=re.escape(f"{base_gguf} has no router tensors")):
            m.create_completion(P1, max_tokens=2, skip_budget=0.2)
        res = m.create_completion(P1, max_tokens=3, temperature=0.0, skip_budget=0.1, skip_strategy="last")
        assert res[REPORT_KEY]["skipped_layers"] == [27, 28, 29] and res[REPORT_KEY]["bypassed_layers"] == []
    finally:
        m.close()


def test_sidecar_as_model_is_refused(llm):
    with pytest.raises(ValueError, match="is a first-gguf sidecar, not a model"):
        Llama(str(llm.routers_path), **OPTS)


def test_unsupported_architecture_refuses_skipping(base_gguf, tmp_path):
    """A model the skip patch does not cover answers at budget 0 and refuses skipping, naming the
    architecture (the default model relabelled 'exaone', as in test_errors.py)."""
    from first_gguf.convert.gguf_edit import _copy_kv, read_gguf, rewrite_gguf

    r = read_gguf(base_gguf)
    kv = {"exaone" + f.name[len("llama"):]: _copy_kv(f) for f in r.fields.values() if f.name.startswith("llama.")}
    path = rewrite_gguf(base_gguf, tmp_path / "exaone.gguf", set_kv=kv, drop_kv=lambda k: k.startswith("llama."),
                        arch="exaone")
    m = Llama(str(path), **OPTS)
    try:
        assert not m.supports_skip
        assert m.create_completion(P1, max_tokens=2, temperature=0.0)[REPORT_KEY]["skipped_layers"] == []
        with pytest.raises(ValueError, match="architecture 'exaone' is not covered by the layer-skip patch"):
            m.create_completion(P1, max_tokens=2, skip_budget=0.2, skip_strategy="last")
    finally:
        m.close()


# ------------------------------------------------------------------- low-level use after skipped requests
def test_generate_without_reset_keeps_the_skipped_tokens(llm):
    """generate(reset=False) after a skipped generate continues after everything evaluated, as stock does:
    the tokens evaluated with skipped blocks stay in the context, evaluated again at full depth."""
    toks = llm.tokenize(b"Once upon a time, in a land far away,")
    g = llm.generate(toks, temp=0.0, repeat_penalty=1.0, skip_budget=0.3)
    first = list(itertools.islice(g, 3))
    g.close()
    assert llm.input_ids[:llm.n_tokens].tolist() == toks + first[:2]  # the third was sampled, never evaluated
    cont = list(itertools.islice(llm.generate([11], temp=0.0, repeat_penalty=1.0, reset=False), 4))
    ctx = toks + first[:2] + [11]
    assert llm.input_ids[:llm.n_tokens].tolist() == ctx + cont[:3]
    assert llm._first_n_clean == llm.n_tokens  # all of it at full depth
    # the same tokens from the full model with nothing cached: a reused skipped K/V would differ
    llm.reset()
    assert list(itertools.islice(llm.generate(ctx, temp=0.0, repeat_penalty=1.0), 4)) == cont


def _low_level(llm, toks, n=6):
    """llama-cpp-python's low-level loop (its README): reset, eval the prompt, sample and eval."""
    llm.reset()
    llm.eval(toks)
    out = []
    for _ in range(n):
        t = llm.sample(temp=0.0, repeat_penalty=1.0)
        out.append(t)
        llm.eval([t])
    return out


def test_a_kept_skipped_stream_does_not_skip_low_level_evaluation(llm):
    """A skipped stream that is kept but not finished (a client that went away) does not leave its blocks
    skipped: eval()/sample() and embeddings between its chunks run the full model, prompt included."""
    toks = llm.tokenize(P1.encode())
    base = _low_level(llm, toks)
    st = llm.create_completion("Once upon a time", max_tokens=20, temperature=0.0, stream=True, skip_budget=0.5)
    chunks = [next(st), next(st)]
    assert chunks[0][REPORT_KEY]["skipped_layers"]
    assert _low_level(llm, toks) == base
    g = llm.generate(llm.tokenize(b"Once upon a time"), temp=0.0, skip_budget=0.5)
    next(g)
    llm.reset()
    assert llm._first_state is None and llm._first_mask == ()
    assert _low_level(llm, toks) == base
    g.close()
    st.close()
    assert _low_level(llm, toks) == base


def test_auto_without_routers_or_rankings_says_so(base_gguf):
    m = Llama(str(base_gguf), **OPTS)
    try:
        assert not m.static_rankings
        with pytest.raises(ValueError, match="neither routers nor a static ranking.*'last'.*'random'"):
            m.create_completion(P1, max_tokens=2, skip_budget=0.2, skip_strategy="auto")
    finally:
        m.close()
