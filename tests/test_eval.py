"""first-gguf eval end to end on the tiny model (hand-made examples), metric wrappers, bad arguments."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from first_gguf import evaluate as ev
from first_gguf.tasks import Example


def _examples(task):
    user = lambda t: ({"role": "user", "content": t},)  # noqa: E731
    if task == "mc":
        return [Example("mc", user("Pick one.\nOptions:\n- red apple\n- blue sky\nAnswer with the best option."),
                        "blue sky", f"mc{i}") for i in range(4)]
    return [Example(task, user(f"{task} example {i}: the quick brown fox"), f"jumps over the lazy dog {i}",
                    f"{task}{i}") for i in range(10)]


def test_metric_wrappers_on_fixed_inputs():
    assert ev.rouge_l("the cat sat", "the cat sat") == 1.0
    assert 0 < ev.rouge_l("the cat", "the cat sat on the mat") < 1
    assert ev.chrf("bonjour le monde", "bonjour le monde") == 100.0
    assert ev.bleu("a b c d", "a b c d") == pytest.approx(100.0)
    assert ev.exact_match("The Answer.", "answer") == 1.0
    assert ev.token_f1("red big apple", "big red") == pytest.approx(0.8)
    assert ev.task_metrics("mc", "x", "y") == {}


def test_eval_end_to_end_on_tiny_model(tiny_gguf_model, tmp_path, monkeypatch):
    monkeypatch.setattr(ev, "load_task", _examples)
    cfg = ev.EvalConfig(tasks=["summarization", "qa", "mc", "translation"], budgets=[0, 0.25, 0.5],
                        strategies=["router", "random", "last"], n_examples=2, gen_tokens=4, random_seeds=2,
                        bench=True, bench_repeats=1)
    res = ev.evaluate(tiny_gguf_model, cfg, tmp_path)
    rows = res["rows"]
    assert len(rows) == 4 * (1 + 3 * 2)
    full = [r for r in rows if r["strategy"] == "full"]
    assert all(r["extra_nll"] == 0 and r["agreement"] == 1.0 for r in full)
    r = next(r for r in rows if r["task"] == "mc" and r["strategy"] == "router" and r["budget"] == 0.5)
    assert "accuracy" in r["metrics"] and all(len(s) == 2 for s in r["skipped"])
    assert next(r for r in rows if r["task"] == "translation" and r["strategy"] == "last")["skipped"][0] == [3]
    for f in ("results.json", "results.csv", "results.jsonl", "quality_vs_speed.png", "skip_heatmap.png"):
        assert (tmp_path / f).stat().st_size > 0
    # resumable: a second run recomputes nothing
    n_lines = len((tmp_path / "results.jsonl").read_text().splitlines())
    ev.evaluate(tiny_gguf_model, ev.EvalConfig(**{**cfg.__dict__, "bench": False}), tmp_path)
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == n_lines
    assert "| mc | router | 0.5 |" in ev.summary_table(json.loads((tmp_path / "results.json").read_text()))
    # ... but not with rows measured otherwise (here: another generation length)
    with pytest.raises(ValueError, match=r"holds results of another run \(gen_tokens: 4 there, 5 now\)"):
        ev.evaluate(tiny_gguf_model, ev.EvalConfig(**{**cfg.__dict__, "bench": False, "gen_tokens": 5}), tmp_path)
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == n_lines


def test_eval_bad_arguments(tiny_gguf_model, tmp_path):
    bad = [(dict(tasks=["cooking"]), "unknown task"), (dict(tasks=["xsum"]), "reserved"),
           (dict(budgets=[1.2]), "out of range"), (dict(strategies=["magic"]), "unknown strategy"),
           (dict(strategies=["static"]), "needs a static ranking")]
    for kw, pat in bad:
        cfg = ev.EvalConfig(**{**dict(tasks=["qa"], budgets=[0.25], strategies=["router"]), **kw})
        with pytest.raises(ValueError, match=pat):
            ev.evaluate(tiny_gguf_model, cfg, tmp_path)
    from first_gguf.cli import main

    res = CliRunner().invoke(main, ["eval", "--model", str(tmp_path / "missing.gguf"), "-o", str(tmp_path / "o")])
    assert res.exit_code != 0 and "model not found" in res.output
    res = CliRunner().invoke(main, ["eval", "--model", str(tiny_gguf_model.path), "--budgets", "0,x",
                                    "-o", str(tmp_path / "o")])
    assert res.exit_code != 0 and "--budgets" in res.output
