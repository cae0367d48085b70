"""What ``first-gguf eval`` writes and prints from its rows: the progress line of a row, ``results.json``,
``results.csv`` and the plots (``write_results``, ``plot``), the Markdown tables (``summary_table``,
``measures_table``), and the side-by-side table of several results folders (``compare_measures``, behind
``first-gguf compare``). Rows belong to a group: ``IN_DISTRIBUTION`` or ``HELDOUT``.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Mapping

import numpy as np

IN_DISTRIBUTION, HELDOUT = "in-distribution", "held-out source"


# ---------------------------------------------------------------- progress line
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


# ---------------------------------------------------------------- files
def write_results(result: dict, out: Path) -> None:
    """results.json, results.csv and the plots of an evaluation's result in the folder ``out``."""
    (out / "results.json").write_text(json.dumps(result, indent=2))
    _write_csv(out / "results.csv", result["rows"])
    plot(result, out)


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


# ---------------------------------------------------------------- tables of one run
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


# ---------------------------------------------------------------- several runs side by side
COMPARE_KEYS = ("measures", "gen_tokens", "onpolicy_tokens", "greedy_tokens", "seed", "split")
_COMPARE_COLUMNS = (("onpolicy_kl_exact", "on-policy KL, exact"), ("onpolicy_kl", "on-policy KL"),
                    ("extra_nll", "extra NLL"), ("token_4gram", "repeated token 4-grams"),
                    ("looping", "looping replies"))


def parse_labelled(spec: str) -> tuple[str, str]:
    """(label, folder) from "LABEL=RESULTS_FOLDER"; ValueError otherwise."""
    if "=" not in spec:
        raise ValueError(f"{spec!r}: expected LABEL=RESULTS_FOLDER")
    label, folder = spec.split("=", 1)
    return label, folder


def load_results(folder: str | Path) -> dict:
    """{"rows": the rows of results.jsonl, "run": run.json ({} without one)} of a results folder."""
    rows, run = [], {}
    p = Path(folder) / "results.jsonl"
    if not p.is_file():
        raise ValueError(f"{p}: not found (a folder written by first-gguf eval)")
    for line in p.read_text().splitlines():
        if line.strip():
            rows.append(json.loads(line))
    rp = Path(folder) / "run.json"
    if rp.is_file():
        run = json.loads(rp.read_text())
    return {"rows": rows, "run": run}


def _mean(vals):
    vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(vals)) if vals else None


def _get(r: dict, key: str):
    if key in ("token_4gram", "looping", "long_runs"):
        return (r.get("repetition") or {}).get(key)
    return r.get(key)


def _fmt(v, key):
    if v is None:
        return ""
    return {"onpolicy_kl": "{:.3f}", "onpolicy_kl_exact": "{:.3f}", "extra_nll": "{:+.3f}", "token_4gram": "{:.1%}",
            "looping": "{:.0%}", "long_runs": "{:.0%}"}[key].format(v)


def _per_prompt(r: dict, exact: bool):
    op = r.get("onpolicy") or {}
    return op.get("per_prompt_exact" if exact else "per_prompt")


def _paired(runs: dict, labels: list[str], keys) -> list[str]:
    """On-policy KL of each folder after the first, paired by prompt with the first folder's."""
    if len(labels) < 2:
        return []
    base = labels[0]
    base_rows = {(x["budget"], x["strategy"], x["task"]): x for x in runs[base]["rows"]}
    lines = ["", f"On-policy KL paired by prompt with `{base}` (mean difference +- standard error over the "
             "prompts of every task/source; lower on: prompts where it is lower):", "",
             "| budget | strategy | group | " + " | ".join(labels[1:]) + " |", "|---|---|---|" + "---|" * (len(labels) - 1)]
    groups = sorted({r.get("group", IN_DISTRIBUTION) for x in runs.values() for r in x["rows"]})
    for budget, strategy in keys:
        if strategy == "full":
            continue
        for group in groups:
            cells = []
            for lab in labels[1:]:
                diffs = []
                for r in runs[lab]["rows"]:
                    if (r["budget"], r["strategy"], r.get("group", IN_DISTRIBUTION)) != (budget, strategy, group):
                        continue
                    b = base_rows.get((budget, strategy, r["task"]))
                    if b is None:
                        continue
                    exact = _per_prompt(r, True) is not None and _per_prompt(b, True) is not None
                    pa, pb = _per_prompt(r, exact), _per_prompt(b, exact)
                    if pa is None or pb is None or len(pa) != len(pb):
                        continue
                    diffs += [u - v for u, v in zip(pa, pb) if u is not None and v is not None]
                if len(diffs) < 2:
                    cells.append("")
                    continue
                d = np.array(diffs)
                se = float(d.std(ddof=1) / math.sqrt(len(d)))
                cells.append(f"{d.mean():+.3f} +- {se:.3f} (lower on {int((d < 0).sum())}/{len(d)})")
            if any(cells):
                lines.append(f"| {budget:g} | {strategy} | {group} | " + " | ".join(cells) + " |")
    return lines


