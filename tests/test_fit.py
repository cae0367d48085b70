"""first-gguf fit: closed-form bypasses, per-prompt block costs, ridge routers (first_gguf/fit.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from first_gguf.fit import Moments, fit_routers, parse_blocks, rmsnorm, solve_bypass, spearman


def test_solve_bypass_recovers_a_low_rank_map_and_is_the_best_of_its_rank():
    rng = np.random.default_rng(0)
    n, d, r = 4000, 24, 3
    x = rng.standard_normal((n, d)) * rng.uniform(0.2, 3.0, d)        # anisotropic inputs
    a, b = rng.standard_normal((d, r)), rng.standard_normal((r, d))
    dlt = x @ a @ b + 0.05 * rng.standard_normal((n, d))
    down, up, r2 = solve_bypass(x.T @ x, x.T @ dlt, float((dlt ** 2).sum()), n, rank=r, ridge=1e-9)
    assert down.shape == (r, d) and up.shape == (d, r)
    w = (up @ down).T                                                  # dlt ~ x @ w
    assert np.abs(w - a @ b).max() / np.abs(a @ b).max() < 0.02
    resid = ((x @ w - dlt) ** 2).sum() / (dlt ** 2).sum()
    assert r2 == pytest.approx(1 - resid, abs=1e-6) and r2 > 0.99
    # with a rank below the truth, reduced-rank regression beats truncating the least-squares map's SVD
    full = np.linalg.lstsq(x, dlt, rcond=None)[0]
    u, s, vt = np.linalg.svd(full)
    trunc = (u[:, :2] * s[:2]) @ vt[:2]
    down2, up2, _ = solve_bypass(x.T @ x, x.T @ dlt, float((dlt ** 2).sum()), n, rank=2, ridge=1e-9)
    rrr = (up2 @ down2).T
    assert ((x @ rrr - dlt) ** 2).sum() <= ((x @ trunc - dlt) ** 2).sum() + 1e-6
    # the solutions are nested: the first 2 components of the rank-3 fit are the rank-2 fit (what
    # first-gguf routers ship --rank relies on to ship a lower rank of a fitted file)
    assert np.allclose(up[:, :2] @ down[:2], up2 @ down2, atol=1e-5)


def test_moments_accumulate_the_bypass_regression_and_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    states = {i: rng.standard_normal((10, 8)).astype(np.float32) for i in range(4)}
    m = Moments([0, 2], 8)
    m.add(states, slice(3, 10), 1e-5)
    x = rmsnorm(states[2][3:], 1e-5)
    assert np.allclose(x, states[2][3:] / np.sqrt((states[2][3:] ** 2).mean(-1, keepdims=True) + 1e-5))
    dlt = states[3][3:] - states[2][3:]
    assert np.allclose(m.xx[2], x.T @ x, atol=1e-4) and np.allclose(m.xd[2], x.T @ dlt, atol=1e-4)
    assert m.dd[2] == pytest.approx(float((dlt.astype(np.float64) ** 2).sum()), rel=1e-5)
    assert (m.n, m.n_prompts) == (7, 1)
    m.save(tmp_path / "m.npz")
    m2 = Moments.load(tmp_path / "m.npz")
    assert m2.blocks == [0, 2] and (m2.n, m2.n_prompts) == (7, 1) and np.array_equal(m2.xd[0], m.xd[0])


def test_ridge_routers_use_the_prompt_when_it_predicts_the_costs():
    rng = np.random.default_rng(2)
    p, b, d = 64, 6, 12
    feats = rng.standard_normal((p, b, d))
    base = np.linspace(-2, 1, b)
    costs = 3 + base + 0.8 * feats[:, :, 0] + 0.1 * rng.standard_normal((p, b))
    w, bias, rep = fit_routers(feats, costs)
    assert rep["lambda"] is not None
    best = max(rep["lambda_spearman"].values())
    assert best > rep["bias_only_spearman"] + 0.1
    pred = np.einsum("pbd,bd->pb", feats, w) + bias
    assert np.mean([spearman(pred[i], costs[i]) for i in range(p)]) > 0.8
    # costs that do not depend on the prompt: the biases alone order the blocks by mean cost
    flat = np.exp(np.tile(base, (p, 1)) + 0.01 * rng.standard_normal((p, b)))
    w, bias, rep = fit_routers(feats, flat)
    pred = np.einsum("pbd,bd->pb", feats, w) + bias
    assert all(list(np.argsort(pred[i])) == list(range(b)) for i in range(p))
    # a block cheap on most prompts and very expensive on a few: its mean cost, not its typical cost, ranks it
    skew = np.tile([0.2, 0.3, 1.0], (p, 1))
    skew[: p // 8, 0] = 4.0                       # mean 0.675, median 0.2
    w, bias, rep = fit_routers(np.zeros((p, 3, d)), skew)
    assert rep["lambda"] is None and list(np.argsort(bias)) == [1, 0, 2]


def test_parse_blocks():
    assert parse_blocks("1-", 6) == [1, 2, 3, 4]
    assert parse_blocks("3,5,7-9", 12) == [3, 5, 7, 8, 9]
    with pytest.raises(ValueError, match=r"candidate blocks 'x': 'x' is not a block index"):
        parse_blocks("x", 6)
    with pytest.raises(ValueError, match=r"must name blocks in \[0, 6\); got \[7\]"):
        parse_blocks("2,7", 6)


def test_calibration_sources_are_checked_and_taken_in_turn(monkeypatch):
    from first_gguf import fit

    assert fit.parse_sources(" chat, qa ") == ["chat", "qa"]
    with pytest.raises(ValueError, match=r"calibration sources 'chat,news'.*unknown: news"):
        fit.parse_sources("chat,news")  # a held-out source is not a calibration source
    with pytest.raises(ValueError, match=r"name a source twice"):
        fit.parse_sources("qa,qa")
    with pytest.raises(ValueError, match=r"sources 'x'"):
        fit.FitConfig(sources="x").check()
    fake = {"chat": [f"c{i}" for i in range(5)], "qa": [f"q{i}" for i in range(2)] + ["q" * (fit.MAX_PROMPT_CHARS + 1)],
            "docs": [f"d{i}" for i in range(9)]}
    monkeypatch.setattr(fit, "_source_prompts", lambda name: fake[name])
    got = fit._prompts(8, 0, "chat,qa,docs")
    assert [p[0] for p in got] == ["c", "q", "d", "c", "q", "d", "c", "d"]  # in turn; qa runs out after 2
    assert len(set(got)) == 8 and set(got[:3]) <= set(sum(fake.values(), []))
    assert fit._prompts(5, 0, "chat") == fit._prompts(5, 0, "chat")  # seeded
    assert fit._prompts(5, 0, "chat") != fit._prompts(5, 1, "chat")
    with pytest.raises(ValueError, match=r"hold 7 prompts; 9 asked for"):
        fit._prompts(9, 0, "chat,qa")


def test_chat_calibration_prompts_are_the_chat_source_in_seeded_order():
    """sources='chat' (the default) gives the prompts fit took before sources existed: old work folders resume."""
    from first_gguf.datasets.broad import chat_prompts
    from first_gguf.fit import _prompts

    rows = chat_prompts()
    assert _prompts(6, 3) == [rows[i]["prompt"] for i in np.random.default_rng(3).permutation(len(rows))[:6]]


def test_fit_on_the_default_model_end_to_end_and_resumes(tmp_path, base_gguf, monkeypatch):
    """The real model, a small fit: a router file with routers and bypasses for the candidates and the
    single_kl ranking; the sidecar attaches and the router and static strategies skip candidates only;
    a rerun in the same folder takes every stage from the cache (no generation), and other settings are
    refused."""
    import first_gguf
    from first_gguf.cli import main
    from first_gguf.convert.attach import write_sidecar
    from first_gguf.convert.router_file import load_router_file

    work, out = tmp_path / "work", tmp_path / "fit.safetensors"
    args = ["fit", "--model", str(base_gguf), "--work", str(work), "-o", str(out), "--n-prompts", "6",
            "--n-cost", "4", "--max-tokens", "12", "--rank", "4", "--candidates", "8-15", "--threads", "2"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    rf = load_router_file(out)
    cands = list(range(8, 16))
    assert sorted(rf.weights) == cands and sorted(rf.bypasses) == cands and rf.bypass_rank == 4
    ranking = rf.static_rankings["single_kl"]["ranking"]
    assert sorted(ranking) == list(range(30)) and sorted(ranking[:8]) == cands
    report = json.loads((work / "report.json").read_text())
    assert report["n_states"] > 6 * 5 and all(0 < v <= 1 for v in report["bypass_r2"].values())
    costs = report["mean_single_cost"]
    assert ranking[:8] == sorted(cands, key=lambda b: costs[str(b)])
    side = tmp_path / "fit.sidecar.gguf"
    write_sidecar(base_gguf, side, routers=rf.routers(), rankings=rf.static_rankings, bypasses=rf.bypasses)
    m = first_gguf.load(base_gguf, routers=side, n_ctx=1024, n_threads=2)
    try:
        g = m.generate("The capital of France is", 0.1, max_tokens=4)
        assert g.skip_strategy == "router" and set(g.skipped_layers) <= set(cands) and len(g.skipped_layers) == 3
        assert g.bypassed_layers == g.skipped_layers
        s = m.generate("The capital of France is", 0.1, skip_strategy="static", max_tokens=4)
        assert s.skipped_layers == sorted(ranking[:3])
    finally:
        m.close()
    # resume: nothing is generated or scored again
    from first_gguf import model as model_mod

    def boom(*a, **k):
        raise AssertionError("a resumed fit generated or scored again")

    monkeypatch.setattr(model_mod.Model, "chat", boom)
    monkeypatch.setattr(model_mod.Model, "score_tokens", boom)
    res = CliRunner().invoke(main, args + ["--force"])
    assert res.exit_code == 0, res.output
    assert load_router_file(out).static_rankings["single_kl"]["ranking"] == ranking
    res = CliRunner().invoke(main, args[:-2] + ["--temperature", "0.3", "--force"])
    assert res.exit_code != 0 and "holds a fit with other settings" in res.output and "temperature" in res.output
    res = CliRunner().invoke(main, ["fit", "--model", str(base_gguf), "--work", str(work), "-o", str(out)])
    assert res.exit_code != 0 and "output file exists" in res.output
    res = CliRunner().invoke(main, ["fit", "--model", str(tmp_path / "nope.gguf"), "--work", str(work), "-o",
                                    str(tmp_path / "x.safetensors")])
    assert res.exit_code != 0 and "nope.gguf" in res.output


def test_scaled_router_logits_make_the_runtime_order_the_ridge_prediction(tmp_path, base_gguf):
    """fit stores ROUTER_LOGIT_SCALE * (w, b): the runtime's mean of per-token sigmoids then orders blocks as
    the linear prediction w . mean_t x_t + b on fit's prompt-mean input (numpy, from the runtime's own block
    inputs), and equals 1/2 + a/4 of it; unscaled, the same routers' per-token logits span several units."""
    import first_gguf
    from first_gguf.convert.attach import write_sidecar
    from first_gguf.fit import ROUTER_LOGIT_SCALE, _norm_facts

    blocks = list(range(6, 18))
    eps, norms = _norm_facts(base_gguf, 30)
    m = first_gguf.load(base_gguf, n_ctx=512, n_threads=2)
    try:
        toks = m.prompt_tokens_for([{"role": "user", "content": "Translate to French: the file was not found."}])[0]
        states = m.layer_inputs_tokens(toks, blocks)
    finally:
        m.close()
    x = {b: rmsnorm(states[b], eps) * norms[b] for b in blocks}  # per-token router inputs [T, d]
    rng = np.random.default_rng(7)
    w = {b: rng.standard_normal(x[b].shape[1]) * 3.0 / np.linalg.norm(x[b], axis=1).mean() for b in blocks}
    bias = {b: float(rng.standard_normal()) for b in blocks}
    per_token = np.stack([x[b] @ w[b] + bias[b] for b in blocks], 1)
    assert per_token.std(0).min() > 1.0  # unscaled: logits of several units, where the sigmoid saturates
    pred = np.array([x[b].mean(0) @ w[b] + bias[b] for b in blocks])  # fit's prediction on the prompt mean
    a = ROUTER_LOGIT_SCALE
    side = tmp_path / "scaled.sidecar.gguf"
    write_sidecar(base_gguf, side, routers={b: ((a * w[b]).astype(np.float32), a * bias[b]) for b in blocks})
    m = first_gguf.load(base_gguf, routers=side, n_ctx=512, n_threads=2)
    try:
        g = m.generate_tokens(toks, 0.1, max_tokens=1)
        got = m.prompt_router_scores(len(toks))[blocks]
        assert g.skipped_layers == sorted(blocks[j] for j in np.argsort(pred)[:3])
    finally:
        m.close()
    assert list(np.argsort(got)) == list(np.argsort(pred))
    np.testing.assert_allclose(got, 0.5 + a / 4 * pred, atol=2e-3 * a * np.abs(pred).max() + 1e-5)


