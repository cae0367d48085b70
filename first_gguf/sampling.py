"""Sampling on llama.cpp's sampler chain, as llama-cpp-python's ``Llama._init_sampler`` builds it.

One chain per generation: ``[logit_bias] [penalties] [grammar]`` then ``greedy`` (temperature 0) or
``[top_k] [typical] [top_p] [min_p] temp dist(seed)``; samplers at their neutral value are left out
(llama.cpp treats them as no-ops anyway). The chain owns its seed, so a generation's tokens never
depend on what ran before it. Plain greedy decoding (temperature 0, no penalties, no bias, no
grammar) does not build a chain: Model takes the argmax of the logits, as it always has.

Argument names and meanings are llama-cpp-python's ``Llama.create_completion``'s.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import math
import numbers
import os
import sys
import tempfile
from dataclasses import dataclass, field

import numpy as np

from ._lib import llama_cpp

SEED_MAX = 0xFFFFFFFE  # 0xFFFFFFFF is LLAMA_DEFAULT_SEED (a random seed)
RANDOM_SEEDS = (-1, 0xFFFFFFFF)  # llama.cpp's and llama-cpp-python's "random seed" (-1 is LLAMA_DEFAULT_SEED as uint32)
PENALTY_LAST_N = 64    # llama-cpp-python's last_n_tokens_size: penalties look at the last 64 generated tokens
MAX_LOGPROBS = 20      # OpenAI's top_logprobs limit

# The sampling vocabulary, defined here once (llama-cpp-python's create_completion names): Model's keywords,
# the CLI's options, the server's request fields and the drop-in's keywords are derived from these.
NUMERIC_OPTIONS = ("temperature", "top_k", "top_p", "min_p", "typical_p", "repeat_penalty", "presence_penalty",
                   "frequency_penalty")
# llama.cpp's chat defaults (common/common.h's sampling defaults); generation's own defaults are greedy
CHAT_DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05}
# what each option does, in the words the CLI's --help and the docs use
OPTION_HELP = {
    "temperature": "0: greedy (the most likely token).",
    "top_k": "Keep the k most likely tokens (0: off).",
    "top_p": "Nucleus threshold in (0, 1] (1: off).",
    "min_p": "Drop tokens below min-p x the top token's probability, in [0, 1] (0: off).",
    "typical_p": "Locally typical sampling, in (0, 1] (1: off).",
    "repeat_penalty": "Penalty on tokens among the last 64 generated (1: off).",
    "presence_penalty": "In [-2, 2] (0: off).",
    "frequency_penalty": "In [-2, 2] (0: off).",
}

# name -> (low, high, low open, high open, integer); the ranges every message states
RANGES = {
    "temperature": (0.0, math.inf, False, True, False),
    "top_k": (0, math.inf, False, True, True),
    "top_p": (0.0, 1.0, True, False, False),
    "min_p": (0.0, 1.0, False, False, False),
    "typical_p": (0.0, 1.0, True, False, False),
    "repeat_penalty": (0.0, math.inf, True, True, False),
    "presence_penalty": (-2.0, 2.0, False, False, False),
    "frequency_penalty": (-2.0, 2.0, False, False, False),
    "seed": (0, SEED_MAX, False, False, True),
    "logprobs": (0, MAX_LOGPROBS, False, False, True),
}
LOGIT_BIAS_RANGE = (-100.0, 100.0)


def range_text(name: str) -> str:
    lo, hi, lo_open, hi_open, integer = RANGES[name]
    hi_s = "inf" if math.isinf(hi) else str(hi) if integer else f"{hi:g}"
    text = f"{'(' if lo_open else '['}{lo:g}, {hi_s}{')' if hi_open else ']'}"
    return text + " or -1 (a random seed)" if name == "seed" else text


def random_seed() -> int:
    """A seed for seed=-1: drawn from the OS, not from any generator (reported, so the reply can be replayed)."""
    import secrets

    return secrets.randbelow(SEED_MAX + 1)


def check_value(name: str, value):
    """``value`` of sampling option ``name`` as float/int, or TypeError/ValueError naming it and its range."""
    lo, hi, lo_open, hi_open, integer = RANGES[name]
    if integer:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an integer in {range_text(name)}; got {value!r}")
        v = int(value)
        if name == "seed" and v in RANDOM_SEEDS:
            return -1
    else:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a number in {range_text(name)}; got {value!r}")
        v = float(value)
    if math.isnan(v) or v < lo or (lo_open and v == lo) or v > hi or (hi_open and v == hi):
        raise ValueError(f"{name} must be in {range_text(name)}; got {value!r}")
    return v


def grammar_text(grammar) -> str:
    """GBNF text of ``grammar``: a string, or llama-cpp-python's LlamaGrammar (any object with a ``_grammar`` str)."""
    text = grammar if isinstance(grammar, str) else getattr(grammar, "_grammar", None)
    if not isinstance(text, str) or not text.strip():
        raise TypeError(f"grammar must be a GBNF string or a llama_cpp.LlamaGrammar; got {grammar!r:.80}")
    return text


