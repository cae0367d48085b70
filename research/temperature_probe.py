"""Would a logit temperature on the skipped model lower its on-policy KL?

On the states the skipped model visits (its temperature-1 reply of 48 tokens, seed 0, to each prompt of the
held-out sources; the shipped routers + bypasses), KL(softmax(log q / tau) || p_full) exactly over the vocabulary
for several tau, and both models' mean entropies, per source. First-order: the states stay those sampled at
tau = 1.

    python research/temperature_probe.py [SKIP_BUDGET (0.2)] [PROMPTS PER SOURCE (12)]
"""
import json
import sys

import numpy as np

import first_gguf
from first_gguf.datasets.heldout import load_heldout
from first_gguf.measures import complete, prompt_seed, prompt_tokens

TAUS = [0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25]
budget = float(sys.argv[1]) if len(sys.argv) > 1 else 0.2
n = int(sys.argv[2]) if len(sys.argv) > 2 else 12
m = first_gguf.load(None, n_threads=1)
res = {}
for src in ("everyday", "yesno", "news", "de"):
    for ex in load_heldout(src, n):
        p, stops = prompt_tokens(m, [dict(x) for x in ex.messages])
        g = complete(m, p, stops, budget, temperature=1.0, max_tokens=48, entropy=prompt_seed(0, p))
        if len(g.tokens) < 2:
            continue
        ls = m.score_tokens(p, g.tokens, budget, logprob_rows=True).logprob_rows[1:].astype(np.float64)
        lf = m.score_tokens(p, g.tokens, 0.0, logprob_rows=True).logprob_rows[1:].astype(np.float64)
        hs = -(np.exp(ls) * ls).sum(1).mean()
        hf = -(np.exp(lf) * lf).sum(1).mean()
        row = {"src": src, "n": len(ls), "H_skip": hs, "H_full": hf}
        for t in TAUS:
            z = ls / t
            z -= z.max(1, keepdims=True)
            lq = z - np.log(np.exp(z).sum(1, keepdims=True))
            row[t] = float((np.exp(lq) * (lq - lf)).sum(1).mean())
        res.setdefault(src, []).append(row)
        print(json.dumps(row), flush=True)
for src, rows in res.items():
    print(src, "H skip/full %.3f/%.3f" % (np.mean([r["H_skip"] for r in rows]), np.mean([r["H_full"] for r in rows])),
          " ".join(f"{t}:{np.mean([r[t] for r in rows]):.3f}" for t in TAUS))
allr = [r for rows in res.values() for r in rows]
print("all", " ".join(f"{t}:{np.mean([r[t] for r in allr]):.3f}" for t in TAUS))