def test_continuation_layer_inputs_are_what_decoding_sees(tmp_path, base_gguf):
    """Full depth: the rows of one full-depth pass over prompt + continuation. A skipped block passes its
    input on through its bypass: the next block's input is h + up @ down @ rmsnorm(h) (numpy), and the
    blocks before it see the full-depth states."""
    import first_gguf
    from first_gguf.convert.attach import write_sidecar
    from first_gguf.fit import _norm_facts

    rng = np.random.default_rng(3)
    m0 = first_gguf.load(base_gguf, n_ctx=512, n_threads=1)
    d, n_layer = m0.info.n_embd, m0.n_layer
    m0.close()
    down = (rng.standard_normal((4, d)) * 0.05).astype(np.float32)
    up = (rng.standard_normal((d, 4)) * 0.05).astype(np.float32)
    side = tmp_path / "byp.sidecar.gguf"
    write_sidecar(base_gguf, side, routers={}, bypasses={10: (down, up)})
    eps, _ = _norm_facts(base_gguf, n_layer)
    m = first_gguf.load(base_gguf, routers=side, n_ctx=512, n_threads=1)
    try:
        p = m.tokenize("Name three colours of the rainbow.")
        c = m.tokenize(" Red, orange and yellow are three of them.", add_bos=False)
        layers = [5, 10, 11, 12]
        full, skipped = m.continuation_layer_inputs(p, c, layers, [[], [10]])
        ref = m.layer_inputs_tokens(p + c, layers)
        for il in layers:
            assert full[il].shape == (len(c), d)
            np.testing.assert_allclose(full[il], ref[il][len(p):], rtol=0, atol=2e-2 * np.abs(ref[il]).max())
        np.testing.assert_allclose(skipped[5], full[5], rtol=0, atol=2e-2 * np.abs(full[5]).max())
        h = skipped[10].astype(np.float64)
        want = h + (up.astype(np.float64) @ (down.astype(np.float64) @ rmsnorm(h, eps).T)).T
        np.testing.assert_allclose(skipped[11], want, rtol=0, atol=1e-3 * np.abs(want).max())
        assert np.abs(skipped[12] - full[12]).max() > 1e-3   # the skip changed what comes after
        with pytest.raises(ValueError, match="out of range"):
            m.continuation_layer_inputs(p, c, [n_layer], [[]])
        with pytest.raises(ValueError, match="skip_layers index"):
            m.continuation_layer_inputs(p, c, [3], [[n_layer]])
        # the cache is left clean: a generation afterwards equals one from a fresh state
        a = m.generate("Hello", max_tokens=4).text
        m.reset()
        assert m.generate("Hello", max_tokens=4).text == a
    finally:
        m.close()


