"""Static (input-agnostic) skip ranking by greedy loss calibration.

The baseline that FiRST's routers must beat, and what the default model uses
until trained routers ship. Computed on the runtime itself (Model.score), with
exactly the decode semantics: prompt at full depth, continuation with the
blocks skipped.

Calibration text is local and present wherever Python is: docstrings of the
standard library. Half of the examples are plain continuations (first part of
a docstring as prompt, the rest as continuation); half are chat turns (a
question about a docstring, formatted with the model's chat template, and the
full-depth model's own greedy reply as continuation), so the ranking measures
how far skipping moves the model from its own full-depth behaviour in chat.

Cost of a skip set S = mean over examples of the extra negative log-likelihood
per continuation token over the full model. Greedy forward selection: start
from the empty set; at each step add the block whose addition costs least,
trying the ``n_candidates`` cheapest blocks by single-block cost (costs of
sets are not additive, RESEARCH.md section 6). The ranking is the greedy order
followed by the remaining blocks by single-block cost.
"""
from __future__ import annotations

import hashlib
import platform
import random
import sys
import time
from typing import Callable

import numpy as np

from .datasets.common import docstrings
from .model import Model


def calibration_examples(model: Model, n_examples: int, *, seed: int = 0, reply_tokens: int = 48
                         ) -> list[tuple[str, str, str]]:
    """(kind, prompt, continuation) triples; chat replies are the full-depth model's own."""
    docs = docstrings()
    if len(docs) < n_examples:
        raise ValueError(f"only {len(docs)} calibration docstrings found; asked for {n_examples}")
    rng = random.Random(seed)
    rng.shuffle(docs)
    examples = []
    chat = model.has_chat_template
    for i, (name, doc) in enumerate(docs[:n_examples]):
        if i % 2 == 0 or not chat:  # models without a chat template get text examples only
            cut = doc.rfind(" ", 0, 300)
            examples.append(("text", doc[:cut], doc[cut:cut + 400]))
        else:
            messages = [{"role": "user", "content": f"Explain briefly what this Python documentation "
                                                    f"({name}) says:\n\n{doc[:500]}"}]
            tokens, _ = model.chat_prompt_tokens(messages)
            prompt = model.detokenize(tokens)  # re-tokenized identically by Model.score
            reply = model.generate(prompt, max_tokens=reply_tokens).text
            if reply.strip():
                examples.append(("chat", prompt, reply))
    return examples


CRITERIA = ("nll", "onpolicy")


def onpolicy_calibration_prompts(n: int, seed: int = 0) -> list[str]:
    """Calibration prompts for the on-policy criterion: drawn from the broad training prompts
    (first_gguf.datasets.broad: BIG-bench tasks, manual-page questions), never from the held-out evaluation
    sources."""
    from .datasets.broad import broad_prompts

    pool = [r["prompt"] for r in broad_prompts(seed=0) if len(r["prompt"]) <= 600]
    if len(pool) < n:
        raise ValueError(f"only {len(pool)} broad prompts found; asked for {n}")
    return random.Random(seed).sample(pool, n)


class _Ticker:
    """Progress inside a long phase: at most one line per ``every`` seconds (the first after ``every``)."""

    def __init__(self, progress: Callable[[str], None], what: str, total: int, every: float) -> None:
        self.progress, self.what, self.total, self.every = progress, what, total, every
        self.t0 = self.last = time.time()
        self.done = 0

    def tick(self, n: int = 1) -> None:
        self.done += n
        now = time.time()
        if now - self.last >= self.every and self.done < self.total:
            self.last = now
            self.progress(f"rank: {self.what}: {self.done}/{self.total} ({now - self.t0:.0f} s)")


