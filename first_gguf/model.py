"""The runtime: Model, a GGUF on the patched llama.cpp with prompt-decided layer skipping (loading, text,
the KV cache, prefill and masked decode, generation, chat, scoring, introspection).

Decode semantics (FiRST): the prompt is evaluated at full depth while the
routers score every prompt token; the chosen blocks are then skipped for every
generated token of that sequence.

KV cache: a token evaluated with a skip mask writes no K/V in the skipped
layers, so its cache cells hold stale data there. Model keeps the cache split
into a *clean* prefix (evaluated at full depth, reusable) and a *dirty* tail
(evaluated under a mask). As soon as a masked evaluation ends, the dirty tail
is removed from the cache (llama_memory_seq_rm); the next call re-evaluates
those tokens at full depth as part of its prompt. Continuing a conversation
after a skipped generation therefore computes exactly what the full-depth
model computes. Without a mask, generated tokens are clean and stay cached.

Model's parts live beside it: the skip choice in skip.py, the result types in results.py, Decoding and the
generation loop's helpers in decoding.py, the llama.cpp log capture, sidecar attach and LoRA calls in
loading.py, message checks and chat-template rendering in prompts.py, block-input capture in introspect.py.
Names other code imports from here (Generation, SkipRequest, check_skip_request, attach_sidecar, _LOG, ...)
stay importable from first_gguf.model.
"""
from __future__ import annotations

import codecs
import contextlib
import ctypes
import functools
import numbers
import os
import time
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from . import _lib, introspect
from ._lib import llama_cpp
from .decoding import Decoding, _last, _Request, _stop_prefix_len, open_decoding
from .gguf_info import GGUFInfo, read_info, read_with_sidecar
from .loading import _LOG, attach_sidecar, load_lora, max_threads, set_lora
from .prompts import chat_template_tokens, check_messages, check_stop
from .results import Generation, GenerationChunk, ScoreResult, TokenLogprob
from .sampling import (RANDOM_SEEDS, SAMPLING_KEYWORDS, SEED_MAX, Sampler, SamplingParams, random_seed,  # noqa: F401
                       top_logprobs)
from .skip import SkipRequest, aggregate_router_scores, check_skip_request, choose_skip, n_skip_for_budget

SEQ = 0  # Model drives a single sequence


