"""Measures of what a user sees when blocks are skipped: the model's own replies, not references.

- **On-policy KL** (``onpolicy_kl``): the skipped model samples a reply to each
  prompt (temperature 1, top_p 1, the sampler seeded per prompt, so a run is
  reproducible); the skipped and the full model both score the reply's tokens
  (``Model.score_tokens``: prompt at full depth); the mean of
  log p_skip - log p_full over the tokens estimates KL(p_skip || p_full) on the
  states the skipped model actually visits, in nats/token. Token 0 of a reply
  is excluded: the full-depth prefill predicts it for both models alike. Teacher
  forcing on references (extra NLL) does not see this exposure-bias gap.
- **Repetition** (``greedy_repetition``, ``repetition_stats``): greedy replies;
  the share of a reply's token 4-grams that repeat an earlier 4-gram of the
  same reply, the longest run of one repeated token, and the share of replies
  above ``LOOP_SHARE`` / with a run of ``LONG_RUN`` or more. Counted on tokens,
  so a degenerate "Basoooooo..." (one word, many tokens) is caught; the
  word-level 4-gram share is kept as an extra figure only.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Callable, Sequence, Union

import numpy as np

from .model import Generation, Model

LOOP_SHARE = 0.2  # a reply "loops" when more than this share of its token 4-grams repeat an earlier one
LONG_RUN = 8      # a run of one token this long (or longer) marks a degenerate reply

Prompt = Union[str, Sequence[dict]]  # a user message, or chat messages ({"role", "content"} dicts)


# ------------------------------------------------------------ repetition
def repeated_ngram_share(items: Sequence, n: int = 4) -> float:
    """Share of the (overlapping) n-grams of ``items`` (token ids or words) that equal an earlier n-gram
    of the same sequence; 0 when there are fewer than two n-grams. A reply stuck in a loop approaches 1."""
    grams = [tuple(items[i:i + n]) for i in range(len(items) - n + 1)]
    if len(grams) < 2:
        return 0.0
    seen, rep = set(), 0
    for g in grams:
        rep += g in seen
        seen.add(g)
    return rep / len(grams)


def repeated_word_ngram_share(text: str, n: int = 4) -> float:
    """repeated_ngram_share over the lower-cased words of ``text`` (blind to runs inside one word)."""
    return repeated_ngram_share(text.lower().split(), n)


def longest_run(tokens: Sequence[int]) -> int:
    """Length of the longest run of one token repeated back to back (0 for an empty reply)."""
    best = run = 0
    for i, t in enumerate(tokens):
        run = run + 1 if i and t == tokens[i - 1] else 1
        best = max(best, run)
    return best


@dataclass
class Repetition:
    """Repetition of a set of replies. Means and shares are over replies."""

    token_4gram: float   # mean share of repeated token 4-grams
    looping: float       # share of replies with token_4gram > LOOP_SHARE
    longest_run: float   # mean longest run of one token
    long_runs: float     # share of replies with a run of LONG_RUN tokens or more
    word_4gram: float    # mean share of repeated word 4-grams (extra; misses runs inside a word)
    n: int               # replies
    per_reply: list[dict] = field(default_factory=list)  # token_4gram, longest_run, word_4gram of each reply
    replies: list[str] = field(default_factory=list)
    skipped: list[list[int]] = field(default_factory=list)  # blocks skipped for each reply


def repetition_stats(tokens: Sequence[Sequence[int]], texts: Sequence[str]) -> Repetition:
    """Repetition of replies given as token ids and their texts (same order)."""
    if len(tokens) != len(texts) or not tokens:
        raise ValueError(f"expected as many texts as token lists (at least one); got {len(tokens)} token lists "
                         f"and {len(texts)} texts")
    per = [{"token_4gram": repeated_ngram_share(list(t)), "longest_run": longest_run(list(t)),
            "word_4gram": repeated_word_ngram_share(x)} for t, x in zip(tokens, texts)]
    return _summarize(per, list(texts), [])


def _summarize(per: list[dict], replies: list[str], skipped: list[list[int]]) -> Repetition:
    mean = lambda k: float(np.mean([p[k] for p in per]))  # noqa: E731
    return Repetition(token_4gram=mean("token_4gram"),
                      looping=float(np.mean([p["token_4gram"] > LOOP_SHARE for p in per])),
                      longest_run=mean("longest_run"),
                      long_runs=float(np.mean([p["longest_run"] >= LONG_RUN for p in per])),
                      word_4gram=mean("word_4gram"), n=len(per), per_reply=per, replies=replies, skipped=skipped)


def pool_repetition(parts: Sequence[Repetition]) -> Repetition:
    """One Repetition over all replies of ``parts`` (the same as measuring them together)."""
    if not parts:
        raise ValueError("pool_repetition: no parts given")
    return _summarize([p for r in parts for p in r.per_reply], [x for r in parts for x in r.replies],
                      [s for r in parts for s in r.skipped])


def greedy_repetition(model: Model, prompts: Sequence[Prompt], skip_budget: float = 0.0, *,
                      skip_strategy: str = "router", skip_layers: Sequence[int] | None = None,
                      max_tokens: int = 96) -> Repetition:
    """Repetition of the greedy replies (``max_tokens`` at most) to ``prompts`` at ``skip_budget``.

    Args:
        model: the model (its ``bypass`` and decode-LoRA settings apply).
        prompts: user messages, or lists of chat messages.
        skip_budget, skip_strategy, skip_layers: as in Model.generate.
        max_tokens: most tokens per reply.
    """
    gens = [complete(model, *prompt_tokens(model, p), skip_budget, temperature=0.0, max_tokens=max_tokens,
                     skip_strategy=skip_strategy, skip_layers=skip_layers) for p in _check_prompts(prompts)]
    rep = repetition_stats([g.tokens for g in gens], [g.text for g in gens])
    rep.skipped = [g.skipped_layers for g in gens]
    return rep


# -------------------------------------------------------- on-policy KL
@dataclass
class OnPolicyKL:
    """KL(p_skip || p_full) estimated on temperature-1 samples of the skipped model, nats/token."""

    kl: float            # pooled: mean of log p_skip - log p_full over the scored tokens of all replies
    n_tokens: int        # scored tokens (each reply's tokens after its token 0)
    per_prompt: list[float | None]  # the same mean per reply (None: fewer than 2 tokens)
    per_prompt_tokens: list[int]    # scored tokens per reply
    replies: list[str]
    reply_tokens: list[list[int]]
    skipped: list[list[int]]  # blocks skipped for each reply
    seed: int
    # the same KL computed exactly over the vocabulary at each visited state (the sampled reply's prefixes):
    # sum_v p_skip(v) (log p_skip(v) - log p_full(v)), averaged like ``kl``. Same expectation, far lower
    # variance than the single sampled token's log-ratio (a Rao-Blackwellised estimate); never negative
    kl_exact: float = float("nan")
    per_prompt_exact: list[float | None] = field(default_factory=list)


def onpolicy_kl(model: Model, prompts: Sequence[Prompt], skip_budget: float, *, skip_strategy: str = "router",
                skip_layers: Sequence[int] | None = None, max_tokens: int = 48, seed: int = 0) -> OnPolicyKL:
    """On-policy KL of skipped decoding against the full model over ``prompts``.

    For each prompt the skipped model samples a reply (temperature 1, top_p 1, ``max_tokens`` at most,
    the chat template's stop strings; the end-of-generation token is not part of the reply) with a
    sampler seeded by ``seed`` and the prompt's tokens, so a prompt gets the same random stream whatever
    else is measured. Both models score the reply teacher-forced with the prompt at full depth
    (``Model.score_tokens`` at ``skip_budget`` and at 0); token 0 is excluded (the full-depth prefill
    predicts it for both). At skip_budget 0 (no skip_layers) the result is exactly 0.

    Args:
        model: the model (its ``bypass`` and decode-LoRA settings apply to the skipped side).
        prompts: user messages, or lists of chat messages.
        skip_budget, skip_strategy, skip_layers: as in Model.generate.
        max_tokens: most tokens per sampled reply.
        seed: base seed of the per-prompt samplers.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer; got {seed!r}")
    return pool_onpolicy([_onpolicy_one(model, prompt, skip_budget, skip_strategy=skip_strategy,
                                        skip_layers=skip_layers, max_tokens=max_tokens, seed=seed)
                          for prompt in _check_prompts(prompts)])


def _onpolicy_one(model: Model, prompt: Prompt, skip_budget: float, *, skip_strategy: str,
                  skip_layers: Sequence[int] | None, max_tokens: int, seed: int) -> OnPolicyKL:
    p, stops = prompt_tokens(model, prompt)
    g = complete(model, p, stops, skip_budget, temperature=1.0, max_tokens=max_tokens,
                 skip_strategy=skip_strategy, skip_layers=skip_layers, entropy=prompt_seed(seed, p))
    if len(g.tokens) < 2:
        return OnPolicyKL(float("nan"), 0, [None], [0], [g.text], [g.tokens], [g.skipped_layers], seed,
                          float("nan"), [None])
    skip = model.score_tokens(p, g.tokens, skip_budget, skip_strategy=skip_strategy, skip_layers=skip_layers,
                              logprob_rows=True)
    full = model.score_tokens(p, g.tokens, 0.0, logprob_rows=True)
    if skip.skipped_layers != g.skipped_layers:
        raise RuntimeError(f"onpolicy_kl: scoring skipped blocks {skip.skipped_layers}, sampling skipped "
                           f"{g.skipped_layers} for the same prompt")
    d = np.asarray(skip.logprobs[1:], dtype=np.float64) - np.asarray(full.logprobs[1:], dtype=np.float64)
    kl = float(d.mean())
    ls, lf = skip.logprob_rows[1:].astype(np.float64), full.logprob_rows[1:].astype(np.float64)
    exact = float(np.mean(np.sum(np.exp(ls) * (ls - lf), axis=1)))
    return OnPolicyKL(kl, len(d), [kl], [len(d)], [g.text], [g.tokens], [g.skipped_layers], seed, exact, [exact])


def pool_onpolicy(parts: Sequence[OnPolicyKL]) -> OnPolicyKL:
    """One OnPolicyKL over all replies of ``parts``: the mean over all their scored tokens."""
    if not parts:
        raise ValueError("pool_onpolicy: no parts given")
    per, counts = [v for r in parts for v in r.per_prompt], [n for r in parts for n in r.per_prompt_tokens]
    n = sum(counts)
    kl = float(sum(v * c for v, c in zip(per, counts) if c) / n) if n else float("nan")
    # results written before kl_exact existed have no per-prompt exact values: the pool then has none either
    exact = [v for r in parts for v in (r.per_prompt_exact or [None] * len(r.per_prompt))]
    have = [(v, c) for v, c in zip(exact, counts) if c and v is not None]
    kl_exact = (float(sum(v * c for v, c in have) / sum(c for _, c in have))
                if have and len(have) == sum(1 for c in counts if c) else float("nan"))
    return OnPolicyKL(kl, n, per, counts, [x for r in parts for x in r.replies],
                      [t for r in parts for t in r.reply_tokens], [s for r in parts for s in r.skipped], parts[0].seed,
                      kl_exact, exact)


def prompt_seed(seed: int, tokens: Sequence[int]) -> list[int]:
    """Seed entropy of one prompt's sampler: the base seed and a CRC-32 of the prompt's token ids."""
    return [seed, zlib.crc32(np.asarray(tokens, dtype=np.int64).tobytes())]


def _numpy_sampler(entropy: list[int]) -> Callable[[np.ndarray], int]:
    """Softmax sampling at temperature 1 from a numpy generator of its own (the measure's sampler since its
    first results; kept, not llama.cpp's chain, so that reruns reproduce the published replies)."""
    rng = np.random.default_rng(entropy)

    def sample(logits: np.ndarray) -> int:
        x = logits.astype(np.float64)
        x -= x.max()
        p = np.exp(x)
        p /= p.sum()
        return int(rng.choice(len(p), p=p))

    return sample


# -------------------------------------------------------------- helpers
def _check_prompts(prompts: Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        raise TypeError(f"prompts must be a non-empty list of user messages or chat-message lists; got "
                        f"{prompts!r:.80}")
    return list(prompts)


def prompt_tokens(model: Model, prompt: Prompt) -> tuple[list[int], list[str]]:
    """Prompt tokens and stop strings: chat template when the model has one, else the raw text."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return model.prompt_tokens_for(messages)


def complete(model: Model, tokens: list[int], stops: list[str], skip_budget: float, *, temperature: float,
             max_tokens: int, skip_strategy: str | None = "router", skip_layers: Sequence[int] | None = None,
             entropy: list[int] | None = None) -> Generation:
    """One reply to prompt ``tokens``: greedy at temperature 0, else sampled at temperature 1 from a numpy
    generator seeded by ``entropy``."""
    if temperature not in (0.0, 1.0) or (temperature == 1.0 and entropy is None):
        raise ValueError(f"complete: temperature 0, or 1 with entropy; got {temperature!r}")
    return model.generate_tokens(tokens, skip_budget, max_tokens=max_tokens, stop=stops or None,
                                 skip_strategy=skip_strategy or "router", skip_layers=skip_layers,
                                 sampler=_numpy_sampler(entropy) if temperature else None)


__all__ = ["LOOP_SHARE", "LONG_RUN", "OnPolicyKL", "Repetition", "greedy_repetition", "longest_run", "onpolicy_kl",
           "pool_onpolicy", "pool_repetition", "repeated_ngram_share", "repeated_word_ngram_share",
           "repetition_stats"]
