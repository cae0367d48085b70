"""What the runtime returns: Generation (a finished generate / chat), GenerationChunk (one streamed step),
TokenLogprob (a generated token's log-probability and top alternatives) and ScoreResult (teacher-forced
scoring)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class TokenLogprob:
    """Log-probability of a generated token and the ``logprobs`` most likely tokens at that step.

    From the model's raw logits (log-softmax), before penalties, bias, grammar or temperature."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, log-probability), most likely first


@dataclass
class Generation:
    """Result of Model.generate / Model.chat."""

    text: str
    tokens: list[int]
    skipped_layers: list[int]
    router_scores: list[float] | None  # one aggregated keep-score per block (NaN: no router); None without routers
    n_prompt_tokens: int
    prefill_tokens_per_s: float  # over the prompt tokens evaluated in this call (a cached prefix is reused)
    decode_tokens_per_s: float   # over the decode steps (one llama_decode of one token each)
    finish_reason: str           # "stop" (end-of-generation token or stop string) or "length"
    skip_strategy: str = "router"
    n_prefill_tokens: int = 0    # prompt tokens actually evaluated (not taken from the cache)
    bypassed_layers: list[int] = field(default_factory=list)  # skipped blocks that ran their bypass adapter
    decode_lora: bool = False    # the decode-only LoRA was attached while decoding
    n_skip_requested: int = 0    # blocks the budget asked for; more than len(skipped_layers) when the
                                 # strategy has fewer candidates (routers on some blocks, a short ranking)
    seed: int | None = None      # the sampler's seed (None: greedy, no random draw)
    logprobs: list[TokenLogprob] | None = None  # one per generated token when logprobs= was given

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["router_scores"] is not None:
            d["router_scores"] = [None if math.isnan(s) else s for s in d["router_scores"]]
        return d


@dataclass
class GenerationChunk:
    """One step of Model.stream_generate / Model.stream_chat.

    ``text`` is the new text: ``token``'s, unless a multi-byte character is incomplete or the text ends in
    what may be the start of a stop string (held back until it is not, then sent with a later token, as
    llama-cpp-python does); the last chunk carries ``generation``.
    """

    text: str
    token: int | None
    generation: Generation | None = None
    logprob: TokenLogprob | None = None  # of ``token``, when logprobs= was given


@dataclass
class ScoreResult:
    logprobs: list[float]
    tokens: list[int]
    skipped_layers: list[int]
    router_scores: list[float] | None = field(default=None)
    # with score_tokens(..., logprob_rows=True): float32 [len(tokens), n_vocab], the log-softmax each token
    # was scored from (row i: the distribution of token i given the prompt and tokens[:i])
    logprob_rows: np.ndarray | None = field(default=None, repr=False)
