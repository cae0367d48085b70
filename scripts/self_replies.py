"""The full model's own greedy replies to training prompts, as extra training data (JSON Lines).

    .venv/bin/python scripts/self_replies.py --n 400 -o self-replies.jsonl
    first-gguf train ... --extra-data self-replies.jsonl

Teacher-forced references (the tasks' continuations) are not what a chat sees: while decoding, the
skipped model continues the model's *own* text. These examples pair train-split prompts of the
summarization, qa, mc and docs tasks (never dev/test, never the side-by-side prompts) with the
full-depth model's greedy reply, so distillation also covers the distribution greedy decoding visits.
Each line: {"task": "self", "messages": [...], "target": reply, "source": task}.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

import first_gguf
from first_gguf.tasks import load_task, split

SOURCES = ("summarization", "qa", "mc", "docs")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GGUF (default: the embedded model)")
    ap.add_argument("--n", type=int, default=400, help="number of replies (spread evenly over the sources)")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-o", "--output", required=True)
    a = ap.parse_args()
    if a.n < 1 or a.max_tokens < 2:
        sys.exit("--n must be >= 1 and --max-tokens >= 2")
    out = Path(a.output)
    rng = random.Random(a.seed)
    picks = []
    for i, task in enumerate(SOURCES):
        tr = split(load_task(task), "train", seed=0)
        rng.shuffle(tr)
        picks += [(task, ex) for ex in tr[: a.n // len(SOURCES) + (i < a.n % len(SOURCES))]]
    tmp = out.with_name(out.name + ".part")
    with first_gguf.load(a.model, n_threads=a.threads) as m, open(tmp, "w") as f:
        for i, (task, ex) in enumerate(picks):
            m.reset()
            g = m.chat(list(ex.messages), 0.0, max_tokens=a.max_tokens)
            if len(g.text.strip()) >= 8:
                f.write(json.dumps({"task": "self", "messages": list(ex.messages), "target": g.text,
                                    "source": task}) + "\n")
            if (i + 1) % 50 == 0:
                print(f"{i + 1}/{len(picks)}", file=sys.stderr, flush=True)
    os.replace(tmp, out)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
