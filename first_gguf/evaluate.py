"""Evaluation: quality against speed, FiRST routers against static skipping.

For every (task or held-out source, strategy, budget) on the same prompts and the
same runtime, the measures asked for (``EvalConfig.measures``):

``nll`` (the default):

- extra NLL: mean negative log-likelihood per token of the reference
  continuation minus the full model's (teacher-forced, Model.score_tokens: prompt
  at full depth, continuation decoded with the blocks skipped); None for a
  source without references (``everyday``);
- agreement: fraction of greedy tokens equal to the full model's greedy output
  (position by position, over ``gen_tokens``);
- the task metric on the greedy output: ROUGE-L (summarization, docs, news), chrF
  and BLEU (translation, de), exact match / token F1 (qa), whether the reply's
  first word is the reference's yes or no (yesno); multiple choice (mc) is scored
  by log-likelihood of each option through Model.score_tokens (accuracy);

``onpolicy``: KL(p_skip || p_full) on temperature-1 samples of the skipped model
(``measures.onpolicy_kl``; 0 by definition in the ``full`` rows);

``repetition``: repeated token 4-grams and runs of one token in greedy replies
(``measures.greedy_repetition``), the full model's own figure in the ``full`` rows;

and which blocks were skipped (for the per-task heatmap). Rows belong to a group:
``in-distribution`` (a task's test or dev split) or ``held-out source``
(``first_gguf.datasets.heldout``: sources no training set draws from).

Strategies: ``full`` (budget 0), ``router``, ``static`` (the GGUF's default
ranking), any stored ranking by name (``block_influence``, ``router_mean``,
``greedy_nll``), ``random`` (averaged over ``random_seeds`` seeded draws) and
``last``. Results are appended per (task, strategy, budget) to
``results.jsonl`` in the output folder, so an interrupted run resumes where
it stopped; ``results.json``, ``results.csv`` and the plots are rewritten at
the end.
"""
from __future__ import annotations

import csv
import json
import math
import re
import string
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .datasets.heldout import load_heldout, parse_heldout
from .datasets.tasks import TASKS, Example, load_task, parse_tasks, split
from .default_model import _sha256
from .measures import (OnPolicyKL, Repetition, complete, greedy_repetition, onpolicy_kl, pool_onpolicy,
                       pool_repetition)
from .model import Model

STRATEGIES_BUILTIN = ("full", "router", "static", "random", "last")
MEASURES = ("nll", "onpolicy", "repetition")
IN_DISTRIBUTION, HELDOUT = "in-distribution", "held-out source"


# ---------------------------------------------------------------- metrics
def rouge_l(pred: str, ref: str) -> float:
    from rouge_score import rouge_scorer

    return float(rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(ref, pred)["rougeL"].fmeasure)


def chrf(pred: str, ref: str) -> float:
    import sacrebleu

    return float(sacrebleu.sentence_chrf(pred, [ref]).score)


def bleu(pred: str, ref: str) -> float:
    import sacrebleu

    return float(sacrebleu.sentence_bleu(pred, [ref]).score)


