"""Side-by-side table of `first-gguf eval --measures ...` results of several router files (Markdown).

    .venv/bin/python scripts/compare_measures.py shipped=runs/eval-shipped new=runs/eval-new \
        -o docs/results/onpolicy_measures.md

A thin wrapper around first_gguf.evaluate.compare_measures (first_gguf/evaluate/report.py), which says what
the tables hold. Folders must have been measured with the same settings (checked, from their run.json:
measures, token counts, seed, split).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from first_gguf.evaluate import compare_measures, parse_labelled


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="LABEL=RESULTS_FOLDER (first-gguf eval -o ...)")
    ap.add_argument("-o", "--output", default=None, help="Markdown file (default: stdout)")
    a = ap.parse_args()
    try:
        text = compare_measures(dict(parse_labelled(s) for s in a.runs))
    except ValueError as e:
        sys.exit(str(e))
    if a.output:
        Path(a.output).parent.mkdir(parents=True, exist_ok=True)
        Path(a.output).write_text(text)
        print(f"wrote {a.output}", file=sys.stderr)
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
