"""Training-free routers, bypass adapters and a static ranking for a GGUF, fitted in closed form from
the runtime's own hidden states (``first-gguf fit``).

Training a 1.5B model's adapters by distillation in torch costs hours a step on a 2-core CPU. This module
fits everything from what the patched runtime itself computes, at quantized speed:

1. **Calibration replies.** The full model replies (at full depth, sampled at ``temperature``) to prompts
   of the calibration ``sources`` (``CALIBRATION_SOURCES``; default the chat requests of
   ``broad.chat_prompts``, none on a subject of the held-out everyday prompts, see datasets/heldout.py;
   the training tasks' train splits and the broad prompts vary them: none is a held-out source), the
   sources taken in turn. Replies are what a skipped block's bypass sees in decoding.
2. **Bypasses by least squares** (ReplaceMe-style, arXiv 2505.02819, one linear map per block): over the
   reply positions, the runtime's block inputs h_i and outputs h_{i+1} give
   ``X = rmsnorm(h_i)`` (no weight, model eps; the bypass definition) and ``D = h_{i+1} - h_i``; the
   ridge solution ``W = (X'X + lam I)^-1 X'D`` is reduced to rank r exactly (reduced-rank regression:
   the top r eigenvectors V of W' X'X W; ``up = V``, ``down = (W V)'``), so ``h + up @ down @ rmsnorm(h)``
   is the best rank-r map of that form on these states. Only second moments are kept (d x d per block).
3. **Per-prompt block costs.** For each of ``n_cost`` replies, every candidate block is skipped alone
   (with its bypass) for the reply tokens, the prompt at full depth, and the exact
   ``KL(p_skip || p_full)`` over the vocabulary is averaged over the reply positions but the first
   (which the full-depth prompt predicts): a teacher-forced cost on the full model's own text.
4. **Static ranking** ``single_kl``: candidates by mean cost (cheapest first).
5. **Routers by ridge regression.** Block i's router reads ``x_t = rmsnorm(h_t) * attn_norm.weight`` (the
   runtime's router input) and scores ``mean_t sigmoid(w . x_t + b)``. Its target is the standardised
   cost of block i on the prompt (one scale for all blocks, so scores compare across blocks; the cost
   itself, not its log: a set's cost is about the sum of its blocks', so the biases alone must order
   blocks by mean cost, the static ranking; a log target ranked a block that is cheap on most prompts
   and expensive on a few, block 1 of Qwen2.5-Coder-1.5B, first, and cost 0.23 instead of 0.10 nats/token
   of held-out on-policy KL at skip_budget 0.1); w, b are
   fitted on the prompt-mean input by ridge regression, lambda chosen by leave-prompts-out cross-validation
   on the rank correlation of held-out prompts' costs. A large lambda gives biases only: the static ranking.
   The file stores ``ROUTER_LOGIT_SCALE * (w, b)``: the runtime averages sigmoids of per-token logits, and
   for small logits ``mean_t sigmoid(a (w . x_t + b)) = 1/2 + a/4 (w . mean_t x_t + b) + O(a^3)``, the
   ridge's own prediction on the prompt-mean input, so the runtime orders blocks as the fit predicts. Unscaled,
   per-token logits of several units saturate the sigmoid and the mean of sigmoids reorders the blocks.

Each stage is cached in the work folder (``--work``) and resumed: replies and moments are checkpointed
every few prompts; an interrupted run continues where it stopped.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FIT_VERSION = 1


@dataclass
class FitConfig:
    n_prompts: int = 192          # calibration replies for the bypass moments
    n_cost: int = 48              # of those, replies for the per-prompt block costs (routers, ranking)
    max_tokens: int = 64          # reply tokens per prompt
    temperature: float = 0.7
    rank: int = 64                # bypass rank
    ridge: float = 1e-3           # bypass ridge, relative to tr(X'X)/d
    candidates: str = "1-"        # blocks that may be skipped ("1-": all but block 0 and the last)
    seed: int = 0
    threads: int | None = None
    sources: str = "chat"         # calibration prompt sources, comma-separated (CALIBRATION_SOURCES)

    def check(self) -> None:
        def bad(msg):
            raise ValueError(msg)
        if not 1 <= self.n_prompts:
            bad(f"n_prompts must be >= 1; got {self.n_prompts}")
        if not 4 <= self.n_cost <= self.n_prompts:
            bad(f"n_cost must be in [4, n_prompts={self.n_prompts}]; got {self.n_cost}")
        if not 2 <= self.max_tokens <= 1024:
            bad(f"max_tokens must be in [2, 1024]; got {self.max_tokens}")
        if not 0 <= self.temperature <= 2:
            bad(f"temperature must be in [0, 2]; got {self.temperature}")
        if not 1 <= self.rank <= 4096:
            bad(f"rank must be in [1, 4096]; got {self.rank}")
        if not 0 < self.ridge < 1:
            bad(f"ridge must be in (0, 1); got {self.ridge}")
        parse_sources(self.sources)


def parse_blocks(spec: str, n_layer: int) -> list[int]:
    """Block indices from "1-", "2-20", "3,5,7-9": ranges inclusive, "a-" up to the last block but one."""
    out: set[int] = set()
    for part in [p.strip() for p in str(spec).split(",") if p.strip()]:
        try:
            if "-" in part:
                a, b = part.split("-", 1)
                lo, hi = int(a), (int(b) if b else n_layer - 2)
                out.update(range(lo, hi + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise ValueError(f"candidate blocks {spec!r}: {part!r} is not a block index or range a-b") from None
    bad = sorted(b for b in out if not 0 <= b < n_layer)
    if bad or not out:
        raise ValueError(f"candidate blocks {spec!r} must name blocks in [0, {n_layer}); got {bad or 'none'}")
    return sorted(out)


def rmsnorm(h: np.ndarray, eps: float) -> np.ndarray:
    h = np.asarray(h, dtype=np.float32)
    return h / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + eps)


class Moments:
    """Per-block second moments of (X = rmsnorm(h_i), D = h_{i+1} - h_i) over reply positions."""

    def __init__(self, blocks: list[int], d: int):
        self.blocks = list(blocks)
        self.xx = {b: np.zeros((d, d)) for b in blocks}
        self.xd = {b: np.zeros((d, d)) for b in blocks}
        self.dd = {b: 0.0 for b in blocks}
        self.n = 0
        self.n_prompts = 0

    def add(self, states: dict[int, np.ndarray], rows: slice, eps: float) -> None:
        for b in self.blocks:
            h, h1 = states[b][rows], states[b + 1][rows]
            x, dlt = rmsnorm(h, eps), (h1 - h).astype(np.float32)
            self.xx[b] += (x.T @ x).astype(np.float64)
            self.xd[b] += (x.T @ dlt).astype(np.float64)
            self.dd[b] += float(np.sum(dlt.astype(np.float64) ** 2))
        self.n += rows.stop - rows.start
        self.n_prompts += 1

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".part.npz")
        arrays = {f"xx.{b}": self.xx[b] for b in self.blocks} | {f"xd.{b}": self.xd[b] for b in self.blocks}
        arrays["dd"] = np.array([self.dd[b] for b in self.blocks])
        arrays["meta"] = np.array([self.n, self.n_prompts])
        arrays["blocks"] = np.array(self.blocks)
        np.savez(tmp, **arrays)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "Moments":
        z = np.load(path)
        blocks = [int(b) for b in z["blocks"]]
        m = cls(blocks, z[f"xx.{blocks[0]}"].shape[0])
        for i, b in enumerate(blocks):
            m.xx[b], m.xd[b], m.dd[b] = z[f"xx.{b}"], z[f"xd.{b}"], float(z["dd"][i])
        m.n, m.n_prompts = int(z["meta"][0]), int(z["meta"][1])
        return m


def solve_bypass(xx: np.ndarray, xd: np.ndarray, dd: float, n: int, rank: int, ridge: float
                 ) -> tuple[np.ndarray, np.ndarray, float]:
    """(down [rank, d], up [d, rank], R^2 on the fitting states) of the best rank-``rank`` map
    rmsnorm(h) -> h_out - h under a ridge penalty ``ridge * tr(X'X) / d``."""
    d = xx.shape[0]
    a = xx / n
    lam = ridge * np.trace(a) / d
    w = np.linalg.solve(a + lam * np.eye(d), xd / n)            # [d, d]: D ~ X W
    m = w.T @ a @ w
    vals, vecs = np.linalg.eigh((m + m.T) / 2)
    v = vecs[:, np.argsort(vals)[::-1][:rank]]                  # [d, r]
    wr = w @ v                                                  # [d, r]
    # residual of D ~ X wr v' on the fitting states: tr(D'D) - 2 tr(wr' X'D v) + tr(wr' X'X wr)
    resid = dd / n - 2 * np.trace(wr.T @ (xd / n) @ v) + np.trace(wr.T @ a @ wr)
    r2 = 1.0 - resid / (dd / n) if dd > 0 else 0.0
    return wr.T.astype(np.float32), v.astype(np.float32), float(r2)


def kl_rows(ls_skip: np.ndarray, ls_full: np.ndarray) -> np.ndarray:
    """Per-row exact KL(p_skip || p_full) from two log-softmax arrays [T, V]."""
    p = np.exp(ls_skip.astype(np.float64))
    return np.sum(p * (ls_skip.astype(np.float64) - ls_full.astype(np.float64)), axis=-1)


def set_kl(m, reply: dict, sets: list[list[int]], full=None) -> list[float]:
    """Teacher-forced cost of each skip set on one calibration reply: the exact KL(p_skip || p_full) per
    position, averaged over the reply positions but the first (which the full-depth prompt predicts).
    ``m``: an open Model (its bypasses apply); ``full``: the full-depth ScoreResult if already computed
    the same way.

    Every row compared is computed from the same cache state: the prompt is evaluated once (a one-token
    score) and each score then reuses it, evaluating its last token alone and the reply as one batch. A
    prompt evaluated in one piece and one whose last token was evaluated alone differ in llama.cpp's
    kernels (stock llama.cpp too) by 0.001-0.008 nats/token of KL on SmolLM2-135M Q4_1: as much as a
    cheap block's cost, so a full-depth row from the first, cold call would add that to every set."""
    if full is None:
        m.score_tokens(reply["prompt_tokens"], reply["reply_tokens"][:1], skip_layers=[])
        full = m.score_tokens(reply["prompt_tokens"], reply["reply_tokens"], skip_layers=[], logprob_rows=True)
    out = []
    for s in sets:
        sk = m.score_tokens(reply["prompt_tokens"], reply["reply_tokens"], skip_layers=list(s), logprob_rows=True)
        out.append(float(kl_rows(sk.logprob_rows[1:], full.logprob_rows[1:]).mean()))
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = np.sqrt((ra ** 2).sum() * (rb ** 2).sum())
    return float((ra * rb).sum() / den) if den > 0 else 0.0


def fit_routers(feats: np.ndarray, costs: np.ndarray, lambdas=(1e-2, 1e-1, 1, 10, 100, 1e3, 1e4, 1e6),
                folds: int = 4, seed: int = 0, min_gain: float = 0.01) -> tuple[np.ndarray, np.ndarray, dict]:
    """Ridge routers. feats [P, B, d] prompt-mean router inputs, costs [P, B] per-prompt block costs.
    Target z = standardised cost (common scale). Returns (weights [B, d], biases [B], report) with
    lambda chosen by leave-prompts-out cross-validation on the mean Spearman correlation between a held-out
    prompt's predicted and measured costs; the report gives it for every lambda and for the biases alone. A
    lambda is taken only when it beats the biases alone by ``min_gain``: smaller gains are noise at tens of
    prompts, and weights fitted to noise would move the routers off the mean-cost order for nothing."""
    p_n, b_n, d = feats.shape
    y = np.asarray(costs, dtype=np.float64)
    mu, sd = float(y.mean()), float(y.std() or 1.0)
    z = (y - mu) / sd
    order = np.random.default_rng(seed).permutation(p_n)
    fold_of = np.empty(p_n, dtype=int)
    fold_of[order] = np.arange(p_n) % folds

    def fit(idx, lam):
        w = np.zeros((b_n, d))
        bias = np.zeros(b_n)
        for b in range(b_n):
            x, t = feats[idx, b].astype(np.float64), z[idx, b]
            xm, tm = x.mean(0), t.mean()
            xc = x - xm
            # dual form: n_prompts << d
            k = xc @ xc.T
            alpha = np.linalg.solve(k + lam * np.eye(len(idx)), t - tm)
            w[b] = xc.T @ alpha
            bias[b] = tm - xm @ w[b]
        return w, bias

    def cv(lam):
        rho = []
        for f in range(folds):
            tr, te = np.where(fold_of != f)[0], np.where(fold_of == f)[0]
            if lam is None:  # biases only: every prompt gets the training prompts' mean ranking
                pred = np.tile(z[tr].mean(0), (len(te), 1))
            else:
                w, bias = fit(tr, lam)
                pred = np.einsum("pbd,bd->pb", feats[te], w) + bias
            rho += [spearman(pred[i], costs[te[i]]) for i in range(len(te))]
        return float(np.mean(rho))

    report = {"bias_only_spearman": cv(None), "lambda_spearman": {}}
    best = (report["bias_only_spearman"], None)
    for lam in lambdas:
        s = cv(lam)
        report["lambda_spearman"][f"{lam:g}"] = s
        if s > best[0] + min_gain:
            best = (s, lam)
    report["lambda"] = best[1]
    report["target"] = {"cost_mean": mu, "cost_sd": sd}
    if best[1] is None:
        w, bias = np.zeros((b_n, d)), z.mean(0)
    else:
        w, bias = fit(np.arange(p_n), best[1])
    return w.astype(np.float32), bias.astype(np.float32), report


def _log(msg: str) -> None:
    print(f"[first-gguf fit] {msg}", file=sys.stderr, flush=True)


# Calibration prompt sources: the everyday chat requests (datasets.broad, kept apart from the held-out
# ``everyday`` prompts), the train splits of the training tasks (datasets.tasks; their test splits and the
# held-out sources stay unseen) and the broad on-policy prompts (BIG-bench inputs, manual-page questions).
CALIBRATION_SOURCES = ("chat", "translation", "summarization", "qa", "mc", "docs", "bigbench", "linux")
# prompts longer than this are left out: the capture evaluates prompt and reply in one batch of n_batch (512)
# tokens, and 1,500 characters of English are about 350-400 tokens, leaving room for the template and reply
MAX_PROMPT_CHARS = 1500
# the routers' logits are stored scaled by this (module docstring, stage 5): the runtime's mean of per-token
# sigmoids is then linear in the prompt-mean input, the ridge's own prediction; 0.01 keeps per-token logits far
# from saturation (a standardised cost of 100 is 1 logit unit) and score differences far above float32 rounding
ROUTER_LOGIT_SCALE = 0.01


def parse_sources(spec: str) -> list[str]:
    """A comma list of CALIBRATION_SOURCES, each named once."""
    names = [x.strip() for x in str(spec).split(",") if x.strip()]
    bad = [x for x in names if x not in CALIBRATION_SOURCES]
    if bad or not names:
        raise ValueError(f"calibration sources {spec!r}: expected a comma list of {', '.join(CALIBRATION_SOURCES)}"
                         + (f"; unknown: {', '.join(bad)}" if bad else ""))
    if len(set(names)) != len(names):
        raise ValueError(f"calibration sources {spec!r} name a source twice")
    return names


def _source_prompts(source: str) -> list[str]:
    if source == "chat":
        from .datasets.broad import chat_prompts
        return [r["prompt"] for r in chat_prompts()]
    if source in ("bigbench", "linux"):
        from .datasets.broad import broad_prompts
        return [r["prompt"] for r in broad_prompts((source,))]
    from .datasets.tasks import load_task, split
    return [ex.messages[-1]["content"] for ex in split(load_task(source), "train")]


def _prompts(n: int, seed: int, sources: str = "chat") -> list[str]:
    """n calibration prompts of at most MAX_PROMPT_CHARS characters: each source's list shuffled with ``seed``,
    the sources taken in turn (the first k prompts hold every source about k / len(sources) times, so the cost
    replies are a mix too)."""
    names = parse_sources(sources)
    lists = []
    for name in names:
        rows = [p for p in _source_prompts(name) if len(p) <= MAX_PROMPT_CHARS]
        lists.append([rows[i] for i in np.random.default_rng(seed).permutation(len(rows))])
    out, pos = [], [0] * len(lists)
    while len(out) < n:
        live = [j for j in range(len(lists)) if pos[j] < len(lists[j])]
        if not live:
            raise ValueError(f"calibration sources {sources!r} hold {len(out)} prompts; {n} asked for")
        for j in live:
            if len(out) < n:
                out.append(lists[j][pos[j]])
                pos[j] += 1
    return out


def _norm_facts(path: str | os.PathLike, n_layer: int) -> tuple[float, list[np.ndarray]]:
    """(RMSNorm eps, attn_norm.weight of every block) read from the GGUF."""
    import gguf
    from gguf.quants import dequantize

    from .convert.gguf_edit import field_value

    r = gguf.GGUFReader(str(path))
    arch = field_value(r, gguf.Keys.General.ARCHITECTURE)
    eps = field_value(r, gguf.Keys.Attention.LAYERNORM_RMS_EPS.format(arch=arch))
    if eps is None:
        raise ValueError(f"{path}: no {arch}.attention.layer_norm_rms_epsilon (the bypass's RMSNorm eps)")
    by_name = {t.name: t for t in r.tensors}
    out = []
    for il in range(n_layer):
        t = by_name.get(f"blk.{il}.attn_norm.weight")
        if t is None:
            raise ValueError(f"{path}: no blk.{il}.attn_norm.weight (the router input's norm weight)")
        out.append(np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(-1))
    return float(eps), out


def run_fit(model_path: str | os.PathLike, work: str | os.PathLike, out: str | os.PathLike, cfg: FitConfig,
            *, force: bool = False) -> dict:
    """Run (or resume) every stage in ``work`` and write the router file ``out`` (routers, bypasses, the
    ``single_kl`` static ranking). Returns the report also written to ``work/report.json``."""
    from .convert.router_file import RouterFile, fingerprint_gguf, save_router_file
    from .model import Model

    cfg.check()
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"output file exists: {out}; pass --force to overwrite")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"output folder {out.parent} does not exist")
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    settings = {"fit_version": FIT_VERSION, "model": str(model_path), "n_prompts": cfg.n_prompts,
                "max_tokens": cfg.max_tokens, "temperature": cfg.temperature, "seed": cfg.seed,
                "sources": ",".join(parse_sources(cfg.sources))}
    sfile = work / "settings.json"
    if sfile.exists():
        old = json.loads(sfile.read_text())
        old.setdefault("sources", "chat")  # folders written before sources existed: chat requests
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff:
            raise ValueError(f"{work} holds a fit with other settings {diff}; use another --work folder")
    else:
        sfile.write_text(json.dumps(settings, indent=1))
    t_start = time.time()
    m = Model(model_path, n_ctx=2048, n_threads=cfg.threads, verbose=False)
    try:
        n_layer, d = m.n_layer, m.info.n_embd
        cands = parse_blocks(cfg.candidates, n_layer)
        cands = [b for b in cands if b < n_layer - 1]
        blocks = list(range(n_layer - 1))
        eps, norms = _norm_facts(model_path, n_layer)
        fingerprint = fingerprint_gguf(model_path)
        # ---- stage 1+2: replies and moments (resumable)
        replies_path, mom_path = work / "replies.jsonl", work / "moments.npz"
        replies = [json.loads(x) for x in replies_path.read_text().splitlines()] if replies_path.exists() else []
        mom = Moments.load(mom_path) if mom_path.exists() else Moments(blocks, d)
        if mom.n_prompts != len(replies):  # moments are saved after replies: redo the unsaved tail
            replies = replies[:mom.n_prompts]
            replies_path.write_text("".join(json.dumps(r) + "\n" for r in replies))
        feats_path = work / "router_inputs.npy"
        feats = list(np.load(feats_path)) if feats_path.exists() else []
        feats = feats[:len(replies)]
        prompts = _prompts(cfg.n_prompts, cfg.seed, cfg.sources)
        t0 = time.time()
        for i in range(len(replies), cfg.n_prompts):
            msgs = [{"role": "user", "content": prompts[i]}]
            ptoks, _ = m.prompt_tokens_for(msgs)
            if len(ptoks) + cfg.max_tokens > m.n_batch:
                raise ValueError(f"calibration prompt {i} has {len(ptoks)} tokens; with max_tokens {cfg.max_tokens} "
                                 f"that is over the {m.n_batch} tokens one capture holds: {prompts[i][:80]!r}...")
            g = m.chat(msgs, 0.0, max_tokens=cfg.max_tokens, temperature=cfg.temperature, seed=cfg.seed + i)
            reply = list(g.tokens)
            if len(reply) < 2:
                reply = reply + m.tokenize(" ok", add_bos=False)
            toks = ptoks + reply
            states = m.layer_inputs_tokens(toks, list(range(n_layer)))
            mom.add(states, slice(len(ptoks), len(toks)), eps)
            feats.append(np.stack([(rmsnorm(states[b][:len(ptoks)], eps) * norms[b]).mean(0)
                                   for b in range(n_layer)]))
            replies.append({"prompt": prompts[i], "prompt_tokens": ptoks, "reply_tokens": reply})
            if (i + 1) % 8 == 0 or i + 1 == cfg.n_prompts:
                np.save(feats_path.with_suffix(".part.npy"), np.stack(feats))
                os.replace(feats_path.with_suffix(".part.npy"), feats_path)
                with open(replies_path, "w") as f:
                    f.write("".join(json.dumps(r) + "\n" for r in replies))
                mom.save(mom_path)
                el = time.time() - t0
                _log(f"calibration replies {i + 1}/{cfg.n_prompts} ({el:.0f} s this run)")
        # ---- bypasses
        bypasses, r2 = {}, {}
        for b in cands:
            down, up, r2[b] = solve_bypass(mom.xx[b], mom.xd[b], mom.dd[b], mom.n, cfg.rank, cfg.ridge)
            bypasses[b] = (down, up)
        _log("bypass R^2 on the fitting states: " + " ".join(f"{b}:{r2[b]:.2f}" for b in cands))
        # ---- stage 3: per-prompt single-block costs with the bypasses (resumable)
        rf = RouterFile(n_layer, d, {b: np.zeros(d, np.float32) for b in cands}, {b: 0.0 for b in cands},
                        fingerprint=fingerprint, bypasses=bypasses)
        tmp_rf = work / f"bypass-r{cfg.rank}.safetensors"
        save_router_file(tmp_rf, rf, force=True)
        # "-w": rows from one cache state (set_kl); a folder's older cold-row costs are not mixed in
        costs_path = work / f"costs-r{cfg.rank}-{'_'.join(map(str, cands))}-w.npy"
        costs = list(np.load(costs_path)) if costs_path.exists() else []
        if len(costs) < cfg.n_cost:
            m.close()
            from .convert.attach import attach_data, write_sidecar

            side = work / f"bypass-r{cfg.rank}.sidecar.gguf"
            write_sidecar(model_path, side, **attach_data(rf).kwargs(), force=True)
            m = Model(model_path, n_ctx=2048, n_threads=cfg.threads, routers=side, verbose=False)
            t0 = time.time()
            for i in range(len(costs), cfg.n_cost):
                costs.append(np.array(set_kl(m, replies[i], [[b] for b in cands])))
                np.save(costs_path.with_suffix(".part.npy"), np.stack(costs))
                os.replace(costs_path.with_suffix(".part.npy"), costs_path)
                _log(f"block costs {i + 1}/{cfg.n_cost} ({time.time() - t0:.0f} s this run)")
        costs_a = np.stack(costs)[:cfg.n_cost]
        mean_cost = costs_a.mean(0)
        ranking = [cands[j] for j in np.argsort(mean_cost, kind="stable")]
        ranking += [b for b in range(n_layer) if b not in ranking]
        feats_a = np.stack(feats)[:cfg.n_cost][:, cands]
        w, bias, rep = fit_routers(feats_a, costs_a, seed=cfg.seed)
        rep["logit_scale"] = ROUTER_LOGIT_SCALE  # what the file stores: ROUTER_LOGIT_SCALE * (w, b)
        _log(f"routers: lambda {rep['lambda']}, held-out Spearman {rep['lambda_spearman']}, "
             f"biases only {rep['bias_only_spearman']:.3f}")
    finally:
        m.close()
    report = {"settings": settings, "rank": cfg.rank, "ridge": cfg.ridge, "candidates": cands, "ranking": ranking,
              "n_states": mom.n, "bypass_r2": {str(b): r2[b] for b in cands},
              "mean_single_cost": {str(b): float(c) for b, c in zip(cands, mean_cost)},
              "routers": rep, "seconds_this_run": round(time.time() - t_start, 1)}
    static = {"single_kl": {
        "name": "single_kl", "ranking": ranking,
        "method": "mean exact KL(skipped || full) over the full model's own replies to calibration prompts "
                  f"({settings['sources']}), each block skipped alone with its fitted bypass (first-gguf fit)",
        "single_block_cost": {str(b): float(c) for b, c in zip(cands, mean_cost)},
        "n_prompts": cfg.n_cost}}
    rf = RouterFile(n_layer, d, {b: (ROUTER_LOGIT_SCALE * w[j]).astype(np.float32) for j, b in enumerate(cands)},
                    {b: float(ROUTER_LOGIT_SCALE * bias[j]) for j, b in enumerate(cands)},
                    fingerprint=fingerprint, static_rankings=static,
                    provenance={"method": "first-gguf fit (closed-form bypasses and ridge routers)",
                                "command": " ".join(sys.argv), "report": report},
                    bypasses=bypasses)
    save_router_file(out, rf, force=force)
    (work / "report.json").write_text(json.dumps(report, indent=1))
    return report


