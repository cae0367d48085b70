"""The evaluation run of ``first-gguf eval``: ``EvalConfig`` and its checks, ``evaluate`` (rows per task or
held-out source, strategy and budget, appended to ``results.jsonl`` and resumed from it), the settings a
resumed folder must share (``run.json``), and the measuring of one row.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..datasets.heldout import load_heldout, parse_heldout
from ..datasets.tasks import Example, load_task, parse_tasks, split
from ..models import sha256_file
from ..measures import (OnPolicyKL, Repetition, complete, greedy_repetition, onpolicy_kl, pool_onpolicy,
                        pool_repetition)
from ..model import Model
from .metrics import task_metrics
from .report import HELDOUT, IN_DISTRIBUTION, _fmt_row, n_prompts_differ, write_results

MEASURES = ("nll", "onpolicy", "repetition")


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


def _check_strategy(model: Model, s) -> None:
    """``full`` (the budget-0 rows) or a skip strategy as ``Model.check_skip`` parses it, under its own name:
    not ``auto`` (it resolves to router or static; rows name what ran) nor ``random:<seed>`` (``random`` is
    run with ``random_seeds`` seeds)."""
    if s == "full":
        return
    try:
        resolved = model.check_skip(0.0, s).strategy
        why = None if resolved == s and ":" not in s else (
            "'auto' picks router or static: name one" if s == "auto" else "use 'random' and random_seeds")
    except (TypeError, ValueError) as e:
        why = str(e)
    if why is not None:
        raise ValueError(f"unknown strategy {s!r}; expected 'full' or a skip strategy other than 'auto' and "
                         f"'random:<seed>' ({why})")


def check_config(model: Model, cfg: EvalConfig) -> None:
    cfg.heldout = parse_heldout(cfg.heldout)
    if not cfg.tasks and not cfg.heldout:
        raise ValueError("no tasks and no held-out sources given; expected at least one of them")
    cfg.tasks = parse_tasks(cfg.tasks) if cfg.tasks else []
    cfg.measures = parse_measures(cfg.measures)
    for b in cfg.budgets:
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 <= b < 1 or math.isnan(b):
            raise ValueError(f"budget {b!r} out of range; expected numbers in [0, 1)")
    for s in cfg.strategies:
        _check_strategy(model, s)
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
        uids = [ex.uid for ex, *_ in enc]
        _check_same_prompts(out, task, uids, [r for k, r in done.items() if k[0] == task])
        # the full model's reference: NLL, greedy output, its own repetition
        key_full = (task, "full", 0.0)
        if key_full not in done:
            done[key_full] = {**_run(model, task, group, enc, None, 0.0, cfg, None), "uids": uids}
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
                r = {**_merge(runs, strategy), "uids": uids}
                done[key] = r
                _append(done_path, r)
                progress(f"eval {task:13s} {strategy:15s} budget {b:<4g} {_fmt_row(r)}")

    speed = None
    if cfg.bench:
        from ..bench import run_bench

        strat = "router" if model.n_routers else ("static" if model.info.static_rankings else None)
        if strat:
            speed = run_bench(model, budgets, skip_strategy=strat, repeats=cfg.bench_repeats, gen_tokens=64,
                              prompt_tokens=128, progress=progress)
    rows = [r for r in done.values() if r["task"] in cfg.tasks + cfg.heldout]
    result = {"model": str(model.path), "n_layer": model.n_layer, "config": cfg.__dict__, "rows": rows, "speed": speed,
              "seconds": round(time.time() - t_start, 1)}
    write_results(result, out)
    return result


def _run_settings(model: Model, cfg: EvalConfig) -> dict:
    """What rows are measured with: resumed rows must share all of it."""
    sidecar = None if model.routers_path is None else Path(model.routers_path)
    # files by content too: shipping a router file rewrites it in place, under the same path
    run = {"model": str(Path(model.path).resolve()), "model_sha256": sha256_file(Path(model.path)),
           "routers": None if sidecar is None else str(sidecar.resolve()),
           "routers_sha256": None if sidecar is None else sha256_file(sidecar), "bypass": model.bypass,
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


def _check_same_prompts(out: Path, task: str, uids: list[str], rows: list[dict]) -> None:
    """Refuse to add rows of ``task`` to a folder whose rows of it were measured on other prompts. The prompts
    come from files on the measuring machine (de and translation from the Debian catalogues installed, which
    depend on the packages there), so the same command can draw other prompts on another machine. Each row
    records its examples' ids (``uids``); rows written before that are not checked."""
    for r in rows:
        if "uids" in r and r["uids"] != uids:
            n = n_prompts_differ(r["uids"], uids)
            raise ValueError(f"{out}: {task!r} was measured there on other prompts ({n} of {len(r['uids'])} differ; "
                             "the prompts come from files on this machine, e.g. the Debian catalogues installed); "
                             "use another --output folder")


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
