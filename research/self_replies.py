"""The model's own greedy replies to training prompts, as extra training data (JSON Lines).

    .venv/bin/python research/self_replies.py --n 400 -o self-replies.jsonl                 # full model
    .venv/bin/python research/self_replies.py --budgets 0.1,0.2,0.34 -o student.jsonl      # skipped model
    first-gguf train ... --extra-data self-replies.jsonl

Teacher-forced references (the tasks' continuations) are not what a chat sees: while decoding, the
skipped model continues its *own* text. These examples pair train-split prompts of the source tasks
(never dev/test, never the side-by-side prompts) with a greedy reply, so distillation also covers the
text greedy decoding visits:

- ``--budgets 0`` (default): the full-depth model's replies (sequence-level distillation);
- ``--budgets 0.1,0.2,0.34``: the replies of the skipped model itself (routers + bypass adapters of the
  GGUF, one budget per prompt, in turn). Distilling the full model's next-token distribution along the
  student's own text is on-policy distillation: where the student starts to loop, the teacher's
  distribution is the correction, a signal teacher-forced references never give.

Sources: the train splits of the tasks, and ``linux``: open questions about the installed commands'
manual pages (``apropos -s 1 .``: "What is the Linux command wget used for?", "Explain in a few sentences
what ls (list directory contents) does."), long free-form replies like a chat's, from material no
task or evaluation uses.

Each line: {"task": TASK, "messages": [...], "target": reply, "source": task, "skip_budget": b}.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

import first_gguf
from first_gguf.datasets.tasks import load_task, split

SOURCES = ("summarization", "qa", "mc", "docs", "translation")


def linux_prompts() -> list[tuple[dict, ...]]:
    """Questions about the commands of section 1 of the installed manual pages (first_gguf.datasets.broad)."""
    from first_gguf.datasets.broad import linux_prompts as questions

    out = [({"role": "user", "content": r["prompt"]},) for r in questions()]
    if not out:
        sys.exit("source linux: apropos listed no section-1 manual pages (needs man-db and installed manual pages)")
    return out


def _budgets(text: str) -> list[float]:
    try:
        out = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        out = []
    if not out or any(not 0 <= b < 1 for b in out):
        raise argparse.ArgumentTypeError(f"--budgets {text!r}: expected comma-separated numbers in [0, 1)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GGUF (default: the embedded model)")
    ap.add_argument("--n", type=int, default=400, help="number of replies (spread evenly over the sources)")
    ap.add_argument("--sources", default=",".join(SOURCES),
                    help="tasks whose train prompts are used, and/or 'linux' (questions about manual pages)")
    ap.add_argument("--budgets", type=_budgets, default=[0.0],
                    help="skip budgets, used in turn (0: the full model; >0: routers + bypass adapters)")
    ap.add_argument("--task-name", default="self", help="the examples' task name (a --balance-tasks group)")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard", default="0/1", help="I/N: write only every N-th prompt from the I-th "
                    "(parallel processes; concatenate the outputs)")
    ap.add_argument("-o", "--output", required=True)
    a = ap.parse_args()
    if a.n < 1 or a.max_tokens < 2:
        sys.exit("--n must be >= 1 and --max-tokens >= 2")
    try:
        si, sn = (int(x) for x in a.shard.split("/"))
    except ValueError:
        si, sn = -1, 0
    if not 0 <= si < sn:
        sys.exit(f"--shard {a.shard!r}: expected I/N with 0 <= I < N")
    sources = [s.strip() for s in a.sources.split(",") if s.strip()]
    out = Path(a.output)
    rng = random.Random(a.seed)
    picks = []
    for i, task in enumerate(sources):
        tr = linux_prompts() if task == "linux" else [ex.messages for ex in split(load_task(task), "train", seed=0)]
        rng.shuffle(tr)
        picks += [(task, msgs) for msgs in tr[: a.n // len(sources) + (i < a.n % len(sources))]]
    rng.shuffle(picks)
    jobs = [(i, *p) for i, p in enumerate(picks) if i % sn == si]
    tmp = out.with_name(out.name + ".part")
    with first_gguf.load(a.model, n_threads=a.threads) as m, open(tmp, "w") as f:
        for j, (i, task, msgs) in enumerate(jobs):
            budget = a.budgets[i % len(a.budgets)]
            m.reset()
            g = m.chat(list(msgs), budget, max_tokens=a.max_tokens, skip_strategy="auto")
            if len(g.text.strip()) >= 8:
                f.write(json.dumps({"task": a.task_name, "messages": list(msgs), "target": g.text,
                                    "source": task, "skip_budget": budget}) + "\n")
            if (j + 1) % 50 == 0:
                print(f"{j + 1}/{len(jobs)}", file=sys.stderr, flush=True)
    os.replace(tmp, out)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