def budget_sets(ranking: list[int], n_layer: int, budgets) -> list[list[int]]:
    """The blocks a static ranking skips at each skip_budget (Model.n_skip_for_budget's count), in block order."""
    import math

    sets = []
    for b in budgets:
        k = int(math.floor(float(b) * n_layer + 1e-9))
        if k:
            sets.append(sorted(ranking[:k]))
    return sets


def greedy_set_ranking(model_path: str | os.PathLike, routers: str | os.PathLike | None, work: str | os.PathLike,
                       replies: list[dict], *, n_layer: int, candidates: list[int], max_set: int,
                       single_cost: dict | None = None, threads: int | None = None) -> dict:
    """A static ranking by the cost of whole skip sets (greedy forward selection), not of single blocks.

    Single-block costs do not add up: two blocks cheap alone can be dear together (the second works on
    the first's error). Step k adds to the k-1 blocks already chosen the candidate whose set costs least,
    the cost of a set being ``set_kl`` (teacher-forced KL on the full model's own replies, the bypasses of
    ``routers`` on) averaged over ``replies``. The ranking is nested, so each skip_budget's set is the
    greedy set of its size. ``candidates``: the blocks tried at each step (e.g. the cheapest dozen by
    single cost: a step costs one pass per candidate and reply); after ``max_set`` steps the rest of the
    blocks follow by ``single_cost`` (``{block: cost}``; block order without it).

    Resumable: every (set, reply) cost is saved in ``work/set-costs.json`` as it is measured.
    Returns {"ranking", "greedy_steps": [{"block", "set", "set_cost", "trials": {block: cost}}]}.
    """
    from .model import Model

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    candidates = [int(b) for b in candidates]
    bad = [b for b in candidates if not 0 <= b < n_layer]
    if bad or len(set(candidates)) != len(candidates):
        raise ValueError(f"greedy_set_ranking: candidates {candidates} must be distinct blocks in 0..{n_layer - 1}")
    if not 1 <= max_set <= len(candidates):
        raise ValueError(f"greedy_set_ranking: max_set {max_set} must be in 1..{len(candidates)} (the candidates)")
    if not replies:
        raise ValueError("greedy_set_ranking: no replies")
    path = work / "set-costs.json"
    meta = {"model": str(model_path), "routers": str(routers), "n_replies": len(replies)}
    cache = json.loads(path.read_text()) if path.exists() else {"meta": meta, "costs": {}}
    if cache["meta"] != meta:
        raise ValueError(f"{path} holds set costs for {cache['meta']}, not {meta}; use another work folder")
    costs: dict[str, list] = cache["costs"]  # "b1,b2,...": per-reply cost (None: not measured yet)
    key = lambda st: ",".join(map(str, sorted(st)))  # noqa: E731

    m = None
    try:
        chosen: list[int] = []
        steps = []
        for step in range(max_set):
            trial_sets = {c: sorted(chosen + [c]) for c in candidates if c not in chosen}
            todo = [st for st in trial_sets.values() if None in costs.setdefault(key(st), [None] * len(replies))]
            if todo:
                if m is None:
                    m = Model(model_path, n_ctx=2048, n_threads=threads, routers=routers, verbose=False)
                t0 = time.time()
                for i, r in enumerate(replies):
                    sets_i = [st for st in todo if costs[key(st)][i] is None]
                    if not sets_i:
                        continue
                    for st, v in zip(sets_i, set_kl(m, r, sets_i)):
                        costs[key(st)][i] = v
                    tmp = path.with_suffix(".part")
                    tmp.write_text(json.dumps(cache))
                    os.replace(tmp, path)
                _log(f"set costs: step {step + 1}/{max_set}, {len(todo)} sets x {len(replies)} replies "
                     f"({time.time() - t0:.0f} s)")
            trials = {c: float(np.mean(costs[key(st)])) for c, st in trial_sets.items()}
            best = min(trials, key=lambda c: (trials[c], c))
            chosen.append(best)
            steps.append({"block": best, "set": sorted(chosen), "set_cost": round(trials[best], 5),
                          "trials": {str(c): round(v, 5) for c, v in trials.items()}})
            _log(f"set costs: step {step + 1}: +block {best} -> {sorted(chosen)} costs {trials[best]:.4f}")
    finally:
        if m is not None:
            m.close()
    single_cost = single_cost or {}
    rest = sorted((b for b in range(n_layer) if b not in chosen),
                  key=lambda b: (single_cost.get(b, float("inf")), b))
    return {"ranking": chosen + rest, "greedy_steps": steps}