def _check_int(name: str, value, lo: int, hi: int | None = None, why: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer; got {value!r} ({type(value).__name__})")
    if value < lo or (hi is not None and value > hi):
        raise ValueError(f"{name} must be {f'in [{lo}, {hi}]' if hi is not None else f'>= {lo}'}{why}; got {value}")
    return int(value)


def _open(method):
    """Public Model methods refuse to run on a closed model (llama.cpp would crash on freed memory)."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if self._llama is None:
            raise ValueError(f"model is closed ({self.path}); load it again")
        return method(self, *args, **kwargs)

    return wrapper


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


class Model:
    """A GGUF model on the patched llama.cpp, with prompt-decided layer skipping.

    Args:
        path: GGUF file.
        n_ctx: context length in tokens; 0 (as in llama-cpp-python): the model's training context
            (``n_ctx_train``). Above the training context a UserWarning says so.
        n_threads: CPU threads for prefill and decode, 1 to 4x the logical CPUs (default: llama-cpp-python's,
            half the cores).
        seed: seeds the generator that gives each sampled generation without its own ``seed`` its seed
            (a fresh Model makes the same sequence of calls reproducible); -1 (llama.cpp's "random"): a seed
            drawn from the OS, kept in ``Model.seed``.
        verbose: print llama.cpp's log to stderr.
        decode_lora: a llama.cpp LoRA adapter GGUF (``first-gguf train --lora-rank`` writes one) attached
            only while blocks are skipped: to decoded / scored tokens after the full-depth prefill, never
            to the prompt, and not at all with skip_budget=0.
        routers: a first-gguf sidecar GGUF (``first-gguf attach --sidecar`` writes one) whose routers,
            bypass adapters and static rankings are attached to the model at load time; ``path`` stays the
            untouched base GGUF. Refused, naming both files, when it was made for another model.
    """

    def __init__(self, path: str | os.PathLike, *, n_ctx: int = 4096, n_threads: int | None = None,
                 seed: int = 0, verbose: bool = False, decode_lora: str | os.PathLike | None = None,
                 routers: str | os.PathLike | None = None) -> None:
        self.path = Path(path)
        self.n_ctx = _check_int("n_ctx", n_ctx, 0)
        if 0 < self.n_ctx < 16:
            raise ValueError(f"n_ctx must be 0 (the model's training context) or >= 16; got {n_ctx}")
        if n_threads is not None:
            n_threads = _check_int("n_threads", n_threads, 1, max_threads(),
                                   f" (1 to 4x the {os.cpu_count()} logical CPUs)")
        if isinstance(seed, numbers.Integral) and not isinstance(seed, bool) and seed in RANDOM_SEEDS:
            seed = random_seed()
        self.seed = _check_int("seed", seed, 0, why=" or -1 (a random seed)")
        if routers is not None and not Path(routers).is_file():
            raise ValueError(f"router sidecar not found: {routers}; expected a first-gguf sidecar GGUF "
                             f"(first-gguf attach --sidecar writes one)")
        # the first-gguf data comes from the sidecar when one is given (checked against the model first)
        self.info: GGUFInfo = read_info(self.path) if routers is None else read_with_sidecar(self.path, routers)
        if self.info.sidecar:
            raise ValueError(f"{self.path}: is a first-gguf sidecar, not a model; load its base GGUF with "
                             f"routers={self.path}")
        self.routers_path: Path | None = self.info.routers_path  # None: the data is inside the GGUF

        from llama_cpp import Llama

        _LOG.verbose = verbose
        _LOG.lines.clear()
        try:
            self._llama = Llama(model_path=str(self.path), n_ctx=self.n_ctx, n_batch=512, n_ubatch=512,
                                n_threads=n_threads, n_threads_batch=n_threads, seed=self.seed,
                                verbose=verbose)
        except ValueError as e:
            raise ValueError(f"failed to load model from {self.path}: {_LOG.detail(str(e))}") from None
        self.n_threads = self._llama.n_threads
        if self.routers_path is not None:
            self._attach_sidecar(verbose)
        self._ctx = self._llama._ctx.ctx
        self._model = self._llama._model.model
        self.n_ctx_train = int(llama_cpp.llama_model_n_ctx_train(self._model))
        if self.n_ctx == 0:  # llama-cpp-python's n_ctx=0: the model's training context
            self.n_ctx = int(llama_cpp.llama_n_ctx(self._ctx))
        elif self.n_ctx > self.n_ctx_train > 0:
            warnings.warn(f"n_ctx {self.n_ctx} is above the context {self.path.name} was trained on "
                          f"({self.n_ctx_train} tokens); replies past {self.n_ctx_train} tokens may degrade",
                          UserWarning, stacklevel=2)
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self.n_layer = int(llama_cpp.llama_model_n_layer(self._model))
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self.n_batch = 512
        self.supports_skip = bool(_lib.first_model_supports_skip(self._model))
        self.n_routers = int(_lib.first_model_n_routers(self._model))
        self.n_bypasses = int(_lib.first_model_n_bypasses(self._model))
        self._bypass_blocks = set(self.info.bypass_blocks)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._rng = np.random.default_rng(self.seed)
        # clean prefix of the KV cache and its router scores; dirty tail (masked tokens)
        self._cached: list[int] = []
        self._cached_scores = np.zeros((0, self.n_layer), dtype=np.float32)
        self._dirty: list[int] = []
        self._skip_warned: set[tuple[str, int]] = set()  # (strategy, k) shortfalls already warned about
        self.decode_lora_path: Path | None = None
        self._lora = None  # llama_adapter_lora_p, freed with the model
        self._lora_on = False  # attached to the context right now
        self.use_decode_lora = True  # attach it while skipping (off: comparisons)
        if decode_lora is not None:
            self._load_decode_lora(Path(decode_lora))

    def _attach_sidecar(self, verbose: bool) -> None:
        """Attach the sidecar's tensors to the loaded model (the C side checks them again and applies all or
        nothing), then give the Llama a fresh context: one made before the attach does not see them."""
        try:
            attach_sidecar(self._llama, self.routers_path, self.path, verbose)
        except ValueError:
            self._llama.close()
            self._llama = None
            raise

    def _load_decode_lora(self, path: Path) -> None:
        if not path.is_file():
            raise ValueError(f"decode LoRA adapter not found: {path}; expected a llama.cpp LoRA GGUF file")
        if not self.supports_skip:
            raise ValueError(f"{self.path}: the runtime cannot skip blocks of this model, so a decode-only LoRA "
                             f"({path}) would never be used")
        self._lora, self.decode_lora_path = load_lora(self._model, path, self.path), path

    def _attach_lora(self, on: bool) -> None:
        on = on and self._lora is not None and self.use_decode_lora
        if on == self._lora_on:
            return
        set_lora(self._ctx, self._lora if on else None)
        self._lora_on = on

    def close(self) -> None:
        if getattr(self, "_batch", None) is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "_llama", None) is not None:
            self._llama.close()
            self._llama = None

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # ------------------------------------------------------------------ text
    @_open
    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str; got {type(text).__name__}")
        return self._llama.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    @_open
    def detokenize(self, tokens: Sequence[int]) -> str:
        """The text of token ids (ValueError for an id outside [0, n_vocab): llama.cpp would abort the process)."""
        tokens = self._check_tokens(tokens, "detokenize", allow_empty=True)
        return self._llama.detokenize(tokens).decode("utf-8", errors="replace")

    @_open
    def eog_tokens(self) -> set[int]:
        """The ids llama.cpp treats as end of generation (EOS, EOT, ...)."""
        return {t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(self._vocab, t)}

    @_open
    def token_bytes(self, token: int) -> bytes:
        """The bytes of one token's piece (special tokens rendered), as the OpenAI API's logprobs report them."""
        token = self._check_tokens([token], "token_bytes")[0]
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self._vocab, int(token), buf, len(buf), 0, True)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, int(token), buf, len(buf), 0, True)
        return buf.raw[:n]

    @property
    def static_rankings(self) -> dict[str, list[int]]:
        return dict(self.info.static_rankings)

    # ---------------------------------------------------------- KV handling
    @property
    @_open
    def bypass(self) -> bool:
        """Whether skipped blocks run their bypass adapters (default True; no effect without bypass tensors)."""
        return bool(self.supports_skip and _lib.first_get_bypass(self._ctx))

    @bypass.setter
    @_open
    def bypass(self, enable: bool) -> None:
        if not isinstance(enable, bool):
            raise TypeError(f"bypass must be a bool; got {type(enable).__name__}")
        if self.supports_skip:
            _lib.check(_lib.first_set_bypass(self._ctx, enable), "first_set_bypass")

    @_open
    def reset(self) -> None:
        """Forget the cached prompt (clears the KV cache)."""
        llama_cpp.llama_memory_clear(self._mem, True)
        self._cached, self._dirty = [], []
        self._cached_scores = self._cached_scores[:0]

    def _drop_dirty(self) -> None:
        if self._dirty:
            llama_cpp.llama_memory_seq_rm(self._mem, SEQ, len(self._cached), -1)
            self._dirty = []

    def _truncate(self, n: int) -> None:
        self._drop_dirty()
        if n < len(self._cached):
            llama_cpp.llama_memory_seq_rm(self._mem, SEQ, n, -1)
            self._cached = self._cached[:n]
            self._cached_scores = self._cached_scores[:n]

    def _set_mask(self, skip: Sequence[int]) -> None:
        """Skip these blocks for the tokens evaluated next; the decode LoRA is attached exactly while any are."""
        self._attach_lora(bool(skip))
        if not skip:
            _lib.check(_lib.first_set_skip_mask(self._ctx, SEQ, None, 0), "first_set_skip_mask")
            return
        mask = (ctypes.c_uint8 * self.n_layer)()
        for il in skip:
            mask[il] = 1
        _lib.check(_lib.first_set_skip_mask(self._ctx, SEQ, mask, self.n_layer), "first_set_skip_mask")

    def _eval(self, tokens: Sequence[int], *, masked: bool, logits: str, routing: bool = True) -> np.ndarray | None:
        """Evaluate tokens after the cache. logits: 'none', 'last' or 'all' rows; routing: score routers
        on full-depth tokens (their scores are kept with the cache)."""
        if not tokens:
            return None
        if not masked:
            self._drop_dirty()
        start = len(self._cached) + len(self._dirty)
        if start + len(tokens) > self.n_ctx:
            raise ValueError(f"context overflow: {start + len(tokens)} tokens needed, n_ctx is {self.n_ctx}")
        routing = routing and not masked and self.n_routers > 0
        if routing:
            _lib.check(_lib.first_set_routing(self._ctx, SEQ, True), "first_set_routing")
            _lib.first_clear_router_scores(self._ctx, SEQ)
        rows = []
        b = self._batch
        try:
            for cs in range(0, len(tokens), self.n_batch):
                chunk = tokens[cs:cs + self.n_batch]
                last_chunk = cs + self.n_batch >= len(tokens)
                b.n_tokens = len(chunk)
                for i, t in enumerate(chunk):
                    b.token[i] = t
                    b.pos[i] = start + cs + i
                    b.n_seq_id[i] = 1
                    b.seq_id[i][0] = SEQ
                    b.logits[i] = logits == "all" or (logits == "last" and last_chunk and i == len(chunk) - 1)
                rc = llama_cpp.llama_decode(self._ctx, b)
                if rc != 0:
                    raise RuntimeError(f"llama_decode failed with code {rc} at position {start + cs}")
                n_out = len(chunk) if logits == "all" else (1 if logits == "last" and last_chunk else 0)
                if n_out:
                    ptr = llama_cpp.llama_get_logits(self._ctx)
                    rows.append(np.ctypeslib.as_array(ptr, shape=(n_out, self.n_vocab)).copy())
        except BaseException:
            # leave the cache consistent: whatever this call wrote is dropped
            llama_cpp.llama_memory_seq_rm(self._mem, SEQ, start, -1)
            if routing:
                _lib.first_set_routing(self._ctx, SEQ, False)
            raise
        if masked:
            self._dirty.extend(tokens)
        else:
            if routing:
                n = _lib.first_get_router_n_tokens(self._ctx, SEQ)
                buf = np.empty((max(n, 1), self.n_layer), dtype=np.float32)
                pos = np.empty(max(n, 1), dtype=np.int32)
                _lib.check(_lib.first_get_router_scores(
                    self._ctx, SEQ, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                    pos.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), n), "first_get_router_scores")
                _lib.first_set_routing(self._ctx, SEQ, False)
                _lib.first_clear_router_scores(self._ctx, SEQ)
                if n != len(tokens) or not np.array_equal(pos[:n], np.arange(start, start + len(tokens))):
                    raise RuntimeError(f"router scores cover {n} tokens; expected {len(tokens)} at {start}..")
                scores = buf[:n]
            else:
                scores = np.full((len(tokens), self.n_layer), np.nan, dtype=np.float32)
            self._cached.extend(tokens)
            self._cached_scores = np.concatenate([self._cached_scores, scores])
        return np.concatenate(rows) if rows else None

    def _prefill(self, tokens: list[int], routing: bool = True, reuse: bool = True) -> tuple[np.ndarray, int, float]:
        """Full-depth prompt evaluation reusing the longest clean cached prefix (``reuse=False``: none)."""
        if not tokens:
            raise ValueError("the prompt is empty after tokenization")
        if len(tokens) >= self.n_ctx:
            raise ValueError(f"prompt has {len(tokens)} tokens; n_ctx is {self.n_ctx}")
        self._drop_dirty()
        self._set_mask(())
        n = 0
        for a, b in zip(self._cached if reuse else [], tokens[:-1]):  # keep >= 1 token to evaluate for the logits
            if a != b:
                break
            n += 1
        self._truncate(n)
        t0 = time.perf_counter()
        logits = self._eval(tokens[n:], masked=False, logits="last", routing=routing)
        dt = time.perf_counter() - t0
        return logits[-1], len(tokens) - n, dt

    # ----------------------------------------------------------- skip choice
    @_open
    def prompt_router_scores(self, n_prompt: int) -> np.ndarray | None:
        """Aggregated keep-score per block over the first n_prompt cached tokens (NaN: no router)."""
        if self.n_routers == 0:
            return None
        return aggregate_router_scores(self._cached_scores[:n_prompt], self.n_layer)

    @_open
    def check_skip(self, skip_budget: float = 0.0, skip_strategy: str = "router",
                   skip_layers: Sequence[int] | None = None) -> SkipRequest:
        """Check the skip options (as in generate()) and resolve ``"auto"``; the one place strategies are parsed.

        Raises TypeError/ValueError naming the value and what is accepted."""
        return check_skip_request(self.path, self.info, self.n_layer, self.supports_skip, self.n_routers,
                                  skip_budget, skip_strategy, skip_layers)

    def n_skip_for_budget(self, skip_budget: float) -> int:
        return n_skip_for_budget(skip_budget, self.n_layer)

    def _choose_skip(self, req: SkipRequest, scores: np.ndarray | None) -> tuple[list[int], int]:
        """(blocks to skip, blocks the budget asked for); warns once per (strategy, k) when fewer are possible."""
        return choose_skip(req, scores, n_layer=self.n_layer, seed=self.seed, info=self.info,
                           warned=self._skip_warned)

    # ------------------------------------------------------------ decoding
    @_open
    def decoding(self, prompt_tokens: Sequence[int], skip_budget: float = 0.0, *, skip_strategy: str = "router",
                 skip_layers: Sequence[int] | None = None, adapters: bool = True, routing: bool = True,
                 reuse_cache: bool = True) -> contextlib.AbstractContextManager[Decoding]:
        """Prefill ``prompt_tokens`` at full depth, choose the blocks to skip, and decode token by token.

        A context manager yielding a Decoding (``logits``, ``step(token)``, ``sample(sampler)``); on exit
        the skip mask is cleared and the skipped tokens' cache cells dropped. The low-level loop under
        generate(), also used by the benchmark.

        Args:
            prompt_tokens: token ids (a cached prefix is reused).
            skip_budget, skip_strategy, skip_layers: as in generate().
            adapters: False runs plain skipping (bypass adapters and decode LoRA off) for this decoding.
            routing: False does not score routers on the prompt (router strategies then have no scores).
            reuse_cache: False evaluates the whole prompt even when a prefix of it is cached: KV cached by
                another batch shape moves the logits by ~1e-6, enough to change a sampled token, so a
                seeded request is only reproducible from a prompt evaluated in one piece.
        """
        return open_decoding(self, prompt_tokens, skip_budget, skip_strategy=skip_strategy, skip_layers=skip_layers,
                             adapters=adapters, routing=routing, reuse_cache=reuse_cache)

    # ---------------------------------------------------------- generation
    @_open
    def make_sampler(self, **sampling) -> Sampler:
        """A llama.cpp sampler chain for Decoding.sample(); options as generate()'s sampling options (a
        ``seed`` of None is drawn from the Model's generator). Close it when done (``Sampler.close()``)."""
        return self._sampler(SamplingParams.check(self.n_vocab, **sampling))[1]

    def _sampler(self, params: SamplingParams) -> tuple[int | None, Sampler]:
        seed = None
        if params.temperature > 0:
            seed = params.seed if params.seed is not None else int(self._rng.integers(0, SEED_MAX + 1))
        _LOG.lines.clear()
        return seed, Sampler(self._vocab, self.n_vocab, params, seed or 0, _LOG.detail)

    def _prepare(self, prompt_tokens: list[int], template_stops: Sequence[str], *, skip_budget=0.0,
                 max_tokens=256, stop=None, skip_strategy="router", skip_layers=None, sampler=None,
                 **sampling) -> _Request:
        """Every option checked before anything runs (the streaming forms fail before returning)."""
        unknown = sorted(set(sampling) - set(SAMPLING_KEYWORDS))
        if unknown:
            raise TypeError(f"unknown option {unknown[0]!r}; expected skip_budget, max_tokens, stop, "
                            f"skip_strategy, skip_layers or one of {list(SAMPLING_KEYWORDS)}")
        skip = self.check_skip(skip_budget, skip_strategy, skip_layers)
        max_tokens = _check_int("max_tokens", max_tokens, 1)
        stops = check_stop(stop)
        stops += [s for s in template_stops if s not in stops]
        params = SamplingParams.check(self.n_vocab, **sampling)
        if sampler is not None:
            if not callable(sampler):
                raise TypeError(f"sampler must be a callable (logits -> token id); got {sampler!r:.80}")
            if params != SamplingParams(logprobs=params.logprobs):
                raise ValueError("sampler= replaces the sampling options; leave temperature, top_k, ... at "
                                 "their defaults")
        if len(prompt_tokens) >= self.n_ctx:
            raise ValueError(f"prompt has {len(prompt_tokens)} tokens; n_ctx is {self.n_ctx}")
        seed, chain = None, None
        if sampler is None and not params.argmax:
            seed, chain = self._sampler(params)
        return _Request(prompt_tokens, skip, max_tokens, stops, params, seed, chain or sampler)

    def _run(self, r: _Request) -> Iterator[GenerationChunk]:
        """The generation loop over a checked request (a generator)."""
        generated: list[int] = []
        logprobs: list[TokenLogprob] | None = None if r.params.logprobs is None else []
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        text, emitted = "", 0
        finish = "length"
        n_prompt = len(r.prompt)
        try:
            # a seeded request re-evaluates its whole prompt, so its tokens do not depend on what ran before
            with self.decoding(r.prompt, r.skip, reuse_cache=r.params.seed is None) as d:
                while True:
                    if r.sampler is None:
                        tok = int(np.argmax(d.logits))
                    elif isinstance(r.sampler, Sampler):
                        tok = d.sample(r.sampler)
                    else:
                        tok = r.sampler(d.logits)
                        if isinstance(tok, bool) or not isinstance(tok, numbers.Integral) or not 0 <= tok < self.n_vocab:
                            raise ValueError(f"sampler returned {tok!r}; expected a token id in [0, {self.n_vocab})")
                        tok = int(tok)
                    if llama_cpp.llama_vocab_is_eog(self._vocab, tok):
                        finish = "stop"
                        break
                    lp = None
                    if logprobs is not None:
                        lp = TokenLogprob(tok, *top_logprobs(d.logits, tok, r.params.logprobs))
                        logprobs.append(lp)
                    generated.append(tok)
                    text += decoder.decode(self._llama.detokenize([tok], prev_tokens=r.prompt + generated[:-1]))
                    cut = min((i for i in (text.find(s) for s in r.stops) if i >= 0), default=-1)
                    if cut >= 0:
                        text = text[:cut]
                        finish = "stop"
                        break
                    safe = len(text) - _stop_prefix_len(text, r.stops)  # a tail that may start a stop waits
                    yield GenerationChunk(text[emitted:safe] if safe > emitted else "", tok, logprob=lp)
                    emitted = max(emitted, safe)
                    if len(generated) >= r.max_tokens or n_prompt + len(generated) >= self.n_ctx:
                        break
                    d.step(tok)
                # the bytes of a character the generation ended inside (a max_tokens or n_ctx cut, or an
                # end-of-generation token) stay in the decoder: dropped, as llama-cpp-python drops them
        finally:
            if isinstance(r.sampler, Sampler):
                r.sampler.close()
        gen = Generation(
            text=text,
            tokens=generated,
            skipped_layers=list(d.skipped_layers),
            router_scores=None if d.router_scores is None else [float(s) for s in d.router_scores],
            n_prompt_tokens=n_prompt,
            prefill_tokens_per_s=d.n_prefill_tokens / d.prefill_seconds if d.prefill_seconds > 0 else float("inf"),
            decode_tokens_per_s=d.n_decoded / d.decode_seconds if d.decode_seconds > 0 else 0.0,
            finish_reason=finish,
            skip_strategy="explicit" if r.skip.layers is not None else r.skip.strategy,
            n_prefill_tokens=d.n_prefill_tokens,
            bypassed_layers=list(d.bypassed_layers),
            decode_lora=d.decode_lora,
            n_skip_requested=d.n_skip_requested,
            seed=r.seed,
            logprobs=logprobs,
        )
        yield GenerationChunk(text[emitted:], None, gen)

    @_open
    def stream_tokens(self, prompt_tokens: Sequence[int], skip_budget: float = 0.0, **options
                      ) -> Iterator[GenerationChunk]:
        """Stream a completion of token ids; options as generate(), plus ``sampler``: a callable
        (logits [n_vocab] -> token id) replacing the sampler chain (research code; the sampling
        options must stay at their defaults). Options are checked before the iterator is returned."""
        tokens = self._check_tokens(prompt_tokens, "prompt")
        return self._run(self._prepare(tokens, (), skip_budget=skip_budget, **options))

    def generate_tokens(self, prompt_tokens: Sequence[int], skip_budget: float = 0.0, **options) -> Generation:
        """generate() on token ids; see stream_tokens()."""
        return _last(self.stream_tokens(prompt_tokens, skip_budget, **options))

    @_open
    def stream_generate(self, prompt: str, skip_budget: float = 0.0, **options) -> Iterator[GenerationChunk]:
        """Stream a raw completion of ``prompt``; options as generate(), checked before the iterator is returned."""
        return self._run(self._prepare(self.tokenize(prompt), (), skip_budget=skip_budget, **options))

    def generate(self, prompt: str, skip_budget: float = 0.0, *, max_tokens: int = 256, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, typical_p: float = 1.0,
                 repeat_penalty: float = 1.0, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                 seed: int | None = None, logit_bias: dict[int, float] | None = None, grammar=None,
                 logprobs: int | None = None, stop: str | Sequence[str] | None = None,
                 skip_strategy: str = "router", skip_layers: Sequence[int] | None = None) -> Generation:
        """Complete ``prompt``, skipping blocks during decode.

        Sampling runs on llama.cpp's sampler chain with llama-cpp-python's option names; the defaults
        are greedy with every other sampler off (llama.cpp's own chat defaults are temperature 0.8,
        top_k 40, top_p 0.95, min_p 0.05).

        Args:
            prompt: raw text (special tokens are parsed; BOS added when the model wants one).
            skip_budget: fraction of blocks that may be skipped while decoding, in [0, 1);
                k = floor(skip_budget * n_layer) blocks are skipped.
            max_tokens: most tokens to generate (>= 1).
            temperature: in [0, inf); 0 is greedy (the argmax of the logits).
            top_k: keep the k most likely tokens; 0: off.
            top_p: nucleus threshold in (0, 1]; 1: off.
            min_p: drop tokens below min_p x the top token's probability, in [0, 1]; 0: off.
            typical_p: locally typical sampling, in (0, 1]; 1: off.
            repeat_penalty: in (0, inf); 1: off. presence_penalty, frequency_penalty: in [-2, 2]; 0: off.
                The penalties look at the last 64 generated tokens.
            seed: in [0, 4294967294]: the same seed gives the same tokens whatever ran before (its prompt is
                evaluated whole, without reusing a cached prefix); None draws one from the Model's seeded
                generator; -1 (llama.cpp's and llama-cpp-python's "random") draws one from the OS. The seed
                used is reported in Generation.seed.
            logit_bias: {token id: bias in [-100, 100]} added to the logits.
            grammar: a GBNF grammar (string with a ``root`` rule, or llama_cpp.LlamaGrammar) the text must
                follow.
            logprobs: in [0, 20]: Generation.logprobs gets each token's log-probability and the top
                ``logprobs`` alternatives (from the model's raw logits); None: off.
            stop: string(s) that end the generation (not included in the text).
            skip_strategy: "router" (lowest aggregated router keep-score first), "static" (the
                GGUF's default static ranking), the name of a stored static ranking, "last" (the
                last k blocks), "random" / "random:<seed>" (k blocks drawn with a seed), or "auto"
                (router when the GGUF has routers, else static; the choice is reported in
                Generation.skip_strategy).
            skip_layers: explicit block indices to skip; overrides skip_budget and skip_strategy.
        """
        return _last(self.stream_generate(
            prompt, skip_budget, max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            min_p=min_p, typical_p=typical_p, repeat_penalty=repeat_penalty, presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty, seed=seed, logit_bias=logit_bias, grammar=grammar,
            logprobs=logprobs, stop=stop, skip_strategy=skip_strategy, skip_layers=skip_layers))

    check_messages = staticmethod(check_messages)

    @property
    def has_chat_template(self) -> bool:
        return bool(self._llama is not None and self._llama.metadata.get("tokenizer.chat_template"))

    @_open
    def chat_prompt_tokens(self, messages: Sequence[dict]) -> tuple[list[int], list[str]]:
        """Tokens of ``messages`` rendered with the GGUF's chat template, plus its stop strings."""
        self.check_messages(messages)
        template = self._llama.metadata.get("tokenizer.chat_template")
        if not template:
            raise ValueError(f"{self.path} has no chat template (tokenizer.chat_template); use generate()")
        return chat_template_tokens(self._llama, template, messages)

    @_open
    def prompt_tokens_for(self, messages: Sequence[dict]) -> tuple[list[int], list[str]]:
        """Chat-template tokens of ``messages``, or (no template) their text as a raw prompt."""
        if self.has_chat_template:
            return self.chat_prompt_tokens(messages)
        self.check_messages(messages)
        return self.tokenize("\n".join(m["content"] for m in messages) + "\n"), []

    @_open
    def stream_chat(self, messages: Sequence[dict], skip_budget: float = 0.0, **options
                    ) -> Iterator[GenerationChunk]:
        """Stream a chat reply; options as generate(), checked before the iterator is returned. A GGUF without
        a chat template gets the messages' text as a raw prompt (prompt_tokens_for), as the terminal chat and
        the server count it."""
        tokens, template_stops = self.prompt_tokens_for(messages)
        return self._run(self._prepare(tokens, template_stops, skip_budget=skip_budget, **options))

    def chat(self, messages: Sequence[dict], skip_budget: float = 0.0, **options) -> Generation:
        """Reply to ``messages`` (OpenAI-style dicts) with the GGUF's chat template (without one: their
        contents, one per line, as a raw prompt).

        Same options as generate() (the chat template's stop strings are added to ``stop``). Earlier
        turns stay in the KV cache when they were evaluated at full depth; turns generated with
        skipping are re-evaluated at full depth, so a continued conversation is exact.
        """
        return _last(self.stream_chat(messages, skip_budget, **options))

    # -------------------------------------------------------------- scoring
    @_open
    def score_details(self, prompt: str, continuation: str, skip_budget: float = 0.0, *,
                      skip_strategy: str = "router", skip_layers: Sequence[int] | None = None) -> ScoreResult:
        """Teacher-forced log-probabilities of ``continuation`` after ``prompt``; see score()."""
        if not isinstance(continuation, str):
            raise TypeError(f"continuation must be a str; got {type(continuation).__name__}")
        return self.score_tokens(self.tokenize(prompt), self.tokenize(continuation, add_bos=False), skip_budget,
                                 skip_strategy=skip_strategy, skip_layers=skip_layers)

    @_open
    def score_tokens(self, prompt_tokens: Sequence[int], continuation_tokens: Sequence[int],
                     skip_budget: float = 0.0, *, skip_strategy: str = "router",
                     skip_layers: Sequence[int] | None = None, logprob_rows: bool = False) -> ScoreResult:
        """score() on token ids; ``logprob_rows`` also returns every position's whole log-softmax."""
        req = self.check_skip(skip_budget, skip_strategy, skip_layers)
        p_tokens, c_tokens = self._check_tokens(prompt_tokens, "prompt"), self._check_tokens(continuation_tokens,
                                                                                               "continuation")
        if len(p_tokens) + len(c_tokens) > self.n_ctx:
            raise ValueError(f"prompt + continuation have {len(p_tokens) + len(c_tokens)} tokens; n_ctx is {self.n_ctx}")
        with self.decoding(p_tokens, req) as d:
            first = _log_softmax(d.logits)
            rows = self._eval(c_tokens[:-1], masked=bool(d.skipped_layers), logits="all")
        ls = first[None] if rows is None else np.concatenate([first[None], _log_softmax(rows)])
        lp = [float(ls[i, t]) for i, t in enumerate(c_tokens)]
        return ScoreResult(lp, c_tokens, list(d.skipped_layers),
                           None if d.router_scores is None else [float(s) for s in d.router_scores],
                           ls.astype(np.float32) if logprob_rows else None)

    def _check_tokens(self, tokens, what: str, allow_empty: bool = False) -> list[int]:
        if isinstance(tokens, (str, bytes)) or not isinstance(tokens, (Sequence, np.ndarray)):
            raise TypeError(f"{what} tokens must be a list of token ids; got {type(tokens).__name__}")
        out = []
        for t in tokens:
            if isinstance(t, bool) or not isinstance(t, numbers.Integral) or not 0 <= t < self.n_vocab:
                raise ValueError(f"{what} token {t!r} is not a token id in [0, {self.n_vocab})")
            out.append(int(t))
        if not out and not allow_empty:
            raise ValueError(f"the {what} is empty after tokenization")
        return out

    @_open
    def score(self, prompt: str, continuation: str, skip_budget: float = 0.0, *,
              skip_strategy: str = "router", skip_layers: Sequence[int] | None = None) -> list[float]:
        """Per-token log-probabilities of ``continuation`` given ``prompt``.

        The prompt runs at full depth (routers scored on it); continuation
        tokens are evaluated exactly as decoded tokens are, with the chosen
        blocks skipped. The first continuation token is predicted from the
        full-depth prompt, as the first generated token is.
        """
        return self.score_details(prompt, continuation, skip_budget, skip_strategy=skip_strategy,
                                  skip_layers=skip_layers).logprobs

    # ------------------------------------------------------ introspection
    @_open
    def layer_inputs(self, prompt: str, layers: Sequence[int]) -> tuple[list[int], dict[int, np.ndarray]]:
        """Block-input hidden states [n_tokens, n_embd] of a full-depth pass over ``prompt`` (analysis, tests)."""
        tokens = self.tokenize(prompt)
        return tokens, self.layer_inputs_tokens(tokens, layers)

    @_open
    def layer_inputs_tokens(self, tokens: Sequence[int], layers: Sequence[int]) -> dict[int, np.ndarray]:
        """layer_inputs() on token ids: {block: F32 [n_tokens, n_embd]}; at most n_batch (512) tokens, which
        the runtime evaluates in one llama_decode."""
        return introspect.layer_inputs_tokens(self, tokens, layers)

    @_open
    def continuation_layer_inputs(self, prompt_tokens: Sequence[int], continuation_tokens: Sequence[int],
                                  layers: Sequence[int], skip_sets: Sequence[Sequence[int]]
                                  ) -> list[dict[int, np.ndarray]]:
        """Block inputs of the continuation tokens as decoding sees them, once per skip set: the prompt at
        full depth (evaluated once), then the continuation teacher-forced with the set's blocks skipped
        (bypasses on, as decoding has them; an empty set: full depth). Returns, per set,
        {block: F32 [len(continuation), n_embd]}; the continuation is at most n_batch (512) tokens."""
        return introspect.continuation_layer_inputs(self, prompt_tokens, continuation_tokens, layers, skip_sets)

    @_open
    def cached_router_scores(self) -> np.ndarray:
        """Per-token router keep-scores [n_cached, n_layer] of the clean cached tokens."""
        return self._cached_scores.copy()