def test_refine_bypasses_fits_on_skipped_states_and_resumes(tmp_path, base_gguf, monkeypatch):
    """The first block of every set sees full-depth inputs, so its refit is fit()'s own regression on the
    same replies (an independent Moments solve); each block's result and the report are cached and a rerun
    computes nothing; other settings in the same folder are refused."""
    import first_gguf
    from first_gguf import model as model_mod
    from first_gguf.convert.router_file import RouterFile, load_router_file
    from first_gguf.fit import _norm_facts, budget_sets, refine_bypasses

    assert budget_sets([5, 3, 9, 1], 10, [0.1, 0.25, 0.05]) == [[5], [3, 5]]
    m = first_gguf.load(base_gguf, n_ctx=512, n_threads=1)
    replies, states = [], []
    try:
        d, n_layer = m.info.n_embd, m.n_layer
        for q in ["What is rain?", "Name a fruit.", "Why is ice slippery?", "Count to three."]:
            p, _ = m.prompt_tokens_for([{"role": "user", "content": q}])
            g = m.generate_tokens(p, max_tokens=10)
            replies.append({"prompt_tokens": p, "reply_tokens": list(g.tokens)})
            states.append(m.continuation_layer_inputs(p, list(g.tokens), [8, 9], [[]])[0])
    finally:
        m.close()
    eps, _ = _norm_facts(base_gguf, n_layer)
    rng = np.random.default_rng(0)
    base = RouterFile(n_layer, d, {8: np.zeros(d, np.float32)}, {8: 0.0}, bypasses={b: ((rng.standard_normal((4, d)) * 0.01).astype(np.float32),
                                                        (rng.standard_normal((d, 4)) * 0.01).astype(np.float32))
                                                    for b in (8, 9, 20)})
    sets = [[8, 9], [8, 9, 10]]
    byp, rep = refine_bypasses(base_gguf, tmp_path, base, replies, sets, rank=4, ridge=1e-3, n_fit=3, n_val=1,
                               threads=1, eps=eps)
    assert sorted(byp) == [8, 9, 10] and byp[8][0].shape == (4, d) and byp[8][1].shape == (d, 4)
    ref = Moments([8], d)
    for st in states[:3]:
        ref.add(st, slice(0, len(st[8])), eps)
    dn, up, _ = solve_bypass(ref.xx[8], ref.xd[8], ref.dd[8], ref.n, 4, 1e-3)
    np.testing.assert_allclose(byp[8][1] @ byp[8][0], up @ dn, rtol=0, atol=2e-2 * np.abs(up @ dn).max())
    assert len(rep["val_kl_before"]) == 2 and len(rep["val_kl_after"]) == 2 and sorted(rep["r2"]) == ["10", "8", "9"]
    assert all(v >= 0 for v in rep["val_kl_before"] + rep["val_kl_after"])
    for b in (8, 9, 10):
        assert np.array_equal(load_router_file(tmp_path / f"refine-b{b}.safetensors").bypasses[b][0], byp[b][0])

    def boom(*a, **k):
        raise AssertionError("a finished block was computed again")

    monkeypatch.setattr(model_mod.Model, "continuation_layer_inputs", boom)
    monkeypatch.setattr(model_mod.Model, "score_tokens", boom)
    byp2, rep2 = refine_bypasses(base_gguf, tmp_path, base, replies, sets, rank=4, ridge=1e-3, n_fit=3,
                                 n_val=1, threads=1, eps=eps)
    assert rep2 == rep and all(np.array_equal(byp2[b][0], byp[b][0]) for b in byp)
    with pytest.raises(ValueError, match="other settings"):
        refine_bypasses(base_gguf, tmp_path, base, replies, sets, rank=2, ridge=1e-3, n_fit=3, n_val=1, eps=eps)


