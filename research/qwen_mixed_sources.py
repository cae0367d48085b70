"""Mixed-source calibration for Qwen2.5-Coder-1.5B (docs/results.md, "Tried: calibration prompts from several
sources"): what a `first-gguf fit --sources ...` work folder says per source, and the two candidate router files
built from it and measured with `first-gguf eval` (neither shipped).

    .venv/bin/python research/qwen_mixed_sources.py analyze WORK --sources chat,translation,docs,linux
    .venv/bin/python research/qwen_mixed_sources.py pool FIT.safetensors OUT.safetensors --pool 8
    .venv/bin/python research/qwen_mixed_sources.py keep-shipped FIT.safetensors OUT.safetensors --drop 1 --add 6
    .venv/bin/python research/qwen_mixed_sources.py costs SIDECAR.gguf WORK COSTS.npy --blocks 1,9,10,11,12,13,14,15
    .venv/bin/python research/qwen_mixed_sources.py shipped-routers WORK COSTS.npy OUT.safetensors --blocks 1,9,...
    .venv/bin/python research/qwen_mixed_sources.py costs SIDECAR.gguf WORK SETS.npy --n 96 \
        --sets "1,12,13,14,15;9,10,12,13,14"
    .venv/bin/python research/qwen_mixed_sources.py two-set-routers WORK SETS.npy OUT.safetensors \
        --a 1,12,13,14,15 --b 9,10,12,13,14

``analyze``: mean single-block cost per source, the summed single costs of the k cheapest blocks chosen by the
pooled mean (static), by each source's own mean, per prompt (oracle), and by ridge routers cross-validated on
random folds and leaving one source out (a proxy: set costs do not add up exactly).
``pool``: the fit's first N blocks get bypasses (rank 16, float16) and router weights; every other block 1-26 a
zero-weight router scoring after the pool (the router strategy never skips a block without its bypass first).
``keep-shipped``: the shipped chat-fit bypasses with block --drop left out of the ranking and the fit's bypass of
block --add as the 8th; routers from the fit on that pool. ``costs``: each of --blocks skipped alone on the work
folder's first --n cost replies with a sidecar's bypasses (``fit.set_kl``; resumable). ``shipped-routers``: the
shipped file with ridge routers fitted (``fit.fit_routers``) on those costs for --blocks, every other block's
router zero-weight after them; bypasses and static ranking unchanged. The source of calibration reply i is
sources[i % len(sources)] (fit takes the sources in turn). ``two-set-routers`` / ``chain-routers``: see their
docstrings. ``routing``: the sets the runtime skips per held-out prompt with each sidecar.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import os

import numpy as np

from first_gguf.convert.router_file import load_router_file, save_router_file
from first_gguf.convert.ship import ship_router_file
from first_gguf.fit import ROUTER_LOGIT_SCALE as A, fit_routers

SHIPPED = os.path.join(os.path.dirname(__file__), "..", "first_gguf", "assets", "qwen2.5-coder-1.5b.routers.safetensors")


def _ridge(x: np.ndarray, t: np.ndarray, lam: float) -> tuple[np.ndarray, float]:
    """Ridge regression of t on the rows of x (dual form: fewer prompts than dimensions): (w, c), t ~ x @ w + c."""
    xm, tm = x.mean(0), t.mean()
    xc = x - xm
    w = xc.T @ np.linalg.solve(xc @ xc.T + lam * np.eye(len(t)), t - tm)
    return w, float(tm - xm @ w)


def _splits(n: int, src: np.ndarray, sources: list[str]) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """(train, test) prompt indices: 4 seeded random folds, and each source left out in turn."""
    fo = np.random.default_rng(0).permutation(n) % 4
    return {"random folds": [(np.where(fo != k)[0], np.where(fo == k)[0]) for k in range(4)],
            "leave one source out": [(np.where(src != s)[0], np.where(src == s)[0]) for s in sources]}


def _k_chosen_report(f, costs, src, sources, cols) -> list[str]:
    """Per split kind: the summed single costs of the k = 2 / 5 blocks of ``cols`` a ridge router (or the
    training prompts' mean costs: "biases") predicts cheapest on each held-out prompt."""
    lines = []
    for mode, splits in _splits(len(costs), src, sources).items():
        parts = []
        for lam in (None, 10, 100, 1000):
            got = {k: [] for k in (2, 5)}
            for tr, te in splits:
                pred = np.zeros((len(te), len(cols)))
                for j, c in enumerate(cols):
                    if lam is None:
                        pred[:, j] = costs[tr, c].mean()
                    else:
                        w, b = _ridge(f[tr, c].astype(np.float64), costs[tr, c], lam)
                        pred[:, j] = f[te, c] @ w + b
                for k in (2, 5):
                    ch = np.argsort(pred, 1)[:, :k]
                    got[k] += [costs[te[i], [cols[c] for c in ch[i]]].sum() for i in range(len(te))]
            parts.append(f"{'biases' if lam is None else f'lambda {lam}'} {np.mean(got[2]):.4f} / {np.mean(got[5]):.4f}")
        lines.append(f"  {mode} (summed single costs of the 2 / 5 chosen): " + " | ".join(parts))
    return lines


def analyze(work: str, sources: list[str], cands: list[int]) -> None:
    costs = np.load(sorted(glob.glob(f"{work}/costs-r*-w.npy"))[0])
    p_n = len(costs)
    f = np.load(f"{work}/router_inputs.npy")[:p_n][:, cands]
    src = np.array([sources[i % len(sources)] for i in range(p_n)])
    print(f"{p_n} prompts, blocks {cands}")
    print("source      " + " ".join(f"{b:6d}" for b in cands))
    for s in sources + ["all"]:
        m = costs[src == s].mean(0) if s != "all" else costs.mean(0)
        print(f"{s:11s} " + " ".join(f"{v:6.3f}" for v in m) + "  cheapest: " + str([cands[j] for j in np.argsort(m)[:8]]))
    allm = costs.mean(0)
    for k in (2, 5, 8):
        st = np.argsort(allm)[:k]
        per = "; ".join(f"{s} static {costs[src == s][:, st].sum(1).mean():.3f} own {costs[src == s][:, np.argsort(costs[src == s].mean(0))[:k]].sum(1).mean():.3f}"
                        for s in sources)
        print(f"k={k} static {[cands[j] for j in st]}: {per}; per-prompt oracle {np.sort(costs, 1)[:, :k].sum(1).mean():.3f} "
              f"vs static {costs[:, st].sum(1).mean():.3f}")
    _, _, rep = fit_routers(f, costs)
    print(f"fit's router CV: biases only {rep['bias_only_spearman']:.3f}, lambda {rep['lambda']}: "
          + ", ".join(f"{k} {v:.3f}" for k, v in rep["lambda_spearman"].items()))
    for pool_n in (8, 17):
        cols = list(np.argsort(allm)[:pool_n])
        print(f"pool {pool_n} {[cands[j] for j in cols]}:")
        print("\n".join(_k_chosen_report(f, costs, src, sources, cols)))


def _write(rf, out: str, pool: list[int], ranking: list[int], weights: dict, biases: dict, bypasses: dict, note: str):
    n_embd = rf.n_embd
    top = max(biases[b] for b in pool)
    w, b_ = {b: weights[b] for b in pool}, {b: biases[b] for b in pool}
    for i, b in enumerate([b for b in ranking if b not in pool and 1 <= b <= 26]):
        w[b], b_[b] = np.zeros(n_embd, np.float32), float(top + A * (10.0 + i))  # after every pool block
    st = dict(rf.static_rankings["single_kl"], ranking=ranking, method=note)
    new = dataclasses.replace(rf, weights=w, biases=b_, static_rankings={"single_kl": st}, bypasses=bypasses,
                              provenance={"method": note, "pool": pool})
    full = out + ".full.safetensors"
    save_router_file(full, new, force=True)
    res = ship_router_file(full, out, blocks=set(pool), rank=16, force=True)
    os.unlink(full)
    print(f"wrote {out} ({os.path.getsize(out):,} bytes): pool {pool}, ranking {ranking}, adapters {res.kept}")


def costs_with(sidecar: str, work: str, out: str, sets: list[list[int]], n: int, threads: int) -> None:
    import json
    import time

    import first_gguf
    from first_gguf.fit import set_kl
    from first_gguf.models import resolve

    replies = [json.loads(x) for x in open(f"{work}/replies.jsonl")][:n]
    rows = list(np.load(out)) if os.path.exists(out) else []
    m = first_gguf.load(str(resolve("qwen2.5-coder-1.5b")[0]), routers=sidecar, n_ctx=2048, n_threads=threads)
    t0 = time.time()
    try:
        for i in range(len(rows), len(replies)):
            rows.append(np.array(set_kl(m, replies[i], sets)))
            np.save(out + ".part.npy", np.stack(rows))
            os.replace(out + ".part.npy", out)
            print(f"{i + 1}/{len(replies)} ({time.time() - t0:.0f} s)", flush=True)
    finally:
        m.close()


def _save_on_shipped(shipped, out: str, weights: dict, biases: dict, rest: tuple[float, float], routers: dict) -> None:
    """The shipped file with these routers: every other router block of it scores after them in the shipped order
    (zero weight, bias rest[0] + A * (rest[1] + i)); bypasses and static ranking unchanged, ``routers`` recorded in
    the provenance."""
    ranking = shipped.static_rankings["single_kl"]["ranking"]
    base, offset = rest
    for i, b in enumerate([b for b in ranking if b not in weights and b in shipped.weights]):
        weights[b], biases[b] = np.zeros(shipped.n_embd, np.float32), float(base + A * (offset + i))
    prov = dict(shipped.provenance, routers=routers)
    save_router_file(out, dataclasses.replace(shipped, weights=weights, biases=biases, provenance=prov), force=True)


def shipped_routers(work: str, costs_path: str, out: str, blocks: list[int], sources: list[str]) -> None:
    costs = np.load(costs_path)
    f = np.load(f"{work}/router_inputs.npy")[:len(costs)][:, blocks]
    w, bias, rep = fit_routers(f, costs)
    print(f"router CV: biases only {rep['bias_only_spearman']:.3f}, lambda {rep['lambda']}: "
          + ", ".join(f"{k} {v:.3f}" for k, v in rep["lambda_spearman"].items()))
    src = np.array([sources[i % len(sources)] for i in range(len(costs))])
    print("\n".join(_k_chosen_report(f, costs, src, sources, list(range(len(blocks))))))
    for s in sources:
        print(f"  {s}: mean cost " + " ".join(f"{b}:{v:.3f}" for b, v in zip(blocks, costs[src == s].mean(0))))
    weights = {b: (A * w[j]).astype(np.float32) for j, b in enumerate(blocks)}
    biases = {b: float(A * bias[j]) for j, b in enumerate(blocks)}
    _save_on_shipped(load_router_file(SHIPPED), out, weights, biases, (max(biases.values()), 10.0),
                     {"method": "ridge routers (fit.fit_routers) on per-prompt costs measured with the shipped "
                                "bypasses", "blocks": blocks, "cv": rep})
    print(f"wrote {out} ({os.path.getsize(out):,} bytes)")


def _two_set_rule(costs: np.ndarray, feats: np.ndarray, src: np.ndarray, sources: list[str], block: int):
    """(lambda, tau) of the two-set rule: B when the ridge prediction of cost(A) - cost(B) from ``block``'s prompt-
    mean router input exceeds tau. The lowest cost over 4 random folds among the (lambda, tau) whose cost with a
    whole source left out is no worse than always A (a new kind of prompt must not lose)."""
    n = len(costs)
    d = costs[:, 0] - costs[:, 1]
    for s in sources:
        sel = src == s
        print(f"{s:11s} A {costs[sel, 0].mean():.3f}  B {costs[sel, 1].mean():.3f}  B cheaper on {(d[sel] > 0).sum()}/{sel.sum()}")
    print(f"all: A {costs[:, 0].mean():.3f}  B {costs[:, 1].mean():.3f}  per-prompt best {np.minimum(costs[:, 0], costs[:, 1]).mean():.3f}")
    splits = _splits(n, src, sources)
    all_a = float(costs[:, 0].mean())
    best = None
    for lam in (1, 10, 100, 1000):
        for tau in (0.0, 0.05, 0.1, 0.15, 0.2):
            got, to_b = {}, {}
            for mode, sp in splits.items():
                chosen, routed = np.zeros(n), np.zeros(n, bool)
                for tr, te in sp:
                    w, c = _ridge(feats[tr][:, block].astype(np.float64), d[tr], lam)
                    routed[te] = feats[te][:, block] @ w + c > tau
                    chosen[te] = np.where(routed[te], costs[te, 1], costs[te, 0])
                got[mode], to_b[mode] = float(chosen.mean()), {s: int(routed[src == s].sum()) for s in sources}
            print(f"lambda {lam:g} tau {tau:.2f}: chosen set's cost, random folds {got['random folds']:.4f} "
                  f"(to B {to_b['random folds']}), leave one source out {got['leave one source out']:.4f} "
                  f"(to B {to_b['leave one source out']})")
            # a new source must not lose: its leave-one-source-out cost no worse than always A (+0.001)
            if got["leave one source out"] <= all_a + 1e-3 and (best is None or got["random folds"] < best[0]):
                best = (got["random folds"], lam, tau)
    if best is None or best[0] >= all_a:
        raise SystemExit(f"no lambda / tau routes better than always skipping A ({all_a:.4f}) without losing on a "
                         "left-out source")
    return best[1], best[2]


def _calibration(work: str, costs_path: str, sources: list[str]):
    costs = np.load(costs_path)
    n = len(costs)
    return costs, np.load(f"{work}/router_inputs.npy")[:n], np.array([sources[i % len(sources)] for i in range(n)])


def two_set_routers(work: str, costs_path: str, out: str, set_a: list[int], set_b: list[int],
                    sources: list[str]) -> None:
    """Routers that choose, per prompt, between two skip sets of one size, through the runtime's per-block
    routers: the blocks both sets hold score lowest always (13, 14 first: the shipped 0.1 set), each block
    only in A scores by d(x), each block only in B by -d(x), d = ridge prediction of cost(A) - cost(B) from
    that block's own prompt-mean router input, B only when d > tau (``_two_set_rule``),
    every other block after them in the shipped order. So skip_budget 0.1 and 0.3 skip the shipped sets and
    0.2 skips A or B. Bypasses and static ranking are the shipped file's."""
    costs, feats, src = _calibration(work, costs_path, sources)
    d = costs[:, 0] - costs[:, 1]
    only = [b for b in set_a if b not in set_b] + [b for b in set_b if b not in set_a]
    common = [b for b in set_a if b in set_b]
    lam, tau = _two_set_rule(costs, feats, src, sources, only[0])
    shipped = load_router_file(SHIPPED)
    ranking = shipped.static_rankings["single_kl"]["ranking"]
    weights, biases = {}, {}
    for i, b in enumerate(sorted(common, key=lambda b: ranking.index(b))):
        weights[b], biases[b] = np.zeros(shipped.n_embd, np.float32), A * (-10.0 + 0.1 * i)
    for b in only:
        w, c = _ridge(feats[:, b].astype(np.float64), d, lam)
        sign = 1.0 if b in set_a else -1.0  # an A-only block scores low when A is predicted cheaper (d < tau)
        weights[b], biases[b] = (A * sign * w).astype(np.float32), float(A * sign * (c - tau))
    _save_on_shipped(shipped, out, weights, biases, (0.0, 10.0), {
        "method": "two-set routing (research/qwen_mixed_sources.py two-set-routers): ridge on cost(A) - cost(B), "
                  "teacher-forced KL of each set on the mixed-source fit's calibration replies, shipped bypasses",
        "A": set_a, "B": set_b, "lambda": lam, "tau": tau, "n_prompts": len(costs), "sources": sources})
    print(f"lambda {lam:g}, tau {tau:g}; wrote {out} ({os.path.getsize(out):,} bytes)")


# chain routers: scores in units of ROUTER_LOGIT_SCALE, as lines in z = d(x) - tau (d: predicted cost(A) - cost(B))
CHAIN_FLOOR = -10.0       # the common block both 0.1 sets hold: lowest always
CHAIN_COMMON = -0.3       # the other common blocks (+0.05 each): below the A-only blocks while K z > -0.3
CHAIN_K = 0.2             # slope of the A-only blocks (+) and of the B-only blocks outside the pair (-)
CHAIN_STEEP = 6.0         # slope of the pair's B-only block: below the common blocks once z > 0.3 / 6 = 0.05
CHAIN_REST = 20.0         # every other block (+1 each), above the steep block while z > -20 / 6


def chain_routers(work: str, costs_path: str, pair_costs_path: str, pair_sets: list[list[int]], out: str,
                  set_a: list[int], set_b: list[int], sources: list[str]) -> None:
    """Two-set routing (``two_set_routers``) extended to skip_budget 0.1: prompts routed to B skip a pair of B's
    blocks at 0.1 instead of A's pair, when the calibration says so. The pair candidates (``pair_sets``, their
    costs from ``costs --sets`` on the same replies; the first is A's 0.1 pair, the two common blocks first in the
    shipped ranking) must hold A's first block and one B-only block, which is how the runtime's per-block scores
    can order them: the pair's B-only block falls below A's second block once z = d(x) - tau > -CHAIN_COMMON /
    CHAIN_STEEP = 0.05, while its crossing with the A-only blocks stays at z = 0, so 0.2 routes as two-set
    routing does (up to each block predicting z from its own input) and 0.3 skips the shipped set. Below
    z = CHAIN_COMMON / CHAIN_K = -1.5 an A-only block would fall below A's second block at 0.1; the calibration's
    d reaches -0.42, so only a ridge extrapolation gets there (``routing`` checks the runtime's sets). The pair:
    among the candidates whose 0.1 cost over all prompts, a whole source left out, is no worse than A's pair
    (+0.001), the one with the lowest random-fold cost on the prompts routed to B (z > 0; A's pair included)."""
    costs, feats, src = _calibration(work, costs_path, sources)
    pair_costs = np.load(pair_costs_path)
    if len(pair_costs) != len(costs) or pair_costs.shape[1] != len(pair_sets):
        raise SystemExit(f"{pair_costs_path}: {pair_costs.shape}; expected ({len(costs)}, {len(pair_sets)})")
    d = costs[:, 0] - costs[:, 1]
    only_a = [b for b in set_a if b not in set_b]
    only_b = [b for b in set_b if b not in set_a]
    shipped = load_router_file(SHIPPED)
    ranking = shipped.static_rankings["single_kl"]["ranking"]
    common = sorted([b for b in set_a if b in set_b], key=lambda b: ranking.index(b))
    if sorted(pair_sets[0]) != sorted(common[:2]):
        raise SystemExit(f"--pairs: the first pair must be A's 0.1 pair, the common blocks first in the shipped ranking "
                         f"{sorted(common[:2])}; got {pair_sets[0]}")
    lam, tau = _two_set_rule(costs, feats, src, sources, only_a[0])
    ok = [j for j, p in enumerate(pair_sets)
          if j == 0 or (len(p) == 2 and common[0] in p and len(set(p) & set(only_b)) == 1)]
    skipped = [pair_sets[j] for j in range(len(pair_sets)) if j not in ok]
    if skipped:
        print(f"not a pair this construction can order (A's first block {common[0]} and one B-only block): {skipped}")
    cost = {}
    for mode, sp in _splits(len(costs), src, sources).items():
        routed = np.zeros(len(costs), bool)
        for tr, te in sp:
            w, c = _ridge(feats[tr][:, only_a[0]].astype(np.float64), d[tr], lam)
            routed[te] = feats[te][:, only_a[0]] @ w + c > tau
        for j in ok:
            on_b, overall = pair_costs[routed, j].mean(), np.where(routed, pair_costs[:, j], pair_costs[:, 0]).mean()
            cost[mode, j] = on_b if mode == "random folds" else overall
            print(f"{mode}: pair {pair_sets[j]} on the {routed.sum()} prompts routed to B {on_b:.4f}, "
                  f"0.1 cost over all prompts {overall:.4f}")
    base = cost["leave one source out", 0]
    eligible = [j for j in ok if cost["leave one source out", j] <= base + 1e-3]
    pair = pair_sets[min(eligible, key=lambda j: cost["random folds", j])]
    steep = [b for b in pair if b in only_b]
    weights, biases = {}, {}
    zero = np.zeros(shipped.n_embd, np.float32)
    weights[common[0]], biases[common[0]] = zero, A * CHAIN_FLOOR
    for i, b in enumerate(common[1:]):
        weights[b], biases[b] = zero, A * (CHAIN_COMMON + 0.05 * i)
    for b in only_a + only_b:
        w, c = _ridge(feats[:, b].astype(np.float64), d, lam)
        slope = CHAIN_K if b in only_a else -(CHAIN_STEEP if b in steep else CHAIN_K)
        weights[b], biases[b] = (A * slope * w).astype(np.float32), float(A * slope * (c - tau))
    _save_on_shipped(shipped, out, weights, biases, (0.0, CHAIN_REST), {
        "method": "chain routing (research/qwen_mixed_sources.py chain-routers): two-set routing at 0.2 (ridge on "
                  "cost(A) - cost(B)), and at 0.1 the prompts routed to B skip the pair, teacher-forced KL of each "
                  "set on the mixed-source fit's calibration replies, shipped bypasses",
        "A": set_a, "B": set_b, "pair_A": pair_sets[0], "pair_B": pair, "lambda": lam, "tau": tau,
        "n_prompts": len(costs), "sources": sources})
    print(f"lambda {lam:g}, tau {tau:g}, 0.1 pair for B {pair}; wrote {out} ({os.path.getsize(out):,} bytes)")


def routing(sidecars: list[str], n: int, out: str, threads: int) -> None:
    """The blocks the runtime skips at 0.1 / 0.2 / 0.3 on each of the first ``n`` held-out de and everyday prompts
    (prefill and one token), per sidecar: how a router file routes, checked on the runtime itself."""
    import json
    from collections import Counter

    import first_gguf
    from first_gguf.datasets.heldout import load_heldout
    from first_gguf.models import resolve

    prompts = [(s, e.messages) for s in ("de", "everyday") for e in load_heldout(s, n)]
    got = {}
    for sc in sidecars:
        m = first_gguf.load(str(resolve("qwen2.5-coder-1.5b")[0]), routers=sc, n_ctx=2048, n_threads=threads)
        try:
            rows = []
            for src, msgs in prompts:
                toks = m.prompt_tokens_for(msgs)[0]
                rows.append([src] + [m.generate_tokens(toks, b, max_tokens=1).skipped_layers for b in (0.1, 0.2, 0.3)])
        finally:
            m.close()
        got[sc] = rows
    with open(out, "w") as f:
        json.dump(got, f)
    for sc, rows in got.items():
        print(sc)
        for i, budget in enumerate((0.1, 0.2, 0.3), 1):
            for src in ("de", "everyday"):
                sets = Counter(str(r[i]) for r in rows if r[0] == src).most_common()
                print(f"  {budget:g} {src}: " + ", ".join(f"{k} x{v}" for k, v in sets))
    first = got[sidecars[0]]
    for sc in sidecars[1:]:
        print(f"sets that differ from {sidecars[0]} in {sc}: " + ", ".join(
            f"{b:g}: {sum(x[i] != y[i] for x, y in zip(first, got[sc]))}" for i, b in enumerate((0.1, 0.2, 0.3), 1)))


def _blocks(text: str) -> list[int]:
    """Block indices from "1,12,13" (in the order given)."""
    return [int(b) for b in text.split(",")]


def _sets(text: str) -> list[list[int]]:
    """Block sets from "1,12,13;9,10,12"."""
    return [_blocks(x) for x in text.split(";")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("analyze")
    a.add_argument("work")
    a.add_argument("--sources", required=True)
    a.add_argument("--candidates", default="1-17")
    p = sub.add_parser("pool")
    p.add_argument("fit")
    p.add_argument("out")
    p.add_argument("--pool", type=int, default=8)
    k = sub.add_parser("keep-shipped")
    k.add_argument("fit")
    k.add_argument("out")
    k.add_argument("--drop", type=int, default=1)
    k.add_argument("--add", type=int, default=6)
    c = sub.add_parser("costs")
    c.add_argument("sidecar")
    c.add_argument("work")
    c.add_argument("out")
    c.add_argument("--blocks", default=None, help="each block skipped alone")
    c.add_argument("--sets", default=None, help="each set skipped as a whole: 1,12,13;9,10,12")
    c.add_argument("--n", type=int, default=64)
    c.add_argument("--threads", type=int, default=2)
    r = sub.add_parser("shipped-routers")
    r.add_argument("work")
    r.add_argument("costs")
    r.add_argument("out")
    r.add_argument("--blocks", required=True)
    r.add_argument("--sources", default="chat,translation,docs,linux")
    t = sub.add_parser("two-set-routers")
    t.add_argument("work")
    t.add_argument("costs", help="costs --sets A;B output: per-prompt cost of set A and of set B")
    t.add_argument("out")
    t.add_argument("--a", required=True, help="set A (the shipped 0.2 set)")
    t.add_argument("--b", required=True, help="set B, same size")
    t.add_argument("--sources", default="chat,translation,docs,linux")
    ch = sub.add_parser("chain-routers")
    ch.add_argument("work")
    ch.add_argument("costs", help="costs --sets A;B output")
    ch.add_argument("pair_costs", help="costs --sets output for --pairs, on the same replies")
    ch.add_argument("out")
    ch.add_argument("--a", required=True)
    ch.add_argument("--b", required=True)
    ch.add_argument("--pairs", required=True, help="the 0.1 pairs costed, A's first: 13,14;9,13;...")
    ch.add_argument("--sources", default="chat,translation,docs,linux")
    ro = sub.add_parser("routing")
    ro.add_argument("sidecars", nargs="+")
    ro.add_argument("--n", type=int, default=24)
    ro.add_argument("-o", "--output", required=True)
    ro.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.cmd == "routing":
        routing(args.sidecars, args.n, args.output, args.threads)
        return
    if args.cmd == "chain-routers":
        chain_routers(args.work, args.costs, args.pair_costs, _sets(args.pairs), args.out, _blocks(args.a),
                      _blocks(args.b), args.sources.split(","))
        return
    if args.cmd == "costs":
        if (args.blocks is None) == (args.sets is None):
            ap.error("costs: give --blocks or --sets")
        sets = [[b] for b in _blocks(args.blocks)] if args.blocks else _sets(args.sets)
        costs_with(args.sidecar, args.work, args.out, sets, args.n, args.threads)
        return
    if args.cmd == "two-set-routers":
        two_set_routers(args.work, args.costs, args.out, _blocks(args.a), _blocks(args.b), args.sources.split(","))
        return
    if args.cmd == "shipped-routers":
        shipped_routers(args.work, args.costs, args.out, _blocks(args.blocks),
                        args.sources.split(","))
        return
    if args.cmd == "analyze":
        lo, hi = map(int, args.candidates.split("-"))
        analyze(args.work, args.sources.split(","), list(range(lo, hi + 1)))
        return
    fit = load_router_file(args.fit)
    shipped = load_router_file(SHIPPED)
    old_rank = shipped.static_rankings["single_kl"]["ranking"]
    order = [b for b in fit.static_rankings["single_kl"]["ranking"] if b in fit.weights]
    if args.cmd == "pool":
        pool = order[:args.pool]
        byp = {b: fit.bypasses[b] for b in pool}
        note = f"mixed-source fit: its first {args.pool} blocks with bypasses and router weights"
    else:
        pool = [b for b in old_rank if b in shipped.bypasses and b != args.drop] + [args.add]
        byp = {b: shipped.bypasses[b] for b in pool if b != args.add} | {args.add: fit.bypasses[args.add]}
        note = (f"shipped chat-fit order and bypasses without block {args.drop}, block {args.add} (mixed-source fit's "
                "bypass) 8th; mixed-source fit's routers on the pool")
    ranking = pool + [b for b in order if b not in pool] + [b for b in old_rank if b not in pool and b not in order]
    _write(fit, args.out, pool, ranking, fit.weights, fit.biases, byp, note)


if __name__ == "__main__":
    main()