@dataclass(frozen=True)
class SamplingParams:
    """Checked sampling options of one generation (defaults: greedy, every other sampler off)."""

    temperature: float = 0.0
    top_k: int = 0              # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None     # None: drawn from the Model's seeded generator; -1 given: drawn from the OS
    logit_bias: dict[int, float] = field(default_factory=dict)
    grammar: str | None = None  # GBNF text
    logprobs: int | None = None  # top-n log-probabilities per generated token; None: none

    @classmethod
    def check(cls, n_vocab: int, **options) -> "SamplingParams":
        """Every option (SAMPLING_KEYWORDS; the field defaults where left out) checked; raises TypeError for an
        unknown one and TypeError/ValueError naming the option, its value and its range."""
        unknown = sorted(set(options) - set(SAMPLING_KEYWORDS))
        if unknown:
            raise TypeError(f"unknown sampling option {unknown[0]!r}; expected one of {list(SAMPLING_KEYWORDS)}")
        nums = {name: check_value(name, options.get(name, _DEFAULTS[name])) for name in NUMERIC_OPTIONS}
        seed, logit_bias, grammar, logprobs = (options.get(k) for k in ("seed", "logit_bias", "grammar", "logprobs"))
        seed = None if seed is None else check_value("seed", seed)
        return cls(**nums, seed=random_seed() if seed == -1 else seed,
                   logit_bias=check_logit_bias(logit_bias, n_vocab),
                   grammar=None if grammar is None else grammar_text(grammar),
                   logprobs=None if logprobs is None else check_value("logprobs", logprobs))

    @property
    def argmax(self) -> bool:
        """Plain greedy: the argmax of the logits, no chain needed."""
        return (self.temperature == 0.0 and self.repeat_penalty == 1.0 and self.presence_penalty == 0.0
                and self.frequency_penalty == 0.0 and not self.logit_bias and self.grammar is None)


# every option SamplingParams.check (so Model.generate and its siblings) takes, in declaration order
SAMPLING_KEYWORDS = tuple(f.name for f in dataclasses.fields(SamplingParams))
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SamplingParams) if f.name in NUMERIC_OPTIONS}
assert SAMPLING_KEYWORDS[:len(NUMERIC_OPTIONS)] == NUMERIC_OPTIONS and set(RANGES) <= set(SAMPLING_KEYWORDS)


def check_logit_bias(logit_bias, n_vocab: int) -> dict[int, float]:
    """{token id: bias}; keys may be ints or their decimal strings (the OpenAI API's JSON form)."""
    if logit_bias is None:
        return {}
    if not isinstance(logit_bias, dict):
        raise TypeError(f"logit_bias must be a dict of token id -> bias; got {logit_bias!r:.80}")
    lo, hi = LOGIT_BIAS_RANGE
    out = {}
    for k, v in logit_bias.items():
        tok = int(k) if isinstance(k, str) and k.strip().lstrip("-").isdigit() else k
        if isinstance(tok, bool) or not isinstance(tok, numbers.Integral) or not 0 <= tok < n_vocab:
            raise ValueError(f"logit_bias key {k!r} is not a token id in [0, {n_vocab})")
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or math.isnan(v) or not lo <= v <= hi:
            raise ValueError(f"logit_bias[{k!r}] must be a number in [{lo:g}, {hi:g}]; got {v!r}")
        out[int(tok)] = float(v)
    return out