def test_greedy_set_ranking_picks_the_cheapest_set_each_step_and_resumes(tmp_path, base_gguf, monkeypatch):
    """Each step's trials are set_kl of the chosen blocks plus one candidate, averaged over the replies
    (measured here directly, one reply at a time); the cheapest is taken; the ranking is a permutation of
    the blocks with the unchosen ones by single cost; a rerun measures nothing; another reply set in the
    same folder is refused."""
    import first_gguf
    from first_gguf import model as model_mod
    from first_gguf.fit import greedy_set_ranking, set_kl

    m = first_gguf.load(base_gguf, n_ctx=512, n_threads=1)
    replies = []
    try:
        n_layer = m.n_layer
        for q in ["What is rain?", "Name a fruit.", "Why is ice slippery?"]:
            p, _ = m.prompt_tokens_for([{"role": "user", "content": q}])
            replies.append({"prompt_tokens": p, "reply_tokens": list(m.generate_tokens(p, max_tokens=8).tokens)})
        assert set_kl(m, replies[0], [[]]) == [0.0]
        cands = [5, 9, 14, 20]
        single = {c: float(np.mean([set_kl(m, r, [[c]])[0] for r in replies])) for c in cands}
        first = min(cands, key=lambda c: (single[c], c))
        pair = {c: float(np.mean([set_kl(m, r, [sorted([first, c])])[0] for r in replies]))
                for c in cands if c != first}
    finally:
        m.close()
    assert all(v > 0 for v in single.values())
    res = greedy_set_ranking(base_gguf, None, tmp_path, replies, n_layer=n_layer, candidates=cands, max_set=2,
                             single_cost={c: -single[c] for c in cands}, threads=1)
    st = res["greedy_steps"]
    assert [s["block"] for s in st][0] == first
    assert st[0]["trials"] == pytest.approx({str(c): v for c, v in single.items()}, abs=1e-4)
    assert st[1]["trials"] == pytest.approx({str(c): v for c, v in pair.items()}, abs=1e-4)
    assert st[1]["block"] == min(pair, key=lambda c: (pair[c], c)) and st[1]["set"] == sorted([first, st[1]["block"]])
    rest = [c for c in sorted(cands, key=lambda c: -single[c]) if c not in res["ranking"][:2]]
    assert res["ranking"][2:4] == rest and sorted(res["ranking"]) == list(range(n_layer))

    def boom(*a, **k):
        raise AssertionError("a measured set was measured again")

    monkeypatch.setattr(model_mod.Model, "score_tokens", boom)
    again = greedy_set_ranking(base_gguf, None, tmp_path, replies, n_layer=n_layer, candidates=cands, max_set=2,
                               single_cost={c: -single[c] for c in cands}, threads=1)
    assert again == res
    with pytest.raises(ValueError, match="holds set costs"):
        greedy_set_ranking(base_gguf, None, tmp_path, replies[:2], n_layer=n_layer, candidates=cands, max_set=2)
    with pytest.raises(ValueError, match="max_set 5"):
        greedy_set_ranking(base_gguf, None, tmp_path, replies, n_layer=n_layer, candidates=cands, max_set=5)
    with pytest.raises(ValueError, match="distinct blocks"):
        greedy_set_ranking(base_gguf, None, tmp_path, replies, n_layer=n_layer, candidates=[5, 5], max_set=1)
