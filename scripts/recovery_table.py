"""Merge `first-gguf eval` runs into the recovery table: extra NLL per task for each recovery x selection x budget.

    .venv/bin/python scripts/recovery_table.py "no recovery=results-none" "bypass=results-bypass" \\
        -o docs/results/recovery.csv > table.md

Each argument is LABEL=FOLDER (a folder written by `first-gguf eval`, read from its results.jsonl);
the strategies `router` and `static` of every folder become columns, budgets and tasks rows.
Prints a Markdown table (mean row per budget) and writes every number to the CSV.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path


def load(folder: Path) -> dict:
    rows = {}
    path = folder / "results.jsonl"
    if not path.is_file():
        raise SystemExit(f"no results.jsonl in {folder}: run `first-gguf eval ... -o {folder}` first")
    for line in path.read_text().splitlines():
        r = json.loads(line)
        rows[(r["task"], r["strategy"], round(r["budget"], 4))] = r
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="LABEL=FOLDER")
    ap.add_argument("-o", "--csv", required=True)
    args = ap.parse_args()
    runs = []
    for spec in args.runs:
        label, sep, folder = spec.partition("=")
        if not sep:
            raise SystemExit(f"expected LABEL=FOLDER; got {spec!r}")
        runs.append((label, load(Path(folder))))
    tasks = sorted({k[0] for _, rows in runs for k in rows})
    budgets = sorted({k[2] for _, rows in runs for k in rows if k[2] > 0})
    cols = [(label, s) for label, _ in runs for s in ("router", "static")]

    def extra(rows, task, strategy, budget):
        r, full = rows.get((task, strategy, budget)), rows.get((task, "full", 0.0))
        return None if r is None or full is None else r["nll"] - full["nll"]

    out = []
    head = "| skip_budget | task | " + " | ".join(f"{label}: {s}" for label, s in cols) + " |"
    lines = [head, "|" + "---|" * (2 + len(cols))]
    for b in budgets:
        vals = {c: [] for c in cols}
        for t in tasks:
            cells = []
            for label, s in cols:
                rows = dict(runs)[label]
                v = extra(rows, t, s, b)
                cells.append("n/a" if v is None else f"{v:+.2f}")
                if v is not None:
                    vals[(label, s)].append(v)
                    out.append({"budget": b, "task": t, "recovery": label, "selection": s, "extra_nll": round(v, 4),
                                "n": rows[(t, s, b)]["n"], "agreement": round(rows[(t, s, b)]["agreement"], 4)})
            lines.append(f"| {b:g} | {t} | " + " | ".join(cells) + " |")
        means = [f"**{sum(v) / len(v):+.2f}**" if v else "n/a" for v in vals.values()]
        lines.append(f"| {b:g} | **mean** | " + " | ".join(means) + " |")
    print("\n".join(lines))
    with open(args.csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(out[0]))
        w.writeheader()
        w.writerows(out)


if __name__ == "__main__":
    main()