def _norm_answer(s: str) -> list[str]:
    s = s.lower()
    s = "".join(c for c in s if c not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return s.split()


def exact_match(pred: str, ref: str) -> float:
    return float(_norm_answer(pred) == _norm_answer(ref))


def token_f1(pred: str, ref: str) -> float:
    p, r = _norm_answer(pred), _norm_answer(ref)
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    prec, rec = common / len(p), common / len(r)
    return 2 * prec * rec / (prec + rec)


def yes_no_match(pred: str, ref: str) -> float:
    """Whether the first word of ``pred`` is the yes/no that ``ref`` starts with."""
    p, r = _norm_answer(pred)[:1], _norm_answer(ref)[:1]
    return float(bool(r) and r[0] in ("yes", "no") and p == r)


def task_metrics(task: str, pred: str, ref: str) -> dict[str, float]:
    if task in ("summarization", "docs", "news"):
        return {"rougeL": rouge_l(pred, ref)}
    if task in ("translation", "de"):
        return {"chrF": chrf(pred, ref), "BLEU": bleu(pred, ref)}
    if task == "qa":
        return {"EM": exact_match(pred, ref), "F1": token_f1(pred, ref)}
    if task == "yesno":
        return {"yes/no": yes_no_match(pred, ref)}
    return {}


# ------------------------------------------------------------ evaluation
@dataclass
class EvalConfig:
    """What ``evaluate`` measures.

    Args:
        tasks: in-distribution tasks (their ``split``); may be empty when ``heldout`` is not.
        budgets, strategies: skip budgets and strategies (budget 0: the ``full`` rows).
        n_examples: examples per task; n_heldout: per held-out source (None: n_examples).
        gen_tokens: greedy tokens for agreement and the task metric (``nll``).
        heldout: held-out sources (``first_gguf.datasets.heldout``), evaluated next to the tasks.
        measures: some of ``nll``, ``onpolicy``, ``repetition``.
        onpolicy_tokens: most tokens per sampled reply (``onpolicy``); seed: its sampler seed.
        greedy_tokens: most tokens per greedy reply (``repetition``).
    """

    tasks: list[str]
    budgets: list[float]
    strategies: list[str]
    n_examples: int = 20
    gen_tokens: int = 48
    split: str = "test"
    random_seeds: int = 3
    bench: bool = True
    bench_repeats: int = 5
    heldout: list[str] = field(default_factory=list)
    measures: list[str] = field(default_factory=lambda: ["nll"])
    n_heldout: int | None = None
    onpolicy_tokens: int = 48
    greedy_tokens: int = 96
    seed: int = 0


def parse_measures(spec: str | list[str]) -> list[str]:
    """Measure names from "nll,onpolicy" or a list; unknown or no names raise ValueError."""
    names = [m.strip() for m in (spec.split(",") if isinstance(spec, str) else spec) if m.strip()]
    if not names:
        raise ValueError(f"no measures given; expected some of {', '.join(MEASURES)}")
    for m in names:
        if m not in MEASURES:
            raise ValueError(f"unknown measure {m!r}; expected some of {', '.join(MEASURES)}")
    return [m for m in MEASURES if m in names]


def _check_count(name: str, value, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1; got {value!r}")


def check_config(model: Model, cfg: EvalConfig) -> None:
    cfg.heldout = parse_heldout(cfg.heldout)
    if not cfg.tasks and not cfg.heldout:
        raise ValueError("no tasks and no held-out sources given; expected at least one of them")
    cfg.tasks = parse_tasks(cfg.tasks) if cfg.tasks else []
    cfg.measures = parse_measures(cfg.measures)
    for b in cfg.budgets:
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 <= b < 1 or math.isnan(b):
            raise ValueError(f"budget {b!r} out of range; expected numbers in [0, 1)")
    known = list(STRATEGIES_BUILTIN) + list(model.info.static_rankings)
    for s in cfg.strategies:
        if s not in known:
            raise ValueError(f"unknown strategy {s!r}; expected one of {known}")
    if "router" in cfg.strategies and model.n_routers == 0:
        raise ValueError(f"strategy 'router' needs routers; {model.path} has none")
    if "static" in cfg.strategies and not model.info.static_rankings:
        raise ValueError(f"strategy 'static' needs a static ranking; {model.path} stores none")
    for name in ("n_examples", "gen_tokens", "onpolicy_tokens", "greedy_tokens", "random_seeds"):
        _check_count(name, getattr(cfg, name))
    _check_count("n_heldout", cfg.n_heldout, allow_none=True)
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or cfg.seed < 0:
        raise ValueError(f"seed must be an integer >= 0; got {cfg.seed!r}")


def _mc_options(ex: Example) -> list[str]:
    body = ex.messages[0]["content"]
    opts = body.split("\nOptions:\n", 1)[1].split("\nAnswer with", 1)[0]
    return [o[2:] for o in opts.split("\n") if o.startswith("- ")]


def _strategy_runs(strategy: str, cfg: EvalConfig) -> list[str]:
    if strategy == "random":
        return [f"random:{s}" for s in range(cfg.random_seeds)]
    return [strategy]


def evaluate(model: Model, cfg: EvalConfig, out_dir: str | Path, *,
             progress: Callable[[str], None] = lambda s: None) -> dict:
    check_config(model, cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    done_path = out / "results.jsonl"
    _check_resume(out, _run_settings(model, cfg))
    done = {}
    if done_path.exists():
        for line in done_path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                r.setdefault("group", IN_DISTRIBUTION)  # rows written before held-out sources existed
                done[(r["task"], r["strategy"], r["budget"])] = r
    budgets = sorted(set(float(b) for b in cfg.budgets))
    strategies = [s for s in cfg.strategies if s != "full"]
    t_start = time.time()

    for task, group in [(t, IN_DISTRIBUTION) for t in cfg.tasks] + [(h, HELDOUT) for h in cfg.heldout]:
        enc = _encode(model, _examples(task, group, cfg), cfg)
        if not enc:
            raise ValueError(f"{group} {task!r} has no examples that fit the context")
        # the full model's reference: NLL, greedy output, its own repetition
        key_full = (task, "full", 0.0)
        if key_full not in done:
            done[key_full] = _run(model, task, group, enc, None, 0.0, cfg, None)
            _append(done_path, done[key_full])
            progress(f"eval {task:13s} {'full':15s} budget 0    {_fmt_row(done[key_full])}")
        full = done[key_full]
        for strategy in strategies:
            for b in budgets:
                if b == 0.0:
                    continue
                key = (task, strategy, b)
                if key in done:
                    continue
                runs = [_run(model, task, group, enc, s, b, cfg, full) for s in _strategy_runs(strategy, cfg)]
                r = _merge(runs, strategy)
                done[key] = r
                _append(done_path, r)
                progress(f"eval {task:13s} {strategy:15s} budget {b:<4g} {_fmt_row(r)}")

    speed = None
    if cfg.bench:
        from .bench import run_bench

        strat = "router" if model.n_routers else ("static" if model.info.static_rankings else None)
        if strat:
            speed = run_bench(model, budgets, skip_strategy=strat, repeats=cfg.bench_repeats, gen_tokens=64,
                              prompt_tokens=128, progress=progress)
    rows = [r for r in done.values() if r["task"] in cfg.tasks + cfg.heldout]
    result = {"model": str(model.path), "n_layer": model.n_layer, "config": cfg.__dict__, "rows": rows, "speed": speed,
              "seconds": round(time.time() - t_start, 1)}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    _write_csv(out / "results.csv", rows)
    plot(result, out)
    return result


def _run_settings(model: Model, cfg: EvalConfig) -> dict:
    """What rows are measured with: resumed rows must share all of it."""
    sidecar = None if model.routers_path is None else Path(model.routers_path)
    # files by content too: shipping a router file rewrites it in place, under the same path
    run = {"model": str(Path(model.path).resolve()), "model_sha256": _sha256(Path(model.path)),
           "routers": None if sidecar is None else str(sidecar.resolve()),
           "routers_sha256": None if sidecar is None else _sha256(sidecar), "bypass": model.bypass,
           "decode_lora": None if model.decode_lora_path is None else str(model.decode_lora_path.resolve()),
           "gen_tokens": cfg.gen_tokens, "split": cfg.split, "measures": cfg.measures}
    if "static" in cfg.strategies:  # "static" is the file's first ranking: name it, a sidecar may lack greedy_nll
        run["static_ranking"] = model.info.default_static_ranking
    if "onpolicy" in cfg.measures:
        run.update(onpolicy_tokens=cfg.onpolicy_tokens, seed=cfg.seed)
    if "repetition" in cfg.measures:
        run["greedy_tokens"] = cfg.greedy_tokens
    return run


def _check_resume(out: Path, run: dict) -> None:
    """Refuse a folder whose rows were measured otherwise (another model or router sidecar file, by path or
    content, bypass or decode-LoRA setting, generation length, measures, ...): resuming would mix runs. Then
    record this run's settings. Folders written before a setting was recorded are refused too (their
    value is unknown)."""
    run_path = out / "run.json"
    if (out / "results.jsonl").exists() and run_path.exists():
        before = json.loads(run_path.read_text())
        before.setdefault("measures", ["nll"])  # folders written before the measures were selectable
        diff = {k: (before.get(k), v) for k, v in run.items() if k not in _INFO_ONLY and before.get(k) != v}
        if diff:
            what = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
            raise ValueError(f"{out} holds results of another run ({what}); use another --output folder")
        run = {**{k: before[k] for k in _INFO_ONLY if k in before}, **run}
    run_path.write_text(json.dumps(run, indent=1) + "\n")


# recorded, not compared: they follow from the model and sidecar files, which are compared by content (a
# resumed run may add the static strategy to a folder measured without it)
_INFO_ONLY = ("static_ranking",)


def _examples(task: str, group: str, cfg: EvalConfig) -> list[Example]:
    if group == HELDOUT:
        return load_heldout(task, cfg.n_heldout or cfg.n_examples)
    examples = split(load_task(task), cfg.split, seed=0)[: cfg.n_examples]
    if not examples:
        raise ValueError(f"task {task!r} has no {cfg.split} examples")
    return examples


def _encode(model: Model, examples: list[Example], cfg: EvalConfig) -> list[tuple]:
    """(example, prompt tokens, reference tokens ([] without a reference), stop strings) of the examples
    that fit the context."""
    enc = []
    for ex in examples:
        p, stops = model.prompt_tokens_for(list(ex.messages))
        c = model.tokenize(ex.target, add_bos=False)[:64] if ex.target else []
        if len(p) + max(len(c), cfg.gen_tokens) + 2 < model.n_ctx and (c or not ex.target):
            enc.append((ex, p, c, stops))
    return enc


def _fmt_metrics(m: dict) -> str:
    return " ".join(f"{k} {v:.3f}" for k, v in m.items())


def _fmt_row(r: dict) -> str:
    parts = []
    if "agreement" in r:
        if r.get("extra_nll") is not None:
            parts.append(f"extra NLL {r['extra_nll']:+.3f}")
        parts.append(f"agreement {r['agreement']:.2f} {_fmt_metrics(r['metrics'])}".rstrip())
    if r.get("onpolicy"):
        parts.append(f"on-policy KL {r['onpolicy']['kl']:.3f}, exact per state "
                     f"{r['onpolicy'].get('kl_exact', float('nan')):.3f} ({r['onpolicy']['n_tokens']} tok)")
    if r.get("repetition"):
        parts.append(f"repeated token 4-grams {r['repetition']['token_4gram']:.1%}")
    return " | ".join(parts)


def _append(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _run(model: Model, task: str, group: str, enc, strategy: str | None, budget: float, cfg: EvalConfig,
         full: dict | None) -> dict:
    """One row: the configured measures of one (task or source, strategy run, budget).

    Prompt by prompt, every measure in turn, so a prompt is prefilled once per row (the measures after
    the first reuse its KV cache; a 500-token news article costs seconds to prefill on a CPU)."""
    kw = {"skip_strategy": strategy or "router"}
    ref, ops, reps = [], [], []
    for i, item in enumerate(enc):
        prompt = [list(item[0].messages)]
        if "nll" in cfg.measures:
            ref.append(_reference_one(model, task, item, strategy, budget, cfg,
                                      None if full is None else full["greedy"][i]))
        if "onpolicy" in cfg.measures and strategy is not None:
            ops.append(onpolicy_kl(model, prompt, budget, max_tokens=cfg.onpolicy_tokens, seed=cfg.seed, **kw))
        if "repetition" in cfg.measures:
            reps.append(greedy_repetition(model, prompt, budget, max_tokens=cfg.greedy_tokens, **kw))
    row = {"task": task, "group": group, "strategy": strategy.split(":")[0] if strategy else "full",
           "budget": budget, "n": len(enc)}
    if ref:
        row.update(_reference_row(ref, full))
    if "onpolicy" in cfg.measures:  # the full model against itself: 0 by definition, not sampled
        op = pool_onpolicy(ops) if ops else None
        row["onpolicy"], row["onpolicy_kl"] = (asdict(op), op.kl) if op else (None, 0.0)
        row["onpolicy_kl_exact"] = op.kl_exact if op else 0.0
    if reps:
        row["repetition"] = asdict(pool_repetition(reps))
    row["skipped"] = ([r["skipped"] for r in ref] or (row.get("onpolicy") or {}).get("skipped")
                      or (row.get("repetition") or {}).get("skipped") or [])
    return row


def _reference_one(model: Model, task: str, item: tuple, strategy: str | None, budget: float, cfg: EvalConfig,
                   full_greedy: list[int] | None) -> dict:
    """One example's reference NLL (None without a reference), greedy tokens, agreement with the full
    model's greedy tokens (None for the full model itself) and task metric (None: not defined)."""
    ex, p, c, stops = item
    kw = {"skip_strategy": strategy} if strategy else {}
    nll = -float(np.mean(model.score_tokens(p, c, budget, **kw).logprobs)) if c else None
    g = complete(model, p, stops, budget, temperature=0.0, max_tokens=cfg.gen_tokens, skip_strategy=strategy)
    agree = None
    if full_greedy is not None:
        agree = sum(1 for a, b in zip(full_greedy, g.tokens) if a == b) / max(len(full_greedy), 1)
    metric = None
    if task == "mc":
        opts = _mc_options(ex)
        lls = [float(np.sum(model.score_tokens(p, model.tokenize(o, add_bos=False), budget, **kw).logprobs))
               for o in opts]
        metric = {"accuracy": float(opts[int(np.argmax(lls))] == ex.target)}
    elif ex.target:
        metric = task_metrics(task, g.text.strip(), ex.target)
    return {"nll": nll, "agree": agree, "metric": metric, "skipped": g.skipped_layers, "greedy": g.tokens}


def _reference_row(parts: list[dict], full: dict | None) -> dict:
    """The ``nll`` measures of a row: means over its examples; extra NLL against the full model's row."""
    nll = [x["nll"] for x in parts if x["nll"] is not None]
    agree = [x["agree"] for x in parts if x["agree"] is not None]
    metrics = [x["metric"] for x in parts if x["metric"] is not None]
    row = {"nll": float(np.mean(nll)) if nll else None,
           "metrics": {k: float(np.mean([m[k] for m in metrics])) for k in (metrics[0] if metrics else {})},
           "agreement": float(np.mean(agree)) if agree else 1.0, "skipped": [x["skipped"] for x in parts],
           "greedy": [x["greedy"] for x in parts]}
    row["extra_nll"] = (None if row["nll"] is None else
                        row["nll"] - full["nll"] if full is not None else 0.0)
    return row


def _merge(runs: list[dict], strategy: str) -> dict:
    """One row from the runs of a strategy drawn with several seeds (random): means of the figures,
    on-policy KL and repetition pooled over the replies of all runs."""
    r = dict(runs[0])
    r["strategy"] = strategy
    if len(runs) == 1:
        return r
    for k in ("nll", "extra_nll", "agreement"):
        if r.get(k) is not None:
            r[k] = float(np.mean([x[k] for x in runs]))
    if "metrics" in r:
        r["metrics"] = {k: float(np.mean([x["metrics"][k] for x in runs])) for k in runs[0]["metrics"]}
    if r.get("onpolicy") is not None:
        r["onpolicy"] = asdict(pool_onpolicy([OnPolicyKL(**x["onpolicy"]) for x in runs]))
        r["onpolicy_kl"], r["onpolicy_kl_exact"] = r["onpolicy"]["kl"], r["onpolicy"]["kl_exact"]
    if r.get("repetition") is not None:
        r["repetition"] = asdict(pool_repetition([Repetition(**x["repetition"]) for x in runs]))
    r["skipped"] = [s for x in runs for s in x["skipped"]]
    r["n_seeds"] = len(runs)
    return r


CSV_MEASURES = (  # (column, row -> value)
    ("onpolicy_kl", lambda r: r.get("onpolicy_kl")),
    ("onpolicy_kl_exact", lambda r: r.get("onpolicy_kl_exact")),
    ("onpolicy_tokens", lambda r: (r.get("onpolicy") or {}).get("n_tokens")),
    ("rep_token_4gram", lambda r: (r.get("repetition") or {}).get("token_4gram")),
    ("rep_looping", lambda r: (r.get("repetition") or {}).get("looping")),
    ("rep_longest_run", lambda r: (r.get("repetition") or {}).get("longest_run")),
    ("rep_long_runs", lambda r: (r.get("repetition") or {}).get("long_runs")),
    ("rep_word_4gram", lambda r: (r.get("repetition") or {}).get("word_4gram")),
)


def _write_csv(path: Path, rows: list[dict]) -> None:
    metric_names = sorted({k for r in rows for k in r.get("metrics", {})})
    fmt = lambda v: "" if v is None else (str(v) if isinstance(v, int) else f"{v:.4f}")  # noqa: E731
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "group", "strategy", "budget", "n", "nll", "extra_nll", "agreement", *metric_names,
                    *(c for c, _ in CSV_MEASURES)])
        for r in sorted(rows, key=lambda r: (r["group"], r["task"], r["strategy"], r["budget"])):
            w.writerow([r["task"], r["group"], r["strategy"], r["budget"], r["n"], fmt(r.get("nll")),
                        fmt(r.get("extra_nll")), fmt(r.get("agreement")),
                        *[fmt(r.get("metrics", {}).get(m)) for m in metric_names],
                        *[fmt(get(r)) for _, get in CSV_MEASURES]])


def plot(result: dict, out: Path) -> list[Path]:
    """quality_vs_speed.png (extra NLL per task with references) and skip_heatmap.png (router rows)."""
    import matplotlib

    matplotlib.use("Agg")
    rows = result["rows"]
    tasks = sorted({r["task"] for r in rows})
    speed = {round(r["skip_budget"], 6): r["decode_ratio"] for r in (result.get("speed") or {}).get("rows", [])}
    files = []
    nll_tasks = [t for t in tasks if all(r.get("extra_nll") is not None for r in rows if r["task"] == t)]
    if nll_tasks:
        files.append(_plot_quality(rows, nll_tasks, speed, out))
    router_rows = [r for r in rows if r["strategy"] == "router" and r.get("skipped")]
    if router_rows:
        files.append(_plot_heatmap(result, router_rows, tasks, out))
    return files


def _plot_quality(rows: list[dict], tasks: list[str], speed: dict, out: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for strategy in sorted({r["strategy"] for r in rows if r["task"] == task and r["strategy"] != "full"}):
            pts = sorted((r["budget"], r["extra_nll"]) for r in rows if r["task"] == task and r["strategy"] == strategy)
            xs = [speed.get(round(b, 6), 1.0 / (1.0 - b)) for b, _ in pts]
            ax.plot([1.0] + xs, [0.0] + [e for _, e in pts], marker="o", label=strategy)
        ax.set_title(task)
        ax.set_xlabel("decode speedup" if speed else "1 / (1 - budget)")
        ax.set_ylabel("extra NLL (nats/token)")
        ax.set_yscale("symlog", linthresh=1.0)  # baselines reach 10+ nats; keep the small differences visible
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    p = out / "quality_vs_speed.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p


def _plot_heatmap(result: dict, router_rows: list[dict], tasks: list[str], out: Path) -> Path:
    import matplotlib.pyplot as plt

    n_layer = result.get("n_layer") or 1 + max((il for r in router_rows for s in r["skipped"] for il in s),
                                               default=0)
    b = max(r["budget"] for r in router_rows)
    heat = np.zeros((len(tasks), n_layer))
    for i, task in enumerate(tasks):
        rs = [r for r in router_rows if r["task"] == task and r["budget"] == b]
        sets = [s for r in rs for s in r["skipped"]]
        for s in sets:
            for il in s:
                heat[i, il] += 1 / max(len(sets), 1)
    fig, ax = plt.subplots(figsize=(max(6, n_layer * 0.3), 0.6 * len(tasks) + 1.5))
    im = ax.imshow(heat, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_yticks(range(len(tasks)), tasks)
    ax.set_xticks(range(n_layer))
    ax.set_xlabel("block")
    ax.set_title(f"how often the routers skip each block (skip_budget {b:g})")
    fig.colorbar(im, ax=ax, label="fraction of prompts")
    fig.tight_layout()
    p = out / "skip_heatmap.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p


def summary_table(result: dict, metric_of: dict[str, str] | None = None) -> str:
    """A Markdown table, one line per row: extra NLL, agreement, task metric, on-policy KL, repetition."""
    metric_of = metric_of or {"summarization": "rougeL", "translation": "chrF", "qa": "F1", "mc": "accuracy",
                              "docs": "rougeL", "news": "rougeL", "de": "chrF", "yesno": "yes/no"}
    rows = result["rows"]
    lines = ["| task | strategy | budget | extra NLL | agreement | metric | on-policy KL | on-policy KL (exact) | "
             "repeated token 4-grams |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r.get("group", IN_DISTRIBUTION) != IN_DISTRIBUTION, r["task"], r["budget"],
                                         r["strategy"])):
        m = metric_of.get(r["task"])
        mv = f"{m} {r['metrics'][m]:.3f}" if m in r.get("metrics", {}) else ""
        rep = r.get("repetition")
        lines.append(f"| {r['task']} | {r['strategy']} | {r['budget']:g} | {_num(r.get('extra_nll'), '{:+.3f}')} | "
                     f"{_num(r.get('agreement'), '{:.2f}')} | {mv} | {_num(r.get('onpolicy_kl'), '{:.3f}')} | "
                     f"{_num(r.get('onpolicy_kl_exact'), '{:.3f}')} | {_num(rep and rep['token_4gram'], '{:.1%}')} |")
    return "\n".join(lines)


def _num(v, fmt: str) -> str:
    return "" if v is None else fmt.format(v)


def measures_table(result: dict) -> str:
    """A Markdown table per (budget, strategy) and group (in-distribution tasks, held-out sources): the mean
    over the group's tasks or sources of each measure, and beside the repetition the full model's own.

    Means are unweighted over tasks/sources that have the measure (extra NLL: those with references);
    "looping" and "runs >= 8" are the shares of replies above 20% repeated token 4-grams and with a run
    of 8 or more of one token."""
    rows = result["rows"]
    full = {r["task"]: r for r in rows if r["strategy"] == "full"}
    lines = ["| budget | strategy | group | tasks | extra NLL | on-policy KL | on-policy KL (exact) | repeated token "
             "4-grams (full model) | looping replies (full) | runs >= 8 (full) | repeated word 4-grams |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["budget"], r["strategy"]) for r in rows}, key=lambda k: (k[0], k[1] != "full", k[1]))
    for budget, strategy in keys:
        for group in (IN_DISTRIBUTION, HELDOUT):
            rs = [r for r in rows if (r["budget"], r["strategy"]) == (budget, strategy)
                  and r.get("group", IN_DISTRIBUTION) == group]
            if not rs:
                continue
            fs = [full[r["task"]] for r in rs if r["task"] in full]

            def mean(rows_, get):
                vals = [v for v in map(get, rows_) if v is not None and not math.isnan(v)]
                return float(np.mean(vals)) if vals else None

            def rep(k, fmt):
                get = lambda r: (r.get("repetition") or {}).get(k)  # noqa: E731
                own, ref = mean(rs, get), mean(fs, get)
                return "" if own is None else (fmt.format(own) + ("" if strategy == "full" or ref is None
                                                                  else f" ({fmt.format(ref)})"))

            lines.append(f"| {budget:g} | {strategy} | {group} | {len(rs)} | "
                         f"{_num(mean(rs, lambda r: r.get('extra_nll')), '{:+.3f}')} | "
                         f"{_num(mean(rs, lambda r: r.get('onpolicy_kl')), '{:.3f}')} | "
                         f"{_num(mean(rs, lambda r: r.get('onpolicy_kl_exact')), '{:.3f}')} | {rep('token_4gram', '{:.1%}')} | "
                         f"{rep('looping', '{:.0%}')} | {rep('long_runs', '{:.0%}')} | "
                         f"{_num(mean(rs, lambda r: (r.get('repetition') or {}).get('word_4gram')), '{:.1%}')} |")
    return "\n".join(lines)


__all__ = ["EvalConfig", "MEASURES", "evaluate", "measures_table", "parse_measures", "plot", "summary_table",
           "task_metrics", "TASKS"]
