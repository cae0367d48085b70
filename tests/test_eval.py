"""first-gguf eval end to end on the tiny model (hand-made examples), metric wrappers, bad arguments; the
side-by-side table of several results folders (first_gguf.evaluate.compare_measures)."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from first_gguf import evaluate as ev
from first_gguf.datasets.tasks import Example


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
    monkeypatch.setattr(ev.loop, "load_task", _examples)
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


def test_resume_refuses_another_router_file(tmp_path):
    """The sidecar is part of a run's settings, by path and by content: shipping a router file rewrites it
    under the same name, and rows measured with the old one must not be resumed with the new one."""
    from types import SimpleNamespace

    model_file, side = tmp_path / "m.gguf", tmp_path / "r.sidecar.gguf"
    model_file.write_bytes(b"model")
    side.write_bytes(b"routers one")
    model = SimpleNamespace(path=model_file, routers_path=side, bypass=True, decode_lora_path=None,
                            info=SimpleNamespace(default_static_ranking="block_influence"))
    cfg, out = ev.EvalConfig(tasks=["qa"], budgets=[0.25], strategies=["router"]), tmp_path / "out"
    assert "static_ranking" not in ev._run_settings(model, cfg)
    # which ranking "static" means is recorded: a sidecar written without --ranking has no greedy_nll
    assert ev._run_settings(model, ev.EvalConfig(**{**cfg.__dict__, "strategies": ["router", "static"]})
                            )["static_ranking"] == "block_influence"
    out.mkdir()
    run = ev._run_settings(model, cfg)
    assert run["routers"] == str(side.resolve()) and len(run["routers_sha256"]) == 64
    ev._check_resume(out, run)
    (out / "results.jsonl").write_text("{}\n")
    ev._check_resume(out, ev._run_settings(model, cfg))  # same files: resumable
    static = ev.EvalConfig(**{**cfg.__dict__, "strategies": ["static"]})
    ev._check_resume(out, ev._run_settings(model, static))  # ... with the static strategy added too
    ev._check_resume(out, ev._run_settings(model, cfg))
    assert json.loads((out / "run.json").read_text())["static_ranking"] == "block_influence"
    side.write_bytes(b"routers two")
    with pytest.raises(ValueError, match=r"another run \(routers_sha256: '[0-9a-f]{64}' there, '[0-9a-f]{64}' now"):
        ev._check_resume(out, ev._run_settings(model, cfg))
    other = tmp_path / "other.sidecar.gguf"
    other.write_bytes(b"routers one")
    with pytest.raises(ValueError, match=r"another run \(routers: .*r\.sidecar\.gguf' there, .*other"):
        ev._check_resume(out, ev._run_settings(SimpleNamespace(**{**model.__dict__, "routers_path": other}), cfg))
    model_file.write_bytes(b"model two")
    with pytest.raises(ValueError, match=r"model_sha256"):
        ev._check_resume(out, ev._run_settings(SimpleNamespace(**{**model.__dict__, "routers_path": None}), cfg))


def test_eval_bad_arguments(tiny_gguf_model, tmp_path):
    bad = [(dict(tasks=["cooking"]), "unknown task"), (dict(tasks=["xsum"]), "reserved"),
           (dict(budgets=[1.2]), "out of range"), (dict(strategies=["magic"]), "unknown strategy"),
           (dict(strategies=["static"]), "needs a static ranking"),
           # strategies are parsed by Model.check_skip; eval takes them under their own name only
           (dict(strategies=["router", "auto"]), r"unknown strategy 'auto'; expected 'full' or a skip strategy"),
           (dict(strategies=["random:1"]), r"unknown strategy 'random:1'.*use 'random' and random_seeds"),
           (dict(strategies=[None]), r"unknown strategy None.*skip_strategy must be a str")]
    for kw, pat in bad:
        cfg = ev.EvalConfig(**{**dict(tasks=["qa"], budgets=[0.25], strategies=["router"]), **kw})
        with pytest.raises(ValueError, match=pat):
            ev.evaluate(tiny_gguf_model, cfg, tmp_path)
    with pytest.raises(ValueError, match=r"unknown strategy 'magic'.*expected one of \['router', 'static'"):
        ev.check_config(tiny_gguf_model, ev.EvalConfig(tasks=["qa"], budgets=[0.25], strategies=["full", "magic"]))
    ev.check_config(tiny_gguf_model, ev.EvalConfig(tasks=["qa"], budgets=[0.25], strategies=["full", "last", "random"]))
    from first_gguf.cli import main

    res = CliRunner().invoke(main, ["eval", "--model", str(tmp_path / "missing.gguf"), "-o", str(tmp_path / "o")])
    assert res.exit_code != 0 and "model not found" in res.output
    res = CliRunner().invoke(main, ["eval", "--model", str(tiny_gguf_model.path), "--budgets", "0,x",
                                    "-o", str(tmp_path / "o")])
    assert res.exit_code != 0 and "--budgets" in res.output


def test_eval_measures_heldout_and_resume(tiny1, tmp_path, monkeypatch):
    """nll + on-policy KL + repetition on an in-distribution task and the everyday source, then resume."""
    monkeypatch.setattr(ev.loop, "load_task", _examples)
    cfg = ev.EvalConfig(tasks=["qa"], heldout=["everyday"], budgets=[0, 0.5], strategies=["router", "random"],
                        measures=["nll", "onpolicy", "repetition"], n_examples=2, n_heldout=3, gen_tokens=4,
                        onpolicy_tokens=5, greedy_tokens=6, random_seeds=2, bench=False)
    res = ev.evaluate(tiny1, cfg, tmp_path)
    rows = {(r["task"], r["strategy"]): r for r in res["rows"]}
    assert len(rows) == 2 * 3
    assert {r["group"] for r in res["rows"] if r["task"] == "qa"} == {"in-distribution"}
    assert {r["group"] for r in res["rows"] if r["task"] == "everyday"} == {"held-out source"}
    full, router = rows["everyday", "full"], rows["everyday", "router"]
    assert full["nll"] is None and full["extra_nll"] is None and router["extra_nll"] is None  # no references
    assert full["onpolicy_kl"] == 0.0 and full["repetition"]["n"] == 3 and len(full["repetition"]["replies"]) == 3
    op = router["onpolicy"]
    assert router["onpolicy_kl"] == op["kl"] and len(op["replies"]) == 3 and op["n_tokens"] > 0
    assert all(len(s) == 2 for s in router["skipped"])
    assert rows["qa", "router"]["extra_nll"] is not None and rows["qa", "router"]["repetition"]["n"] == 1
    rnd = rows["qa", "random"]  # 2 seeds: on-policy tokens pooled, replies of both
    assert rnd["n_seeds"] == 2 and len(rnd["onpolicy"]["replies"]) == 2 and rnd["repetition"]["n"] == 2
    # the same numbers as the measure functions give directly
    from first_gguf.measures import onpolicy_kl

    prompts = [list(e.messages) for e in ev.load_heldout("everyday", 3)]
    assert onpolicy_kl(tiny1, prompts, 0.5, max_tokens=5).kl == pytest.approx(router["onpolicy_kl"])
    header = (tmp_path / "results.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["task", "group", "strategy"] and {"onpolicy_kl", "rep_token_4gram", "rep_long_runs",
                                                            "rep_word_4gram"} <= set(header)
    table = ev.measures_table(res)
    assert "| 0.5 | router | in-distribution | 1 |" in table and "| 0.5 | router | held-out source | 1 |" in table
    assert "| 0 | full | held-out source | 1 | " in table
    # resumable: nothing is measured again
    n_lines = len((tmp_path / "results.jsonl").read_text().splitlines())
    ev.evaluate(tiny1, ev.EvalConfig(**cfg.__dict__), tmp_path)
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == n_lines
    # ... but not with other measures or another sample length
    for kw, what in ((dict(measures=["nll"]), r"measures: \['nll', 'onpolicy', 'repetition'\] there, \['nll'\] now"),
                     (dict(onpolicy_tokens=7), "onpolicy_tokens: 5 there, 7 now")):
        with pytest.raises(ValueError, match=what):
            ev.evaluate(tiny1, ev.EvalConfig(**{**cfg.__dict__, **kw}), tmp_path)
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == n_lines
    # every row records its prompts' ids; a task whose files give other prompts here is refused, not mixed in
    want = [e.uid for e in ev.split(_examples("qa"), "test", seed=0)[:2]]
    assert all(r["uids"] == want for r in res["rows"] if r["task"] == "qa")
    assert all(len(r["uids"]) == 3 for r in res["rows"] if r["task"] == "everyday")
    cfg2 = ev.EvalConfig(**{**cfg.__dict__, "budgets": [0, 0.5, 0.25]})  # new rows to measure
    monkeypatch.setattr(ev.loop, "load_task", lambda t: [Example(e.task, e.messages, e.target, "other" + e.uid)
                                                         for e in _examples(t)])
    with pytest.raises(ValueError, match=r"'qa' was measured there on other prompts \(1 of 1 differ; the prompts "
                                         r"come from files on this machine"):
        ev.evaluate(tiny1, cfg2, tmp_path)
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == n_lines


def test_eval_cli_heldout_only(tiny1, tmp_path):
    from first_gguf.cli import main

    res = CliRunner().invoke(main, ["eval", "--model", str(tiny1.path), "--tasks", "", "--heldout",
                                    "everyday", "--measures", "onpolicy,repetition", "--budgets", "0,0.25",
                                    "--strategies", "router", "--n-heldout", "2", "--onpolicy-tokens", "4",
                                    "--greedy-tokens", "5", "--no-bench", "--threads", "1", "-o", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "| 0.25 | router | held-out source | 1 |" in res.output and "repeated token 4-grams" in res.output
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert {(r["task"], r["strategy"]) for r in rows} == {("everyday", "full"), ("everyday", "router")}
    assert all("agreement" not in r for r in rows)  # nll not asked for


def test_eval_new_options_bad_values(tiny1, tmp_path):
    from first_gguf.cli import main

    base = ["eval", "--model", str(tiny1.path), "--strategies", "router", "--no-bench", "--threads", "1",
            "-o", str(tmp_path / "o")]
    for extra, msg in ((["--heldout", "news,cooking"], "--heldout: unknown held-out source 'cooking'; expected some "
                                                       "of news, de, yesno, everyday"),
                       (["--measures", "nll,speed"], "--measures: unknown measure 'speed'; expected some of nll, "
                                                     "onpolicy, repetition"),
                       (["--measures", ","], "--measures: no measures given"),
                       (["--tasks", "news"], "task 'news' is reserved for external evaluation; evaluate it with "
                                             "first-gguf eval --heldout"),
                       (["--tasks", "", "--heldout", ""], "no tasks and no held-out sources given"),
                       (["--onpolicy-tokens", "0"], "onpolicy_tokens must be an integer >= 1; got 0"),
                       (["--n-heldout", "-2", "--heldout", "everyday"], "n_heldout must be an integer >= 1; got -2")):
        res = CliRunner().invoke(main, base + extra)
        assert res.exit_code != 0 and msg in res.output, (extra, res.output)
        assert len(res.output.strip().splitlines()) == 1, res.output


def _results_folder(path, rows, run):
    path.mkdir()
    (path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "run.json").write_text(json.dumps(run))
    return path


def test_compare_measures_side_by_side(tmp_path):
    """compare_measures (first-gguf compare's tables): means per (budget, strategy) and group, one column
    per labelled folder, then per task/source with the distinct skip sets; folders measured otherwise refused."""
    def row(task, group, strategy, budget, kl, rep, skipped):
        return {"task": task, "group": group, "strategy": strategy, "budget": budget, "n": 2, "onpolicy_kl": kl + 1,
                "onpolicy_kl_exact": kl, "extra_nll": None, "repetition": {"token_4gram": rep, "looping": 0.5,
                                                                           "long_runs": 0.0}, "skipped": skipped}

    run = {"measures": ["onpolicy", "repetition"], "seed": 0}
    a = _results_folder(tmp_path / "a", [row("qa", "in-distribution", "router", 0.2, 0.25, 0.1, [[1, 2], [1, 2]]),
                                         row("news", "held-out source", "router", 0.2, 0.5, 0.2, [[1, 2], [2, 3]])], run)
    b = _results_folder(tmp_path / "b", [row("qa", "in-distribution", "router", 0.2, 0.75, 0.3, [[0, 1], [1, 3]])],
                        run)
    text = ev.compare_measures({"one": a, "two": str(b)})
    lines = text.splitlines()
    assert lines[0].startswith("| budget | strategy | group | on-policy KL, exact: one | on-policy KL, exact: two |")
    assert "| 0.2 | router | in-distribution | 0.250 | 0.750 | 1.250 | 1.750 |  |  | 10.0% | 30.0% | 50% | 50% |" in text
    assert "| 0.2 | router | held-out source | 0.500 |  | 1.500 |  |" in text
    assert "| 0.2 | router | qa | 0.250 | 0.750 | 10.0% | 30.0% | 1 | 2 |" in text
    assert "| 0.2 | router | news | 0.500 |  | 20.0% |  | 2 |  |" in text
    assert text.endswith("\n") and "paired by prompt" in text  # no per-prompt values: no paired cells
    assert ev.parse_labelled("x=a=b") == ("x", "a=b")
    with pytest.raises(ValueError, match="expected LABEL=RESULTS_FOLDER"):
        ev.parse_labelled("folder")
    with pytest.raises(ValueError, match=r"results\.jsonl: not found"):
        ev.compare_measures({"one": a, "none": tmp_path / "none"})
    # rows measured on other prompts (their examples' ids) are refused; rows without ids are not checked
    ids = lambda r, u: {**r, "uids": u}  # noqa: E731
    d = _results_folder(tmp_path / "d", [ids(row("qa", "in-distribution", "router", 0.2, 0.25, 0.1, [[1, 2]]), ["a", "b"])],
                        run)
    e = _results_folder(tmp_path / "e", [ids(row("qa", "in-distribution", "router", 0.2, 0.5, 0.1, [[1, 2]]), ["a", "c"])],
                        run)
    with pytest.raises(ValueError, match=r"^e: 'qa' was measured on other prompts than d's \(1 of 2 differ"):
        ev.compare_measures({"d": d, "e": e})
    assert "| 0.2 | router | qa | 0.250 | 0.750 |" in ev.compare_measures({"d": d, "two": b})
    c = _results_folder(tmp_path / "c", [], {**run, "seed": 1, "split": "dev"})
    with pytest.raises(ValueError, match=r"^three: measured with other settings \(seed, split\); compare like"):
        ev.compare_measures({"one": a, "three": c})
