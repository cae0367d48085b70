"""Evaluation: quality against speed, FiRST routers against static skipping.

For every (task, strategy, budget) on the same prompts and the same runtime:

- extra NLL: mean negative log-likelihood per token of the reference
  continuation minus the full model's (teacher-forced, Model.score_tokens: prompt
  at full depth, continuation decoded with the blocks skipped): the most stable
  quality signal for a small model;
- agreement: fraction of greedy tokens equal to the full model's greedy output
  (position by position, over ``gen_tokens``);
- the task metric on the greedy output: ROUGE-L (summarization), chrF and BLEU
  (translation), exact match / token F1 (qa); multiple choice (mc) is scored by
  log-likelihood of each option through Model.score_tokens (accuracy);
- which blocks were skipped (for the per-task heatmap).

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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .model import Model
from .tasks import TASKS, Example, load_task, parse_tasks, split

STRATEGIES_BUILTIN = ("full", "router", "static", "random", "last")


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


def task_metrics(task: str, pred: str, ref: str) -> dict[str, float]:
    if task == "summarization":
        return {"rougeL": rouge_l(pred, ref)}
    if task == "translation":
        return {"chrF": chrf(pred, ref), "BLEU": bleu(pred, ref)}
    if task == "qa":
        return {"EM": exact_match(pred, ref), "F1": token_f1(pred, ref)}
    if task == "docs":
        return {"rougeL": rouge_l(pred, ref)}
    return {}


# ------------------------------------------------------------ evaluation
@dataclass
class EvalConfig:
    tasks: list[str]
    budgets: list[float]
    strategies: list[str]
    n_examples: int = 20
    gen_tokens: int = 48
    split: str = "test"
    random_seeds: int = 3
    bench: bool = True
    bench_repeats: int = 5


def check_config(model: Model, cfg: EvalConfig) -> None:
    cfg.tasks = parse_tasks(cfg.tasks)
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
    if cfg.n_examples < 1 or cfg.gen_tokens < 1:
        raise ValueError("n_examples and gen_tokens must be >= 1")


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
    # what the resumed rows were measured with: another model file, bypass or decode-LoRA setting would mix runs
    run = {"model": str(Path(model.path).resolve()), "bypass": model.bypass,
           "decode_lora": None if model.decode_lora_path is None else str(model.decode_lora_path.resolve()),
           "gen_tokens": cfg.gen_tokens, "split": cfg.split}
    run_path = out / "run.json"
    if done_path.exists() and run_path.exists():
        before = json.loads(run_path.read_text())
        diff = {k: (before.get(k), v) for k, v in run.items() if before.get(k) != v}
        if diff:
            what = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
            raise ValueError(f"{out} holds results of another run ({what}); use another --output folder")
    run_path.write_text(json.dumps(run, indent=1) + "\n")
    done = {}
    if done_path.exists():
        for line in done_path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done[(r["task"], r["strategy"], r["budget"])] = r
    budgets = sorted(set(float(b) for b in cfg.budgets))
    strategies = [s for s in cfg.strategies if s != "full"]
    t_start = time.time()

    for task in cfg.tasks:
        examples = split(load_task(task), cfg.split, seed=0)[: cfg.n_examples]
        if not examples:
            raise ValueError(f"task {task!r} has no {cfg.split} examples")
        enc = []
        for ex in examples:
            p, stops = model.prompt_tokens_for(list(ex.messages))
            c = model.tokenize(ex.target, add_bos=False)[:64]
            if len(p) + max(len(c), cfg.gen_tokens) + 2 < model.n_ctx and len(c) >= 1:
                enc.append((ex, p, c, stops))
        # the full model's reference: NLL and greedy output
        key_full = (task, "full", 0.0)
        if key_full not in done:
            done[key_full] = _run(model, task, enc, None, 0.0, cfg, None)
            _append(done_path, done[key_full])
        full = done[key_full]
        for strategy in strategies:
            for b in budgets:
                if b == 0.0:
                    continue
                key = (task, strategy, b)
                if key in done:
                    continue
                runs = [_run(model, task, enc, s, b, cfg, full) for s in _strategy_runs(strategy, cfg)]
                r = _merge(runs, strategy)
                done[key] = r
                _append(done_path, r)
                progress(f"eval {task:13s} {strategy:15s} budget {b:<4g} extra NLL {r['extra_nll']:+.3f} "
                         f"agreement {r['agreement']:.2f} {_fmt_metrics(r['metrics'])}")

    speed = None
    if cfg.bench:
        from .bench import run_bench

        strat = "router" if model.n_routers else ("static" if model.info.static_rankings else None)
        if strat:
            speed = run_bench(model, budgets, skip_strategy=strat, repeats=cfg.bench_repeats, gen_tokens=64,
                              prompt_tokens=128, progress=progress)
    rows = [r for r in done.values() if r["task"] in cfg.tasks]
    result = {"model": str(model.path), "n_layer": model.n_layer, "config": cfg.__dict__, "rows": rows, "speed": speed,
              "seconds": round(time.time() - t_start, 1)}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    _write_csv(out / "results.csv", rows)
    plot(result, out)
    return result


def _fmt_metrics(m: dict) -> str:
    return " ".join(f"{k} {v:.3f}" for k, v in m.items())


def _append(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _run(model: Model, task: str, enc, strategy: str | None, budget: float, cfg: EvalConfig, full: dict | None) -> dict:
    nll, agree, metrics, skipped = [], [], [], []
    greedy = []
    for i, (ex, p, c, stops) in enumerate(enc):
        kw = {"skip_strategy": strategy} if strategy else {}
        sres = model.score_tokens(p, c, budget, **kw)
        nll.append(-float(np.mean(sres.logprobs)))
        skipped.append(sres.skipped_layers)
        gen = model._stream(p, budget, max_tokens=cfg.gen_tokens, temperature=0.0, top_p=1.0, stop=stops or None,
                            skip_strategy=strategy or "router", skip_layers=None)
        g = None
        for g in gen:
            pass
        g = g.generation
        greedy.append(g.tokens)
        if full is not None:
            ref = full["greedy"][i]
            n = max(len(ref), 1)
            agree.append(sum(1 for a, b in zip(ref, g.tokens) if a == b) / n)
        if task == "mc":
            opts = _mc_options(ex)
            lls = [float(np.sum(model.score_tokens(p, model.tokenize(o, add_bos=False), budget, **kw).logprobs))
                   for o in opts]
            metrics.append({"accuracy": float(opts[int(np.argmax(lls))] == ex.target)})
        else:
            metrics.append(task_metrics(task, g.text.strip(), ex.target))
    agg = {k: float(np.mean([m[k] for m in metrics])) for k in (metrics[0] if metrics else {})}
    row = {"task": task, "strategy": strategy.split(":")[0] if strategy else "full", "budget": budget,
           "n": len(enc), "nll": float(np.mean(nll)), "metrics": agg,
           "agreement": float(np.mean(agree)) if agree else 1.0, "skipped": skipped, "greedy": greedy}
    row["extra_nll"] = row["nll"] - full["nll"] if full is not None else 0.0
    return row


def _merge(runs: list[dict], strategy: str) -> dict:
    if len(runs) == 1:
        r = dict(runs[0])
        r["strategy"] = strategy
        return r
    r = dict(runs[0])
    r["strategy"] = strategy
    for k in ("nll", "extra_nll", "agreement"):
        r[k] = float(np.mean([x[k] for x in runs]))
    r["metrics"] = {k: float(np.mean([x["metrics"][k] for x in runs])) for k in runs[0]["metrics"]}
    r["skipped"] = [s for x in runs for s in x["skipped"]]
    r["n_seeds"] = len(runs)
    return r


def _write_csv(path: Path, rows: list[dict]) -> None:
    metric_names = sorted({k for r in rows for k in r["metrics"]})
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "strategy", "budget", "n", "nll", "extra_nll", "agreement", *metric_names])
        for r in sorted(rows, key=lambda r: (r["task"], r["strategy"], r["budget"])):
            w.writerow([r["task"], r["strategy"], r["budget"], r["n"], f"{r['nll']:.4f}", f"{r['extra_nll']:.4f}",
                        f"{r['agreement']:.4f}", *[f"{r['metrics'].get(m, float('nan')):.4f}" for m in metric_names]])


def plot(result: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    tasks = sorted({r["task"] for r in rows})
    speed = {round(r["skip_budget"], 6): r["decode_ratio"] for r in (result.get("speed") or {}).get("rows", [])}
    files = []
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
    files.append(p)

    router_rows = [r for r in rows if r["strategy"] == "router"]
    if router_rows:
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
        files.append(p)
    return files


def summary_table(result: dict, metric_of: dict[str, str] | None = None) -> str:
    metric_of = metric_of or {"summarization": "rougeL", "translation": "chrF", "qa": "F1", "mc": "accuracy",
                              "docs": "rougeL"}
    rows = result["rows"]
    lines = ["| task | strategy | budget | extra NLL | agreement | metric |", "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["task"], r["budget"], r["strategy"])):
        m = metric_of.get(r["task"])
        mv = f"{m} {r['metrics'][m]:.3f}" if m in r["metrics"] else ""
        lines.append(f"| {r['task']} | {r['strategy']} | {r['budget']:g} | {r['extra_nll']:+.3f} | "
                     f"{r['agreement']:.2f} | {mv} |")
    return "\n".join(lines)


__all__ = ["EvalConfig", "evaluate", "plot", "summary_table", "task_metrics", "TASKS"]