def refine_bypasses(model_path: str | os.PathLike, work: str | os.PathLike, base, replies: list[dict],
                    sets: list[list[int]], *, rank: int, ridge: float, n_fit: int | None = None,
                    n_val: int = 0, threads: int | None = None, eps: float | None = None) -> tuple[dict, dict]:
    """Refit the bypasses of the blocks in ``sets`` on the states decoding with those sets sees.

    fit() solves every bypass on full-depth states: block b's input is the full model's h_b, its target
    h_{b+1} - h_b. When several blocks are skipped, block b's input is the *skipped* model's state,
    which the upstream bypasses only approximate, and the errors add up along the stream. Here each
    block's bypass is fitted instead on (a) its input as decoding sees it with each skip set that holds
    it (prompt at full depth, the reply teacher-forced with the set's blocks skipped and the bypasses on)
    to (b) the full model's state after the block, h^full_{b+1}: the bypass also corrects what upstream
    skipping lost. One bypass serves every budget, so the sets' states are pooled.

    The blocks are refitted one at a time in block order (Gauss-Seidel): block b's inputs are taken with
    the upstream bypasses already refitted. Refitting all blocks at once from the same states (Jacobi)
    corrects every upstream error once per block of a span, and measured worse on Qwen2.5-Coder-1.5B
    (held-out teacher-forced KL at skip_budget 0.2: 0.256 -> 0.301); one at a time measured no better than
    fit()'s own bypasses (0.256 -> 0.266 from 64 replies; docs/results.md), so it is not part of
    ``first-gguf fit``. Costs one pass over the replies per block and set. ``base``: a RouterFile whose bypasses start the sweep (and are kept for blocks outside
    the sets). Resumable: each block's result is saved in ``work`` as it is fitted.

    Returns (bypasses {block: (down, up)} at ``rank``, report); the report holds the teacher-forced
    KL(skip || full) of each set on the ``n_val`` replies after the fitting ones, before and after.
    """
    import dataclasses

    from .convert.attach import attach_data, write_sidecar
    from .convert.router_file import load_router_file, save_router_file
    from .model import Model

    work = Path(work)
    blocks = sorted({b for s in sets for b in s})
    if not blocks:
        raise ValueError("refine_bypasses: the skip sets are empty")
    n_fit = len(replies) - n_val if n_fit is None else n_fit
    if n_fit < 1 or n_fit + n_val > len(replies):
        raise ValueError(f"refine_bypasses: n_fit {n_fit} + n_val {n_val} must be <= the {len(replies)} replies")
    if eps is None:
        eps, _ = _norm_facts(model_path, base.n_layer)
    d = base.n_embd
    current = {b: (np.asarray(dn, np.float32), np.asarray(up, np.float32)) for b, (dn, up) in base.bypasses.items()}

    def sidecar(byp, name):
        side = work / f"{name}.sidecar.gguf"
        write_sidecar(model_path, side, **attach_data(dataclasses.replace(base, bypasses=byp)).kwargs(), force=True)
        return side

    def val_kl(side) -> list[float]:
        m = Model(model_path, n_ctx=2048, n_threads=threads, routers=side, verbose=False)
        try:
            tot = np.zeros(len(sets))
            for r in replies[n_fit:n_fit + n_val]:
                tot += set_kl(m, r, sets)
            return [round(float(t) / max(n_val, 1), 4) for t in tot]
        finally:
            m.close()

    keys = ("sets", "n_fit", "n_val", "rank", "ridge")
    report = {"sets": sets, "blocks": blocks, "n_fit": n_fit, "n_val": n_val, "rank": rank, "ridge": ridge,
              "order": "gauss-seidel", "r2": {}}
    rep_path = work / "refine-report.json"
    if rep_path.exists():
        old = json.loads(rep_path.read_text())
        if {k: old.get(k) for k in keys} != {k: report[k] for k in keys}:
            raise ValueError(f"{work} holds a refinement with other settings; use another work folder")
        report = old
    save = lambda: rep_path.write_text(json.dumps(report, indent=1))  # noqa: E731
    if n_val and "val_kl_before" not in report:
        report["val_kl_before"] = val_kl(sidecar(current, "refine-before"))
        _log(f"refine: held-out KL per set before {report['val_kl_before']}")
        save()
    full_cache: dict[int, dict[int, np.ndarray]] = {}  # reply -> {block: full-depth input}
    targets = sorted({b + 1 for b in blocks})
    for b in blocks:
        out_path = work / f"refine-b{b}.safetensors"
        if out_path.exists():
            current[b] = load_router_file(out_path).bypasses[b]
            continue
        b_sets = [s for s in sets if b in s]
        mom_path = work / f"refine-b{b}-moments.npz"
        mom = Moments.load(mom_path) if mom_path.exists() else Moments([b], d)
        m = Model(model_path, n_ctx=2048, n_threads=threads, routers=sidecar(current, f"refine-in-b{b}"),
                  verbose=False)
        t0 = time.time()
        try:
            for i in range(mom.n_prompts, n_fit):
                r = replies[i]
                need_full = i not in full_cache
                outs = m.continuation_layer_inputs(r["prompt_tokens"], r["reply_tokens"],
                                                   sorted(set(targets) | {b}) if need_full else [b],
                                                   ([[]] if need_full else []) + b_sets)
                if need_full:
                    full_cache[i] = outs.pop(0)
                for st in outs:
                    x = rmsnorm(st[b], eps)
                    dlt = (full_cache[i][b + 1] - st[b]).astype(np.float32)
                    mom.xx[b] += (x.T @ x).astype(np.float64)
                    mom.xd[b] += (x.T @ dlt).astype(np.float64)
                    mom.dd[b] += float(np.sum(dlt.astype(np.float64) ** 2))
                    mom.n += len(x)
                mom.n_prompts += 1
                if (i + 1) % 32 == 0 or i + 1 == n_fit:
                    mom.save(mom_path)
                    _log(f"refine block {b}: replies {i + 1}/{n_fit} ({time.time() - t0:.0f} s this run)")
        finally:
            m.close()
        dn, up, r2 = solve_bypass(mom.xx[b], mom.xd[b], mom.dd[b], mom.n, rank, ridge)
        current[b] = (dn, up)
        save_router_file(out_path, dataclasses.replace(base, bypasses={b: (dn, up)}), force=True)
        report["r2"][str(b)] = round(r2, 4)
        _log(f"refine block {b}: R^2 {r2:.3f} on {mom.n} states")
        save()
    if n_val and "val_kl_after" not in report:
        report["val_kl_after"] = val_kl(sidecar(current, "refine-after"))
        _log(f"refine: held-out KL per set after {report['val_kl_after']}")
        save()
    return {b: current[b] for b in blocks}, report


__all__ = ["FitConfig", "Moments", "budget_sets", "greedy_set_ranking", "refine_bypasses", "set_kl", "fit_routers", "parse_blocks", "rmsnorm", "run_fit", "solve_bypass"]