def compute_static_ranking(model: Model, *, n_examples: int = 24, max_set: int = 15, n_candidates: int = 10,
                           seed: int = 0, criterion: str = "nll", onpolicy_tokens: int = 32,
                           progress: Callable[[str], None] = lambda s: None, progress_every: float = 10.0) -> dict:
    """Greedy forward selection of skip sets by cost (see the module docstring).

    ``criterion``: ``nll``: extra NLL per token of reference continuations (teacher-forced, docstrings);
    ``onpolicy``: KL(p_skip || p_full) on temperature-1 samples of the skipped model itself
    (first_gguf.measures.onpolicy_kl, ``onpolicy_tokens`` per reply, the same per-prompt seeds for every
    candidate set), on ``n_examples`` broad prompts: the cost of a set as the user's generated text sees it.
    The model's bypass adapters (and decode LoRA) apply, so the ranking fits them.
    ``progress`` gets a line as each phase starts and ends, and within a phase at most one per
    ``progress_every`` seconds (a phase can take minutes).
    """
    if n_examples < 2:
        raise ValueError(f"n_examples must be >= 2; got {n_examples}")
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; expected one of {CRITERIA}")
    n = model.n_layer
    max_set = min(max_set, n - 1)
    t_start = time.time()
    if criterion == "onpolicy":
        from .measures import onpolicy_kl

        prompts = onpolicy_calibration_prompts(n_examples, seed)
        progress(f"rank: {len(prompts)} on-policy calibration prompts")

        def costs(configs: list[list[int]], what: str) -> list[float]:
            ticker = _Ticker(progress, what, len(configs), progress_every)
            out = []
            for skip in configs:
                out.append(onpolicy_kl(model, prompts, 0.0, skip_layers=skip, max_tokens=onpolicy_tokens,
                                       seed=seed).kl)
                ticker.tick()
            return out
    else:
        progress(f"rank: building {n_examples} calibration examples (chat examples: the full model's replies)")
        examples = calibration_examples(model, n_examples, seed=seed)
        progress(f"rank: {len(examples)} calibration examples")
        full = [np.array(model.score(p, c)) for _, p, c in examples]

        def costs(configs: list[list[int]], what: str) -> list[float]:
            # example-outer: the prompt stays in the KV cache across the configurations
            ticker = _Ticker(progress, what + " (examples x sets)", len(examples) * len(configs), progress_every)
            extra = np.zeros((len(examples), len(configs)))
            for i, ((_, p, c), base) in enumerate(zip(examples, full)):
                for j, skip in enumerate(configs):
                    extra[i, j] = float(np.mean(base - np.array(model.score(p, c, skip_layers=skip))))
                    ticker.tick()
            return [float(x) for x in extra.mean(axis=0)]

    progress(f"rank: measuring the cost of each of the {n} blocks skipped alone, then {max_set} greedy steps "
             f"of up to {min(n_candidates, n)} candidate sets each")
    single = dict(enumerate(costs([[il] for il in range(n)], "single-block costs")))
    progress("rank: single-block costs " + " ".join(f"{il}:+{v:.2f}" for il, v in single.items()))
    chosen: list[int] = []
    steps = []
    for step in range(max_set):
        rest = sorted((il for il in range(n) if il not in chosen), key=lambda il: single[il])[:n_candidates]
        trials = dict(zip(rest, costs([sorted(chosen + [il]) for il in rest], f"step {step + 1}")))
        best = min(trials, key=lambda il: (trials[il], il))
        chosen.append(best)
        steps.append({"block": best, "set_cost": trials[best]})
        progress(f"rank: step {step + 1:2d}: +block {best:2d} -> set of {len(chosen)} costs +{trials[best]:.3f}")
    tail = sorted((il for il in range(n) if il not in chosen), key=lambda il: (single[il], il))
    path = str(model.path)
    with open(path, "rb") as f:
        head = hashlib.sha256(f.read(1 << 20)).hexdigest()
    if criterion == "onpolicy":
        name, extra = "greedy_onpolicy", {"bypass": model.bypass and model.n_bypasses > 0}
        method = ("greedy forward selection on on-policy KL(p_skip || p_full) per token (temperature-1 samples of "
                  "the skipped model, prompt at full depth, token 0 excluded)")
        data = (f"{n_examples} broad prompts (BIG-bench tasks, manual-page questions), {onpolicy_tokens} sampled "
                f"tokens each, seed {seed}")
    else:
        name, extra = "greedy_nll", {}
        method = "greedy forward selection on extra NLL/token (teacher-forced, prompt at full depth)"
        data = (f"{len(examples)} examples from Python {platform.python_version()} stdlib docstrings "
                f"(text continuation + chat replies of the full model), seed {seed}")
    return {
        "name": name,
        "method": method,
        "ranking": chosen + tail,
        "greedy_steps": steps,
        "single_block_cost": {str(k): v for k, v in single.items()},
        "data": data,
        **extra,
        "model_file": path.rsplit("/", 1)[-1],
        "model_sha256_first_mib": head,
        "n_candidates": n_candidates,
        "command": "first-gguf rank " + " ".join(sys.argv[2:]) if len(sys.argv) > 1 else "compute_static_ranking()",
        "seconds": round(time.time() - t_start, 1),
    }
