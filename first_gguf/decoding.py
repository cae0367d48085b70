"""The decode loop's pieces under Model: Decoding (a prompt prefilled at full depth, then stepped one token
at a time with the chosen blocks skipped), open_decoding (Model.decoding()'s context manager, which makes
one) and the generation loop's helpers (_Request, a checked generation request; _stop_prefix_len, the
streamed tail held back; _last, a stream's Generation)."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np

from .results import Generation, GenerationChunk
from .sampling import Sampler, SamplingParams
from .skip import SkipRequest

if TYPE_CHECKING:
    from .model import Model


class Decoding:
    """A prompt prefilled at full depth, then decoded one token at a time with the chosen blocks skipped.

    Made by Model.decoding() (a context manager). ``logits`` holds the next token's logits
    (float32 [n_vocab]); ``step(token)`` evaluates a token and updates them.
    """

    def __init__(self, model: "Model", prompt: list[int], logits: np.ndarray, skipped: list[int], n_requested: int,
                 scores: np.ndarray | None, n_prefill: int, prefill_s: float, strategy: str) -> None:
        self._model = model
        self.prompt_tokens = prompt
        self.logits = logits
        self.skipped_layers = list(skipped)
        self.n_skip_requested = n_requested
        self.router_scores = scores       # aggregated keep-score per block; None without routers
        self.skip_strategy = strategy
        self.n_prefill_tokens = n_prefill  # prompt tokens evaluated (a cached prefix is reused)
        self.prefill_seconds = prefill_s
        self.decode_seconds = 0.0          # over step() calls (one llama_decode each)
        self.n_decoded = 0
        self.decode_lora = model._lora_on
        self.bypassed_layers = [il for il in skipped if model.bypass and il in model._bypass_blocks]

    def step(self, token: int) -> np.ndarray:
        """Evaluate ``token`` (blocks skipped) and return the next token's logits."""
        t0 = time.perf_counter()
        self.logits = self._model._eval([token], masked=bool(self.skipped_layers), logits="last")[-1]
        self.decode_seconds += time.perf_counter() - t0
        self.n_decoded += 1
        return self.logits

    def sample(self, sampler: Sampler) -> int:
        """A token drawn by a llama.cpp sampler chain from the current logits (as llama.cpp holds them)."""
        return sampler.sample(self._model._ctx)


@contextlib.contextmanager
def open_decoding(model: Model, prompt_tokens: Sequence[int], skip_budget: float | SkipRequest = 0.0, *,
                  skip_strategy: str = "router", skip_layers: Sequence[int] | None = None, adapters: bool = True,
                  routing: bool = True, reuse_cache: bool = True) -> Iterator[Decoding]:
    """Model.decoding(): prefill at full depth, choose the blocks, set the mask, yield the Decoding; on exit the
    mask is cleared, the dirty tail dropped and the adapters restored (``skip_budget``: a budget or a checked
    SkipRequest)."""
    req = skip_budget if isinstance(skip_budget, SkipRequest) else model.check_skip(
        skip_budget, skip_strategy, skip_layers)
    tokens = model._check_tokens(prompt_tokens, "prompt")
    saved = model.bypass, model.use_decode_lora
    if not adapters:
        model.bypass, model.use_decode_lora = False, False
    try:
        logits, n_eval, t_prefill = model._prefill(tokens, routing=routing, reuse=reuse_cache)
        scores = model.prompt_router_scores(len(tokens))
        skip, k = model._choose_skip(req, scores)
        model._set_mask(skip)
        yield Decoding(model, tokens, logits, skip, k, scores, n_eval, t_prefill, req.strategy)
    finally:
        model._set_mask(())
        model._drop_dirty()
        if not adapters:
            model.bypass, model.use_decode_lora = saved


@dataclass
class _Request:
    prompt: list[int]
    skip: SkipRequest
    max_tokens: int
    stops: list[str]
    params: SamplingParams
    seed: int | None
    sampler: Sampler | Callable[[np.ndarray], int] | None  # None: argmax


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of a stop string (0: none), as
    llama-cpp-python holds back a streamed tail."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def _last(stream: Iterator[GenerationChunk]) -> Generation:
    last = None
    for last in stream:
        pass
    return last.generation
