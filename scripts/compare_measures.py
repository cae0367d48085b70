"""Side-by-side table of `first-gguf eval --measures ...` results of several router files (Markdown).

    .venv/bin/python scripts/compare_measures.py shipped=runs/eval-shipped new=runs/eval-new \
        -o docs/results/onpolicy_measures.md

For each (budget, strategy) and group (in-distribution test split, held-out sources): the unweighted mean
over tasks/sources of on-policy KL, teacher-forced extra NLL (tasks/sources with references), repeated
token 4-grams of greedy replies and the share of looping replies, one column per labelled results
folder; the full model's own repetition is given in the `full` rows. Then the same per task/source, and
the on-policy KL of every other folder paired by prompt with the first one's (the same prompts, seeds and
settings): mean per-prompt difference +- its standard error, and on how many prompts it is lower (the
exact per-state KL where both folders have it, else the sampled-token one).
Folders must have been measured with the same settings (checked: tasks, sources, budgets, token counts).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

KEYS = ("measures", "gen_tokens", "onpolicy_tokens", "greedy_tokens", "seed", "split")


def _load(spec: str) -> tuple[str, dict]:
    if "=" not in spec:
        sys.exit(f"{spec!r}: expected LABEL=RESULTS_FOLDER")
    label, folder = spec.split("=", 1)
    rows, run = [], {}
    p = Path(folder) / "results.jsonl"
    if not p.is_file():
        sys.exit(f"{p}: not found (a folder written by first-gguf eval)")
    for line in p.read_text().splitlines():
        if line.strip():
            rows.append(json.loads(line))
    rp = Path(folder) / "run.json"
    if rp.is_file():
        run = json.loads(rp.read_text())
    return label, {"rows": rows, "run": run}


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


MEASURES = (("onpolicy_kl_exact", "on-policy KL, exact"), ("onpolicy_kl", "on-policy KL"), ("extra_nll", "extra NLL"),
            ("token_4gram", "repeated token 4-grams"), ("looping", "looping replies"))


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
    groups = sorted({r.get("group", "in-distribution") for x in runs.values() for r in x["rows"]})
    for budget, strategy in keys:
        if strategy == "full":
            continue
        for group in groups:
            cells = []
            for lab in labels[1:]:
                diffs = []
                for r in runs[lab]["rows"]:
                    if (r["budget"], r["strategy"], r.get("group", "in-distribution")) != (budget, strategy, group):
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="LABEL=RESULTS_FOLDER (first-gguf eval -o ...)")
    ap.add_argument("-o", "--output", default=None, help="Markdown file (default: stdout)")
    a = ap.parse_args()
    runs = dict(_load(s) for s in a.runs)
    ref = next(iter(runs.values()))["run"]
    for label, r in runs.items():
        diff = [k for k in KEYS if r["run"].get(k) != ref.get(k)]
        if diff:
            sys.exit(f"{label}: measured with other settings ({', '.join(diff)}); compare like with like")
    labels = list(runs)
    lines = ["| budget | strategy | group | " + " | ".join(f"{m}: {lab}" for _, m in MEASURES for lab in labels) + " |",
             "|---|---|---|" + "---|" * (len(MEASURES) * len(labels))]
    keys = sorted({(r["budget"], r["strategy"]) for x in runs.values() for r in x["rows"]},
                  key=lambda k: (k[0], k[1] != "full", k[1]))
    groups = sorted({r.get("group", "in-distribution") for x in runs.values() for r in x["rows"]})
    for budget, strategy in keys:
        for group in groups:
            cells = []
            for key, _ in MEASURES:
                for lab in labels:
                    rs = [r for r in runs[lab]["rows"] if (r["budget"], r["strategy"]) == (budget, strategy)
                          and r.get("group", "in-distribution") == group]
                    cells.append(_fmt(_mean([_get(r, key) for r in rs]), key))
            lines.append(f"| {budget:g} | {strategy} | {group} | " + " | ".join(cells) + " |")
    lines += ["", "Per task / source (on-policy KL exact per state, repeated token 4-grams, distinct skip sets over the prompts):", "",
              "| budget | strategy | task/source | " + " | ".join(f"KL, exact: {lab}" for lab in labels) + " | "
              + " | ".join(f"rep: {lab}" for lab in labels) + " | " + " | ".join(f"sets: {lab}" for lab in labels)
              + " |", "|---|---|---|" + "---|" * (3 * len(labels))]
    tasks = sorted({r["task"] for x in runs.values() for r in x["rows"]})
    for budget, strategy in keys:
        for t in tasks:
            def one(lab, key):
                rs = [r for r in runs[lab]["rows"] if (r["budget"], r["strategy"], r["task"]) == (budget, strategy, t)]
                return _fmt(_mean([_get(r, key) for r in rs]), key)
            def sets(lab):
                rs = [r for r in runs[lab]["rows"] if (r["budget"], r["strategy"], r["task"]) == (budget, strategy, t)]
                return str(len({tuple(x) for r in rs for x in r.get("skipped", [])})) if rs else ""
            lines.append(f"| {budget:g} | {strategy} | {t} | " + " | ".join(one(lab, "onpolicy_kl_exact") for lab in labels)
                         + " | " + " | ".join(one(lab, "token_4gram") for lab in labels) + " | "
                         + " | ".join(sets(lab) for lab in labels) + " |")
    lines += _paired(runs, labels, keys)
    text = "\n".join(lines) + "\n"
    if a.output:
        Path(a.output).parent.mkdir(parents=True, exist_ok=True)
        Path(a.output).write_text(text)
        print(f"wrote {a.output}", file=sys.stderr)
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
