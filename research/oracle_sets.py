"""How much could choosing the skip set per prompt pay? An oracle over candidate sets, on held-out sources.

For every prompt of the held-out sources and every candidate set of blocks, the skipped model samples
``--tokens`` tokens at temperature 1 (two independent samples: seeds 0 and 1) and the exact per-state
on-policy KL against the full model is computed (``measures.onpolicy_kl`` with ``skip_layers``). Then:

- per set: the mean KL over prompts (the best *single* set is what a static choice, or routers that
  pick one set for every prompt, can reach);
- oracle: per prompt, the set with the lowest KL on one sample, scored on the *other* sample (so the
  choice is not rewarded for the noise of the sample it was chosen on), both ways, averaged. Its gap
  to the best single set (chosen and scored the same cross-fitted way) bounds what input-adaptive
  routing can gain with the adapters as they are.

Rows are appended to ``--out`` (JSON Lines) as they come; a rerun skips the (source, prompt, set, seed)
rows already there. ``--report`` prints the tables from that file without a model.

    python research/oracle_sets.py --routers SIDECAR.gguf --out oracle.jsonl \\
        --sets 5,12,13,14,16,17 3,4,5,6,17,26 ... --n 12
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

SOURCES = ("everyday", "yesno", "news", "de")


def parse_set(text: str) -> tuple[int, ...]:
    try:
        blocks = tuple(sorted(int(x) for x in text.split(",")))
    except ValueError:
        raise SystemExit(f"--sets: {text!r} is not a comma-separated list of block indices") from None
    if len(set(blocks)) != len(blocks) or not blocks:
        raise SystemExit(f"--sets: {text!r} must name distinct blocks")
    return blocks


def load_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def measure(args) -> None:
    import first_gguf
    from first_gguf.datasets.heldout import load_heldout
    from first_gguf.measures import onpolicy_kl

    sets = [parse_set(s) for s in args.sets]
    done = {(r["source"], r["uid"], tuple(r["set"]), r["seed"]) for r in load_rows(args.out)}
    model = first_gguf.load(args.model, routers=args.routers, n_threads=args.threads)
    with args.out.open("a") as f:
        for source in args.sources.split(","):
            for ex in load_heldout(source, args.n):
                for blocks in sets:
                    for seed in (0, 1):
                        if (source, ex.uid, blocks, seed) in done:
                            continue
                        op = onpolicy_kl(model, [list(ex.messages)], 0.0, skip_layers=list(blocks),
                                         max_tokens=args.tokens, seed=seed)
                        row = {"source": source, "uid": ex.uid, "set": list(blocks), "seed": seed,
                               "kl_exact": op.per_prompt_exact[0], "n_tokens": op.per_prompt_tokens[0],
                               "reply": op.replies[0]}
                        f.write(json.dumps(row) + "\n")
                        f.flush()
                print(f"{source} {ex.uid} done", file=sys.stderr, flush=True)


def report(path: Path) -> str:
    rows = [r for r in load_rows(path) if r["kl_exact"] is not None]
    kl: dict[tuple, dict] = {}
    for r in rows:
        kl.setdefault((r["source"], r["uid"]), {})[(tuple(r["set"]), r["seed"])] = r["kl_exact"]
    sets = sorted({s for v in kl.values() for s, _ in v})
    # prompts measured under every set with both seeds
    full = {k: v for k, v in kl.items() if all((s, d) in v for s in sets for d in (0, 1))}
    if not full:
        raise SystemExit(f"{path}: no prompt has every set with both seeds yet")
    out = [f"{len(full)} prompts with all {len(sets)} sets x 2 samples ({path})", "",
           "| set | " + " | ".join(SOURCES) + " | all |", "|---|" + "---|" * (len(SOURCES) + 1)]
    mean = {s: float(np.mean([(v[(s, 0)] + v[(s, 1)]) / 2 for v in full.values()])) for s in sets}
    for s in sorted(sets, key=mean.get):
        cells = []
        for src in SOURCES:
            vals = [(v[(s, 0)] + v[(s, 1)]) / 2 for (so, _), v in full.items() if so == src]
            cells.append(f"{np.mean(vals):.3f}" if vals else "-")
        out.append(f"| {','.join(map(str, s))} | " + " | ".join(cells) + f" | {mean[s]:.3f} |")

    def crossfit(choose):  # choose on seed a, score on seed b, both ways
        per = []
        for key, v in full.items():
            per.append(np.mean([v[(choose(key, v, a), b)] for a, b in ((0, 1), (1, 0))]))
        return np.asarray(per)

    def best_single(a):  # the set with the lowest mean KL over all prompts on seed a
        return min(sets, key=lambda s: np.mean([v[(s, a)] for v in full.values()]))

    def best_for_source(src, a):  # the set with the lowest mean KL over the source's prompts on seed a
        return min(sets, key=lambda s: np.mean([v[(s, a)] for (so, _), v in full.items() if so == src]))

    single = crossfit(lambda key, v, a: best_single(a))
    per_source = crossfit(lambda key, v, a: best_for_source(key[0], a))
    oracle = crossfit(lambda key, v, a: min(sets, key=lambda s: v[(s, a)]))
    # how much of a set's cost, relative to the best single set, depends on the prompt: the covariance
    # over prompts of the two samples' differences (their noises are independent, so it estimates the
    # variance of the true per-prompt difference around its mean; near 0: nothing for a router to read)
    ref = best_single(0)
    spread = []
    for s_ in sets:
        if s_ == ref:
            continue
        d0 = np.array([v[(s_, 0)] - v[(ref, 0)] for v in full.values()])
        d1 = np.array([v[(s_, 1)] - v[(ref, 1)] for v in full.values()])
        cov = float(np.mean((d0 - d0.mean()) * (d1 - d1.mean())) * len(d0) / (len(d0) - 1))
        noise = float(np.var(d0 - d1, ddof=1) / 2)  # per-sample noise variance of the difference
        spread.append(f"{','.join(map(str, s_))}: mean {np.mean((d0 + d1) / 2):+.3f}, prompt-dependent sd "
                      f"{np.sqrt(max(cov, 0)):.3f} (cov {cov:+.4f}), sample noise sd {np.sqrt(noise):.3f}")
    by_source = {}
    for key, v in full.items():
        a_pick = min(sets, key=lambda s: v[(s, 0)])
        by_source.setdefault(key[0], []).append(a_pick)
    def paired(x, name):
        d = x - single
        return (f"{name} - single, paired: {d.mean():+.3f} +- {d.std(ddof=1) / np.sqrt(len(d)):.3f} "
                f"(lower on {int((d < 0).sum())} of {len(d)} prompts)")

    out += ["", "cross-fitted (a choice made on one sample of each prompt, scored on the other, both ways):",
            f"- best single set: {single.mean():.3f}",
            f"- best set per source: {per_source.mean():.3f}; {paired(per_source, 'per source')}",
            f"- per-prompt oracle: {oracle.mean():.3f}; {paired(oracle, 'oracle')}",
            "- per-prompt oracle without cross-fitting (chosen and scored on the same sample, biased low): "
            f"{np.mean([min(v[(s, a)] for s in sets) for v in full.values() for a in (0, 1)]):.3f}", "",
            f"each set against {','.join(map(str, ref))} (the best single set on sample 0), over prompts:"]
    out += [f"- {x}" for x in spread]
    out += ["", "sets the oracle picks on sample 0, per source:"]
    for src, picks in by_source.items():
        counts = {}
        for p in picks:
            counts[p] = counts.get(p, 0) + 1
        out.append(f"- {src}: " + ", ".join(f"{','.join(map(str, s))} x{c}" for s, c in
                                           sorted(counts.items(), key=lambda x: -x[1])))
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="GGUF (default: the default model)")
    ap.add_argument("--routers", default=None, help="sidecar GGUF with the bypass adapters")
    ap.add_argument("--sets", nargs="+", default=[], help="candidate sets, e.g. 5,12,13,14,16,17")
    ap.add_argument("--sources", default=",".join(SOURCES))
    ap.add_argument("--n", type=int, default=12, help="prompts per source")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--report", action="store_true", help="print the tables from --out and exit")
    args = ap.parse_args(argv)
    if args.report:
        print(report(args.out))
        return
    if len(args.sets) < 2:
        raise SystemExit("--sets: give at least two candidate sets")
    measure(args)
    print(report(args.out))


if __name__ == "__main__":
    main()