def n_prompts_differ(a: list[str], b: list[str]) -> int:
    """How many positions of two rows' example-id lists (``uids``) differ, a length difference included."""
    return sum(x != y for x, y in zip(a, b)) + abs(len(a) - len(b))


def _check_same_prompts(runs: dict, labels: list[str]) -> None:
    """Refuse folders whose rows of one task or source were measured on other prompts than the first folder's
    (rows record their examples' ids as ``uids``; held-out de and the translation task read the Debian
    catalogues installed, so two machines can draw other prompts). Rows without ids (older folders) are not
    checked."""
    def uids(lab):
        return {r["task"]: r["uids"] for r in runs[lab]["rows"] if "uids" in r}

    ref = uids(labels[0])
    for lab in labels[1:]:
        for task, u in uids(lab).items():
            if task in ref and ref[task] != u:
                n = n_prompts_differ(ref[task], u)
                raise ValueError(f"{lab}: {task!r} was measured on other prompts than {labels[0]}'s ({n} of "
                                 f"{len(ref[task])} differ; the prompts come from files on the measuring machine, "
                                 "e.g. the Debian catalogues installed); compare like with like")


def compare_measures(folders: Mapping[str, str | Path]) -> str:
    """Side-by-side Markdown tables of `first-gguf eval --measures ...` results folders, one per label.

    For each (budget, strategy) and group (in-distribution test split, held-out sources): the unweighted mean
    over tasks/sources of on-policy KL, teacher-forced extra NLL (tasks/sources with references), repeated
    token 4-grams of greedy replies and the share of looping replies, one column per labelled results
    folder; the full model's own repetition is given in the `full` rows. Then the same per task/source, and
    the on-policy KL of every other folder paired by prompt with the first one's (the same prompts, seeds and
    settings): mean per-prompt difference +- its standard error, and on how many prompts it is lower (the
    exact per-state KL where both folders have it, else the sampled-token one).

    Raises ValueError for a folder without results.jsonl, for folders measured with other settings
    (``COMPARE_KEYS`` of run.json) than the first, and for rows measured on other prompts than the first's."""
    if not folders:
        raise ValueError("no results folders given; expected LABEL=RESULTS_FOLDER")
    runs = {label: load_results(folder) for label, folder in folders.items()}
    ref = next(iter(runs.values()))["run"]
    for label, r in runs.items():
        diff = [k for k in COMPARE_KEYS if r["run"].get(k) != ref.get(k)]
        if diff:
            raise ValueError(f"{label}: measured with other settings ({', '.join(diff)}); compare like with like")
    labels = list(runs)
    _check_same_prompts(runs, labels)
    lines = ["| budget | strategy | group | " + " | ".join(f"{m}: {lab}" for _, m in _COMPARE_COLUMNS for lab in labels)
             + " |", "|---|---|---|" + "---|" * (len(_COMPARE_COLUMNS) * len(labels))]
    keys = sorted({(r["budget"], r["strategy"]) for x in runs.values() for r in x["rows"]},
                  key=lambda k: (k[0], k[1] != "full", k[1]))
    groups = sorted({r.get("group", IN_DISTRIBUTION) for x in runs.values() for r in x["rows"]})
    for budget, strategy in keys:
        for group in groups:
            cells = []
            for key, _ in _COMPARE_COLUMNS:
                for lab in labels:
                    rs = [r for r in runs[lab]["rows"] if (r["budget"], r["strategy"]) == (budget, strategy)
                          and r.get("group", IN_DISTRIBUTION) == group]
                    cells.append(_fmt(_mean([_get(r, key) for r in rs]), key))
            lines.append(f"| {budget:g} | {strategy} | {group} | " + " | ".join(cells) + " |")
    lines += ["", "Per task / source (on-policy KL exact per state, repeated token 4-grams, distinct skip sets over "
              "the prompts):", "",
              "| budget | strategy | task/source | " + " | ".join(f"KL, exact: {lab}" for lab in labels) + " | "
              + " | ".join(f"rep: {lab}" for lab in labels) + " | " + " | ".join(f"sets: {lab}" for lab in labels)
              + " |", "|---|---|---|" + "---|" * (3 * len(labels))]
    tasks = sorted({r["task"] for x in runs.values() for r in x["rows"]})
    for budget, strategy in keys:
        for t in tasks:
            def of(lab):
                return [r for r in runs[lab]["rows"] if (r["budget"], r["strategy"], r["task"]) == (budget, strategy, t)]

            def one(lab, key):
                return _fmt(_mean([_get(r, key) for r in of(lab)]), key)

            def sets(lab):
                rs = of(lab)
                return str(len({tuple(x) for r in rs for x in r.get("skipped", [])})) if rs else ""
            lines.append(f"| {budget:g} | {strategy} | {t} | " + " | ".join(one(lab, "onpolicy_kl_exact") for lab in labels)
                         + " | " + " | ".join(one(lab, "token_4gram") for lab in labels) + " | "
                         + " | ".join(sets(lab) for lab in labels) + " |")
    lines += _paired(runs, labels, keys)
    return "\n".join(lines) + "\n"
