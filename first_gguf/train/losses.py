"""The training losses: the skip sets of a batch (``draw_sets``), the ranking loss of the swaps, the
teacher-forced step (``step_loss``) and on-policy distillation (``onpolicy_loss``), with their KL helpers."""
from __future__ import annotations

import contextlib
import random
from typing import Sequence

import numpy as np

from .config import TrainConfig
from .data import _batch
from .family import _autocast, _device, _layers
from .forward import (_cont_positions, _head, attn_normed, choose_gates, gated_forward, prefix_forward,
                      sample_decode, sample_prefill)
from .parts import Bypasses, DecodeLora, Routers


def _kl_positions(n_prompt, length, T):
    """Positions whose prediction skipping can change: continuation positions except the last."""
    import torch

    t = torch.arange(T, device=n_prompt.device)[None, :]
    return (t >= n_prompt[:, None]) & (t < (length - 1)[:, None])


def _seq_kl(t_logp, s_logp, pos):
    """Per-sequence mean KL(teacher || student) over the positions ``pos`` [B, T]."""
    import torch

    kl_tok = (t_logp.exp() * (t_logp - s_logp)).sum(-1)  # [N] over selected positions
    owner = pos.nonzero()[:, 0]
    out = torch.zeros(pos.shape[0], device=kl_tok.device).index_add_(0, owner, kl_tok.float())
    return out / pos.sum(1).clamp(min=1)


def draw_sets(scores, cfg: "TrainConfig", rng: random.Random):
    """The skip sets of a batch from the router keep-scores [B, L].

    Per sequence: k drawn over [budget_min, budget_max] * L; the k lowest scores are skipped (the
    routed set). With probability ``static_mix`` the static ranking's top k instead; with probability
    ``set_noise`` the routed set is moved "around the routers' choice": 1-3 of its blocks are swapped for
    kept blocks among the next lowest scores, so adapters do not learn one fixed set. Then one swap per
    sequence for the ranking loss: a routed block a kept, a kept block b skipped instead.
    Returns (hard [B, L] 1 = keep, alt [B, L], a_idx [B], b_idx [B]) on the scores' device (drawn on the CPU:
    the per-row draws would be a device round trip each).
    """
    import torch

    dev = scores.device
    scores = scores.detach().float().cpu()
    B, L = scores.shape
    k_lo, k_hi = max(1, int(cfg.budget_min * L)), max(1, int(cfg.budget_max * L))
    k = torch.tensor([rng.randint(k_lo, k_hi) for _ in range(B)])
    _, hard = choose_gates(scores, k, cfg.temperature)
    order = torch.argsort(scores.detach(), dim=1).tolist()
    for i in range(B):
        if cfg.static_mix > 0 and rng.random() < cfg.static_mix:  # the static ranking's set (same k)
            hard[i] = 1.0
            hard[i, cfg.static_ranking[: int(k[i])]] = 0.0
        elif cfg.set_noise > 0 and rng.random() < cfg.set_noise and int(k[i]) < L - 1:
            ki = int(k[i])
            near = order[i][ki: min(L, 3 * ki + 2)]  # the kept blocks the routers rank next
            for _ in range(rng.randint(1, min(3, ki, len(near)))):
                out_blk = rng.choice((hard[i] == 0).nonzero()[:, 0].tolist())
                cand = [b for b in near if hard[i, b] == 1]
                if not cand:
                    break
                in_blk = rng.choice(cand)
                hard[i, out_blk], hard[i, in_blk] = 1.0, 0.0
    alt = hard.clone()
    a_idx, b_idx = torch.zeros(B, dtype=torch.long), torch.zeros(B, dtype=torch.long)
    for i in range(B):
        skipped = (hard[i] == 0).nonzero()[:, 0].tolist()
        kept = (hard[i] == 1).nonzero()[:, 0].tolist()
        a, b = rng.choice(skipped), rng.choice(kept)
        alt[i, a], alt[i, b] = 1.0, 0.0
        a_idx[i], b_idx[i] = a, b
    return hard.to(dev), alt.to(dev), a_idx.to(dev), b_idx.to(dev)


def rank_loss_of(scores, diff, a_idx, b_idx, cfg: "TrainConfig"):
    """Ranking loss for the swaps (diff = cost(routed) - cost(swap) > 0: skipping b instead of a is
    better, so a's keep-score should be above b's), and the centring regulariser."""
    import torch

    sa, sb = scores.gather(1, a_idx[:, None])[:, 0], scores.gather(1, b_idx[:, None])[:, 0]
    temp = cfg.temperature * (scores.detach().std(dim=1) + 1e-4)
    margin = torch.sign(diff) * (sa - sb) / temp
    rank_loss = (diff.abs() * torch.nn.functional.softplus(-margin)).mean()
    reg = ((scores.mean(1) - 0.5) ** 2).mean()
    return rank_loss, reg