class Sampler:
    """A llama.cpp sampler chain for one generation (``sample`` reads the context's last logits row)."""

    def __init__(self, vocab, n_vocab: int, params: SamplingParams, seed: int, log_detail=lambda d: d) -> None:
        self._chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        try:
            self._build(vocab, n_vocab, params, seed, log_detail)
        except BaseException:
            self.close()
            raise

    def _add(self, smpl) -> None:
        llama_cpp.llama_sampler_chain_add(self._chain, smpl)  # the chain owns it from here

    def _build(self, vocab, n_vocab: int, p: SamplingParams, seed: int, log_detail) -> None:
        if p.logit_bias:
            arr = (llama_cpp.llama_logit_bias * len(p.logit_bias))()
            for i, (tok, bias) in enumerate(p.logit_bias.items()):
                arr[i].token, arr[i].bias = tok, bias
            self._add(llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(p.logit_bias), arr))
        if p.repeat_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0:
            self._add(llama_cpp.llama_sampler_init_penalties(n_vocab, PENALTY_LAST_N, p.repeat_penalty,
                                                             p.frequency_penalty, p.presence_penalty))
        if p.grammar is not None:
            with _stderr_captured() as captured:  # llama.cpp prints a parse error straight to stderr
                g = llama_cpp.llama_sampler_init_grammar(vocab, p.grammar.encode("utf-8"), b"root")
            why, rest = _grammar_parse_error(captured[0], p.grammar)
            _pass_on(rest)  # whatever else reached stderr meanwhile (another thread's output)
            if not g:
                raise ValueError(f"grammar is not valid GBNF (with a 'root' rule): "
                                 f"{why or log_detail('llama.cpp could not parse it')}")
            self._add(g)
        if p.temperature == 0.0:
            self._add(llama_cpp.llama_sampler_init_greedy())
            return
        if p.top_k > 0:
            self._add(llama_cpp.llama_sampler_init_top_k(p.top_k))
        if p.typical_p < 1.0:
            self._add(llama_cpp.llama_sampler_init_typical(p.typical_p, 1))
        if p.top_p < 1.0:
            self._add(llama_cpp.llama_sampler_init_top_p(p.top_p, 1))
        if p.min_p > 0.0:
            self._add(llama_cpp.llama_sampler_init_min_p(p.min_p, 1))
        self._add(llama_cpp.llama_sampler_init_temp(p.temperature))
        self._add(llama_cpp.llama_sampler_init_dist(seed))

    def sample(self, ctx) -> int:
        """Sample from the context's last logits row (and accept the token into penalties and grammar)."""
        return int(llama_cpp.llama_sampler_sample(self._chain, ctx, -1))

    def close(self) -> None:
        if getattr(self, "_chain", None):
            llama_cpp.llama_sampler_free(self._chain)
        self._chain = None

    def __del__(self) -> None:
        self.close()


@contextlib.contextmanager
def _stderr_captured():
    """File descriptor 2 redirected to a temporary file for the block (C code's fprintf(stderr) included);
    ``captured[0]`` holds the bytes written, after the block."""
    captured: list[bytes] = [b""]
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    with tempfile.TemporaryFile() as tmp:
        saved = os.dup(2)
        try:
            os.dup2(tmp.fileno(), 2)
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            captured[0] = tmp.read()


def _grammar_parse_error(data: bytes, grammar: str) -> tuple[str | None, bytes]:
    """llama.cpp's "<func>: error parsing grammar: <why>\n\n<grammar>\n" in ``data``: (<why> on one line, or
    None; the rest of ``data``)."""
    text = data.decode("utf-8", errors="replace")
    i = text.find(": error parsing grammar: ")
    if i < 0:
        return None, data
    start = text.rfind("\n", 0, i) + 1
    body = i + len(": error parsing grammar: ")
    tail = "\n\n" + grammar + "\n"
    end = text.find(tail, body)
    why, stop = (text[body:end], end + len(tail)) if end >= 0 else (text[body:].split("\n\n", 1)[0], len(text))
    why = why.strip()
    if why.endswith(" at"):  # llama.cpp quotes the text left at the error; none left: the grammar ended early
        why += " the end of the grammar"
    elif " at " in why:
        head, _, at = why.partition(" at ")
        why = f"{head} at {at[:60]!r}{'...' if len(at) > 60 else ''}"
    return why, (text[:start] + text[stop:]).encode("utf-8")


def _pass_on(data: bytes) -> None:
    if data.strip():
        os.write(2, data)


def top_logprobs(logits: np.ndarray, token: int, n: int) -> tuple[float, list[tuple[int, float]]]:
    """log p(token) and the n most likely (token, log p), from the model's raw logits (before any sampler)."""
    x = logits.astype(np.float64)
    m = x.max()
    lse = m + math.log(np.exp(x - m).sum())
    top = []
    if n:
        idx = np.argpartition(-x, n - 1)[:n] if n < len(x) else np.arange(len(x))
        idx = idx[np.lexsort((idx, -x[idx]))]
        top = [(int(i), float(x[i] - lse)) for i in idx]
    return float(x[token] - lse), top


__all__ = ["SamplingParams", "Sampler", "check_value", "range_text", "grammar_text", "top_logprobs"]
