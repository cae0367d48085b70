"""Merge `first-gguf eval` runs into the recovery table: extra NLL per task for each recovery x selection x budget.

    .venv/bin/python research/recovery_table.py "no recovery=results-none" "bypass=results-bypass" \\
        -o docs/results/recovery.csv > table.md
    # columns of an earlier table: LABEL=FILE.csv[:LABEL_IN_FILE]
    .venv/bin/python research/recovery_table.py "no recovery=old.csv" "stage 4=old.csv:bypass" "stage 5=results" -o new.csv

Each argument is LABEL=FOLDER (a folder written by `first-gguf eval`, read from its results.jsonl) or
LABEL=FILE.csv[:OLD] (the rows of an earlier output of this script whose recovery is OLD, default LABEL);
the strategies `router` and `static` of every run become columns, budgets and tasks rows.
Prints a Markdown table (mean row per budget) and writes every number to the CSV.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path


def load(folder: Path) -> dict:
    """(task, strategy, budget) -> {"extra_nll", "n", "agreement"} from an eval folder's results.jsonl."""
    rows = {}
    path = folder / "results.jsonl"
    if not path.is_file():
        raise SystemExit(f"no results.jsonl in {folder}: run `first-gguf eval ... -o {folder}` first")
    for line in path.read_text().splitlines():
        r = json.loads(line)
        rows[(r["task"], r["strategy"], round(r["budget"], 4))] = r
    out = {}
    for (t, s, b), r in rows.items():
        full = rows.get((t, "full", 0.0))
        if b > 0 and full is not None:
            out[(t, s, b)] = {"extra_nll": r["nll"] - full["nll"], "n": r["n"], "agreement": r["agreement"]}
    return out


def load_csv(path: Path, label: str) -> dict:
    """The same mapping from an earlier CSV of this script, rows whose recovery is ``label``."""
    try:
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r["recovery"] == label]
    except (OSError, KeyError, csv.Error) as e:
        raise SystemExit(f"cannot read {path} as a recovery table: {e}")
    if not rows:
        raise SystemExit(f"{path} has no rows with recovery {label!r}")
    return {(r["task"], r["selection"], round(float(r["budget"]), 4)):
            {"extra_nll": float(r["extra_nll"]), "n": int(r["n"]), "agreement": float(r["agreement"])} for r in rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="LABEL=FOLDER or LABEL=FILE.csv[:LABEL_IN_FILE]")
    ap.add_argument("-o", "--csv", required=True)
    args = ap.parse_args()
    runs = []
    for spec in args.runs:
        label, sep, where = spec.partition("=")
        if not sep:
            raise SystemExit(f"expected LABEL=FOLDER or LABEL=FILE.csv[:LABEL]; got {spec!r}")
        path, _, old = where.partition(".csv")
        if where.endswith(".csv") or old.startswith(":"):
            runs.append((label, load_csv(Path(path + ".csv"), old[1:] or label)))
        else:
            runs.append((label, load(Path(where))))
    tasks = sorted({k[0] for _, rows in runs for k in rows})
    budgets = sorted({k[2] for _, rows in runs for k in rows})
    cols = [(label, s) for label, _ in runs for s in ("router", "static")]

    out = []
    head = "| skip_budget | task | " + " | ".join(f"{label}: {s}" for label, s in cols) + " |"
    lines = [head, "|" + "---|" * (2 + len(cols))]
    for b in budgets:
        vals = {c: [] for c in cols}
        for t in tasks:
            cells = []
            for label, s in cols:
                r = dict(runs)[label].get((t, s, b))
                cells.append("n/a" if r is None else f"{r['extra_nll']:+.2f}")
                if r is not None:
                    vals[(label, s)].append(r["extra_nll"])
                    out.append({"budget": b, "task": t, "recovery": label, "selection": s,
                                "extra_nll": round(r["extra_nll"], 4), "n": r["n"],
                                "agreement": round(r["agreement"], 4)})
            lines.append(f"| {b:g} | {t} | " + " | ".join(cells) + " |")
        means = [f"**{sum(v) / len(v):+.2f}**" if v else "n/a" for v in vals.values()]
        lines.append(f"| {b:g} | **mean** | " + " | ".join(means) + " |")
    with open(args.csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(out[0]))
        w.writeheader()
        w.writerows(out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
