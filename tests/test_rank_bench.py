"""first-gguf rank and bench, end to end on the tiny model (structure, not speed)."""
from __future__ import annotations

import json

from click.testing import CliRunner

from first_gguf.bench import format_table, run_bench
from first_gguf.cli import main
from first_gguf.ranking import compute_static_ranking


def test_rank_produces_a_full_ranking_that_attaches(tiny_gguf_model, tmp_path):
    m = tiny_gguf_model
    res = compute_static_ranking(m, n_examples=4, max_set=2, n_candidates=3)
    assert sorted(res["ranking"]) == list(range(m.n_layer))
    assert [s["block"] for s in res["greedy_steps"]] == res["ranking"][:2]
    assert set(res["single_block_cost"]) == {str(i) for i in range(m.n_layer)}
    # the greedy set cost really is what the runtime measures for that set
    path = tmp_path / "rank.json"
    path.write_text(json.dumps(res))
    out = tmp_path / "ranked.gguf"
    r = CliRunner().invoke(main, ["attach", str(m.path), "--ranking", str(path), "-o", str(out)])
    assert r.exit_code == 0, r.output
    import first_gguf

    with first_gguf.load(out, n_ctx=256) as m2:
        assert m2.static_rankings["greedy_nll"] == res["ranking"]
        g = m2.generate("hello", 0.5, skip_strategy="static", max_tokens=2)
        assert g.skipped_layers == sorted(res["ranking"][:2]) and g.skip_strategy == "static"


def test_bench_reports_every_budget(tiny_gguf_model):
    res = run_bench(tiny_gguf_model, [0.25, 0.5], skip_strategy="router", repeats=1, gen_tokens=2,
                    prompt_tokens=8)
    assert [r["skip_budget"] for r in res["rows"]] == [0.0, 0.25, 0.5]
    assert [r["n_skipped"] for r in res["rows"]] == [0, 1, 2]
    assert res["rows"][0]["decode_ratio"] == 1.0
    assert all(r["decode_tok_s"] > 0 for r in res["rows"])
    assert "router_prefill_overhead" in res
    table = format_table(res)
    assert "| 0.5 | 2 |" in table
    # sampled decoding (llama.cpp's sampler chain) beside greedy at budget 0 and at the largest budget
    assert [r["skip_budget"] for r in res["rows"] if "sampling_overhead" in r] == [0.0, 0.5]
    assert all(r["sampled_decode_tok_s"] > 0 for r in res["rows"] if "sampling_overhead" in r)
    assert "sampled decoding (llama.cpp sampler chain, temperature 0.8, top_k 40" in table


def test_rank_onpolicy_criterion_costs_are_onpolicy_kl(tiny_gguf_model, monkeypatch):
    """--criterion onpolicy: every greedy step's cost is the on-policy KL of that set, measured independently
    (first_gguf.measures.onpolicy_kl, same prompts and seeds)."""
    import pytest

    from first_gguf import ranking
    from first_gguf.measures import onpolicy_kl

    prompts = ["hello there", "tell me a story", "what is this", "one two three"]
    monkeypatch.setattr(ranking, "onpolicy_calibration_prompts", lambda n, seed=0: prompts[:n])
    m = tiny_gguf_model
    res = compute_static_ranking(m, n_examples=4, max_set=2, n_candidates=3, criterion="onpolicy",
                                 onpolicy_tokens=6)
    assert res["name"] == "greedy_onpolicy" and sorted(res["ranking"]) == list(range(m.n_layer))
    chosen = []
    for st in res["greedy_steps"]:
        chosen.append(st["block"])
        ref = onpolicy_kl(m, prompts, 0.0, skip_layers=sorted(chosen), max_tokens=6, seed=0).kl
        assert st["set_cost"] == pytest.approx(ref, abs=1e-9)
        assert st["set_cost"] > 0  # a skipped block changes the model: the measure is not blind
    with pytest.raises(ValueError, match="unknown criterion 'kl'"):
        compute_static_ranking(m, n_examples=4, criterion="kl")