def step_loss(model, routers: Routers, seqs, cfg: TrainConfig, rng: random.Random, *, pad: int,
              lora: DecodeLora | None = None, bypass: Bypasses | None = None):
    """One training step's loss for a batch of sequences (see the module docstring)."""
    import torch

    dev = _device(model)
    ids, n_prompt, length = _batch(seqs, pad, dev)
    B, T = ids.shape
    L = _layers(model).config.num_hidden_layers
    ac = _autocast(dev, cfg.bf16)

    def head(x):
        return _head(model, x)

    pos = _kl_positions(n_prompt, length, T)
    with torch.no_grad(), ac:  # the LoRA is off outside lora.active(): the teacher is the frozen model
        hid, inputs = gated_forward(model, ids, n_prompt, capture=True)
        t_logp = torch.log_softmax(head(hid[pos]).float(), -1)
        prompt_mask = torch.arange(T, device=dev)[None, :] < n_prompt[:, None]
        normed = attn_normed(model, inputs[:L])
    scores = routers.scores(normed, prompt_mask)

    hard, alt, a_idx, b_idx = draw_sets(scores, cfg, rng)

    trained = lora is not None or bypass is not None
    cont = _cont_positions(n_prompt, T)

    def student():  # the decode LoRA, if any, on the continuation positions of a skipped pass
        return lora.active(cont) if lora is not None else contextlib.nullcontext()

    grad_ctx = torch.enable_grad() if trained else torch.no_grad()
    with grad_ctx, ac, student():
        hid_s, _ = gated_forward(model, ids, n_prompt, hard, bypass=bypass)
        kl_routed = _seq_kl(t_logp, torch.log_softmax(head(hid_s[pos]).float(), -1), pos)
    with torch.no_grad(), ac, student():
        hid_a, _ = gated_forward(model, ids, n_prompt, alt, bypass=bypass)
        kl_alt = _seq_kl(t_logp, torch.log_softmax(head(hid_a[pos]).float(), -1), pos)

    rank_loss, reg = rank_loss_of(scores, kl_routed.detach() - kl_alt, a_idx, b_idx, cfg)
    loss = rank_loss + cfg.reg_lambda * reg
    if trained:
        loss = loss + kl_routed.mean()
    return loss, {"kl": float(kl_routed.detach().mean()), "kl_swap": float(kl_alt.mean()), "reg": float(reg.detach()),
                  "skip": float(1 - hard.mean())}


def _seq_div(t_logp, s_logp, pos, beta: float):
    """Per-sequence mean of (1 - beta) KL(student || teacher) + beta KL(teacher || student) over ``pos``."""
    import torch

    rkl = (s_logp.exp() * (s_logp - t_logp)).sum(-1)
    tok = rkl if beta == 0 else (1 - beta) * rkl + beta * (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    owner = pos.nonzero()[:, 0]
    out = torch.zeros(pos.shape[0], device=tok.device).index_add_(0, owner, tok.float())
    return out / pos.sum(1).clamp(min=1)


def onpolicy_loss(model, routers: Routers, prompts: Sequence[Sequence[int]], cfg: "TrainConfig",
                  rng: random.Random, generator, *, pad: int, stop_ids: set[int],
                  lora: DecodeLora | None = None, bypass: Bypasses | None = None):
    """On-policy distillation (GKD / MiniLLM style) for one batch of prompts.

    The current student (routers' sets as in ``draw_sets``, bypasses, decode LoRA) samples a
    continuation of each prompt at ``onpolicy_temperature`` with its current weights (every step, so
    the samples are always on-policy); the teacher is the same model at full depth. Loss on those tokens:
    (1 - beta) KL(student || teacher) + beta KL(teacher || student), exact over the vocabulary, at every
    continuation position whose prediction skipping changes (the first sampled token comes from the
    full-depth prompt and is excluded). The swap comparison for the routers uses the same divergence on
    the same sampled tokens, so the routers rank blocks by what the student's own text costs.
    """
    import torch

    dev = _device(model)
    ac = _autocast(dev, cfg.bf16)
    state = sample_prefill(model, prompts, pad=pad, bf16=cfg.bf16)
    scores = routers.scores(state["normed"], state["valid"])  # valid: the prompt positions
    hard, alt, a_idx, b_idx = draw_sets(scores, cfg, rng)
    conts = sample_decode(model, state, hard, max_new=cfg.onpolicy_tokens, temperature=cfg.onpolicy_temperature,
                          generator=generator, stop_ids=stop_ids, pad=pad, bypass=bypass, lora=lora)
    rows = [i for i, c in enumerate(conts) if len(c) >= 2]
    if not rows:  # every sample stopped at once: nothing that skipping changed
        zero = scores.sum() * 0.0
        return zero, {"okl": 0.0, "okl_swap": 0.0, "otokens": 0.0}
    # positions whose prediction skipping changes: every sampled token but the last (which predicts nothing)
    C = max(len(c) for c in conts)
    lens = torch.tensor([len(c) for c in conts], device=dev)
    pos = (torch.arange(C, device=dev)[None, :] < (lens - 1)[:, None])
    def head(x):
        return _head(model, x)

    with torch.no_grad(), ac:
        t_logp = torch.log_softmax(head(prefix_forward(model, state, conts)[pos]).float(), -1)
    trained = lora is not None or bypass is not None
    with (torch.enable_grad() if trained else torch.no_grad()), ac:
        hid_s = prefix_forward(model, state, conts, hard, bypass=bypass, lora=lora)
        div = _seq_div(t_logp, torch.log_softmax(head(hid_s[pos]).float(), -1), pos, cfg.onpolicy_beta)
    with torch.no_grad(), ac:
        hid_a = prefix_forward(model, state, conts, alt, bypass=bypass, lora=lora)
        div_alt = _seq_div(t_logp, torch.log_softmax(head(hid_a[pos]).float(), -1), pos, cfg.onpolicy_beta)
    idx = torch.tensor(rows, device=dev)  # sequences that stopped after one token carry no signal
    div, div_alt, hard = div[idx], div_alt[idx], hard[idx]
    scores, a_idx, b_idx = scores[idx], a_idx[idx], b_idx[idx]
    rank_loss, reg = rank_loss_of(scores, div.detach() - div_alt, a_idx, b_idx, cfg)
    loss = rank_loss + cfg.reg_lambda * reg
    if trained:
        loss = loss + div.mean()
    return loss, {"okl": float(div.detach().mean()), "okl_swap": float(div_alt.mean()),
                  "otokens": float(np.mean([len(conts[i]) for i in rows])), "oskip": float(1 - hard.mean())}
