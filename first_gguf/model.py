"""The runtime: prompt-decided layer skipping on the patched llama.cpp.

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
"""
from __future__ import annotations

import codecs
import ctypes
import math
import numbers
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from . import _lib
from ._lib import llama_cpp
from .gguf_info import GGUFInfo, read_info

SEQ = 0  # Model drives a single sequence


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

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["router_scores"] is not None:
            d["router_scores"] = [None if math.isnan(s) else s for s in d["router_scores"]]
        return d


@dataclass
class GenerationChunk:
    """One step of Model.stream_generate / Model.stream_chat.

    ``text`` is the new text (possibly empty while a multi-byte character or a
    possible stop string is held back); the last chunk carries ``generation``.
    """

    text: str
    token: int | None
    generation: Generation | None = None


@dataclass
class ScoreResult:
    logprobs: list[float]
    tokens: list[int]
    skipped_layers: list[int]
    router_scores: list[float] | None = field(default=None)


class _LogCapture:
    """Keeps llama.cpp's recent error lines so a load failure can say what went wrong."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.verbose = False
        self._in_error = False
        self.listener = None  # callable(level, text), e.g. a progress bar

        @llama_cpp.llama_log_callback
        def _cb(level, text, user_data):  # pragma: no cover - called from C
            msg = text.decode("utf-8", errors="replace")
            if level == 4 or (level == 5 and self._in_error):  # GGML_LOG_LEVEL_ERROR, or its continuation
                self._in_error = True
                if msg.strip():
                    self.lines.append(msg.strip())
                    del self.lines[:-20]
            elif level != 5:
                self._in_error = False
            if self.listener is not None:
                self.listener(level, msg)
            if self.verbose:
                import sys

                print(msg, end="", file=sys.stderr, flush=True)

        self._cb = _cb
        llama_cpp.llama_log_set(self._cb, ctypes.c_void_p(0))

    def detail(self, default: str) -> str:
        """The captured error lines as one message (``default`` when llama.cpp logged none)."""
        return "; ".join(line for line in self.lines if line) or default


_LOG = _LogCapture()


def _check_number(name: str, value, lo: float, hi: float, *, hi_open: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number; got {value!r} ({type(value).__name__})")
    v = float(value)
    if math.isnan(v) or v < lo or (v >= hi if hi_open else v > hi):
        rng = f"[{lo:g}, {hi:g})" if hi_open else f"[{lo:g}, {hi:g}]"
        raise ValueError(f"{name} must be in {rng}; got {value!r}")
    return v


def _check_int(name: str, value, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer; got {value!r} ({type(value).__name__})")
    if value < lo:
        raise ValueError(f"{name} must be >= {lo}; got {value}")
    return int(value)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


class Model:
    """A GGUF model on the patched llama.cpp, with prompt-decided layer skipping.

    Args:
        path: GGUF file.
        n_ctx: context length in tokens.
        n_threads: CPU threads for prefill and decode (default: llama-cpp-python's, half the cores).
        seed: seed of the sampler (temperature > 0).
        verbose: print llama.cpp's log to stderr.
        decode_lora: a llama.cpp LoRA adapter GGUF (``first-gguf train --lora-rank`` writes one) attached
            only while blocks are skipped: to decoded / scored tokens after the full-depth prefill, never
            to the prompt, and not at all with skip_budget=0.
    """

    def __init__(self, path: str | os.PathLike, *, n_ctx: int = 4096, n_threads: int | None = None,
                 seed: int = 0, verbose: bool = False, decode_lora: str | os.PathLike | None = None) -> None:
        self.path = Path(path)
        self.n_ctx = _check_int("n_ctx", n_ctx, 16)
        if n_threads is not None:
            n_threads = _check_int("n_threads", n_threads, 1)
        self.seed = _check_int("seed", seed, 0)
        self.info: GGUFInfo = read_info(self.path)

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
        self._ctx = self._llama._ctx.ctx
        self._model = self._llama._model.model
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
        self.routing_enabled = True  # score routers on full-depth tokens (bench turns it off)
        self.decode_lora_path: Path | None = None
        self._lora = None  # llama_adapter_lora_p, freed with the model
        self._lora_on = False  # attached to the context right now
        self.use_decode_lora = True  # attach it while skipping (off: comparisons)
        if decode_lora is not None:
            self._load_decode_lora(Path(decode_lora))

    def _load_decode_lora(self, path: Path) -> None:
        if not path.is_file():
            raise ValueError(f"decode LoRA adapter not found: {path}; expected a llama.cpp LoRA GGUF file")
        if not self.supports_skip:
            raise ValueError(f"{self.path}: the runtime cannot skip blocks of this model, so a decode-only LoRA "
                             f"({path}) would never be used")
        _LOG.lines.clear()
        adapter = llama_cpp.llama_adapter_lora_init(self._model, str(path).encode("utf-8"))
        if not adapter:
            raise ValueError(f"failed to load LoRA adapter {path} for {self.path}: "
                             f"{_LOG.detail('llama_adapter_lora_init failed')}")
        self._lora, self.decode_lora_path = adapter, path

    def _attach_lora(self, on: bool) -> None:
        on = on and self._lora is not None and self.use_decode_lora
        if on == self._lora_on:
            return
        if on:
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self._lora)
            scales = (ctypes.c_float * 1)(1.0)
            rc = llama_cpp.llama_set_adapters_lora(self._ctx, adapters, 1, scales)
        else:
            rc = llama_cpp.llama_set_adapters_lora(self._ctx, None, 0, None)
        if rc != 0:
            raise RuntimeError(f"llama_set_adapters_lora failed with code {rc}")
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
    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str; got {type(text).__name__}")
        return self._llama.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self._llama.detokenize(list(tokens)).decode("utf-8", errors="replace")

    @property
    def static_rankings(self) -> dict[str, list[int]]:
        return dict(self.info.static_rankings)

    # ---------------------------------------------------------- KV handling
    @property
    def bypass(self) -> bool:
        """Whether skipped blocks run their bypass adapters (default True; no effect without bypass tensors)."""
        return bool(self.supports_skip and _lib.first_get_bypass(self._ctx))

    @bypass.setter
    def bypass(self, enable: bool) -> None:
        if not isinstance(enable, bool):
            raise TypeError(f"bypass must be a bool; got {type(enable).__name__}")
        if self.supports_skip:
            _lib.check(_lib.first_set_bypass(self._ctx, enable), "first_set_bypass")

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

    def _eval(self, tokens: Sequence[int], *, masked: bool, logits: str) -> np.ndarray | None:
        """Evaluate tokens after the cache. logits: 'none', 'last' or 'all' rows."""
        if not tokens:
            return None
        if not masked:
            self._drop_dirty()
        start = len(self._cached) + len(self._dirty)
        if start + len(tokens) > self.n_ctx:
            raise ValueError(f"context overflow: {start + len(tokens)} tokens needed, n_ctx is {self.n_ctx}")
        routing = not masked and self.n_routers > 0 and self.routing_enabled
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

    def _prefill(self, tokens: list[int]) -> tuple[np.ndarray, int, float]:
        """Full-depth prompt evaluation reusing the longest clean cached prefix."""
        if not tokens:
            raise ValueError("the prompt is empty after tokenization")
        if len(tokens) >= self.n_ctx:
            raise ValueError(f"prompt has {len(tokens)} tokens; n_ctx is {self.n_ctx}")
        self._drop_dirty()
        self._set_mask(())
        n = 0
        for a, b in zip(self._cached, tokens[:-1]):  # keep >= 1 token to evaluate for the logits
            if a != b:
                break
            n += 1
        self._truncate(n)
        t0 = time.perf_counter()
        logits = self._eval(tokens[n:], masked=False, logits="last")
        dt = time.perf_counter() - t0
        return logits[-1], len(tokens) - n, dt

    # ----------------------------------------------------------- skip choice
    def prompt_router_scores(self, n_prompt: int) -> np.ndarray | None:
        """Aggregated keep-score per block over the first n_prompt cached tokens (NaN: no router)."""
        if self.n_routers == 0:
            return None
        s = self._cached_scores[:n_prompt]
        out = np.full(self.n_layer, np.nan, dtype=np.float64)
        valid = ~np.isnan(s)
        cnt = valid.sum(axis=0)
        tot = np.where(valid, s, 0.0).sum(axis=0, dtype=np.float64)
        np.divide(tot, cnt, out=out, where=cnt > 0)
        return out

    def _check_skip_args(self, skip_budget, skip_strategy, skip_layers) -> tuple[float, str, list[int] | None]:
        budget = _check_number("skip_budget", skip_budget, 0.0, 1.0, hi_open=True)
        if not isinstance(skip_strategy, str):
            raise TypeError(f"skip_strategy must be a str; got {type(skip_strategy).__name__}")
        strategies = ["router", "static", "auto", "last", "random", *self.info.static_rankings]
        seeded_random = skip_strategy.startswith("random:") and skip_strategy[7:].isdigit()
        if skip_strategy not in strategies and not seeded_random:
            raise ValueError(f"unknown skip_strategy {skip_strategy!r}; expected one of "
                             f"{strategies + ['random:<seed>']}")
        if skip_strategy == "auto":  # stated in Generation.skip_strategy, never silent
            skip_strategy = "router" if self.n_routers or not self.info.static_rankings else "static"
        layers = None
        if skip_layers is not None:
            if isinstance(skip_layers, (str, bytes)) or not isinstance(skip_layers, Sequence):
                raise TypeError(f"skip_layers must be a list of block indices; got {type(skip_layers).__name__}")
            layers = []
            for il in skip_layers:
                if isinstance(il, bool) or not isinstance(il, numbers.Integral):
                    raise TypeError(f"skip_layers must hold integers; got {il!r}")
                if not 0 <= il < self.n_layer:
                    raise ValueError(f"skip_layers index {il} out of range; the model has blocks 0..{self.n_layer - 1}")
                layers.append(int(il))
            layers = sorted(set(layers))
            if len(layers) == self.n_layer:
                raise ValueError(f"skip_layers would skip all {self.n_layer} blocks; keep at least one")
        wants_skip = (layers and len(layers) > 0) or budget > 0
        if wants_skip and not self.supports_skip:
            raise ValueError(f"{self.path}: architecture '{self.info.architecture}' is not covered by the "
                             f"layer-skip patch; only skip_budget=0 is possible")
        if layers is None and budget > 0:
            if skip_strategy == "router" and self.n_routers == 0:
                hint = " (try skip_strategy='static')" if self.info.static_rankings else ""
                raise ValueError(f"{self.path} has no router tensors (blk.N.router.weight); "
                                 f"skip_budget={budget:g} needs routers{hint}")
            if skip_strategy == "static" and not self.info.static_rankings:
                raise ValueError(f"{self.path} stores no static ranking (first.static_rankings); "
                                 f"skip_strategy='static' is not available")
        return budget, skip_strategy, layers

    def n_skip_for_budget(self, skip_budget: float) -> int:
        return int(math.floor(skip_budget * self.n_layer + 1e-9))

    def _choose_skip(self, budget: float, strategy: str, layers: list[int] | None,
                     scores: np.ndarray | None) -> list[int]:
        if layers is not None:
            return layers
        k = self.n_skip_for_budget(budget)
        if k == 0:
            return []
        if strategy == "router":
            cand = [il for il in range(self.n_layer) if not np.isnan(scores[il])]
            cand.sort(key=lambda il: (scores[il], il))
            return sorted(cand[:k])
        if strategy == "last":  # the last k blocks (a common naive baseline)
            return list(range(self.n_layer - k, self.n_layer))
        if strategy.startswith("random"):  # k blocks drawn with a fixed seed ("random:<seed>", default: model seed)
            seed = int(strategy[7:]) if strategy.startswith("random:") else self.seed
            return sorted(np.random.default_rng(seed).choice(self.n_layer, size=k, replace=False).tolist())
        name = self.info.default_static_ranking if strategy == "static" else strategy
        return sorted(self.info.static_rankings[name][:k])

    # ------------------------------------------------------------ sampling
    def _sample(self, logits: np.ndarray, temperature: float, top_p: float) -> int:
        if temperature == 0.0:
            return int(np.argmax(logits))
        x = logits.astype(np.float64) / temperature
        x -= x.max()
        p = np.exp(x)
        p /= p.sum()
        if top_p < 1.0:
            order = np.argsort(-p, kind="stable")
            cum = np.cumsum(p[order])
            keep = order[: int(np.searchsorted(cum, top_p) + 1)]
            q = np.zeros_like(p)
            q[keep] = p[keep]
            p = q / q.sum()
        return int(self._rng.choice(len(p), p=p))

    # ---------------------------------------------------------- generation
    def _check_gen_args(self, max_tokens, temperature, top_p, stop) -> tuple[int, float, float, list[str]]:
        max_tokens = _check_int("max_tokens", max_tokens, 1)
        temperature = _check_number("temperature", temperature, 0.0, math.inf, hi_open=True)
        top_p = _check_number("top_p", top_p, 0.0, 1.0, hi_open=False)
        if top_p == 0.0:
            raise ValueError("top_p must be in (0, 1]; got 0")
        if stop is None:
            stops = []
        elif isinstance(stop, str):
            stops = [stop]
        elif isinstance(stop, Sequence) and all(isinstance(s, str) for s in stop):
            stops = list(stop)
        else:
            raise TypeError(f"stop must be a str or a list of str; got {stop!r}")
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        return max_tokens, temperature, top_p, stops

    def _stream(self, prompt_tokens: list[int], skip_budget, *, max_tokens, temperature, top_p, stop,
                skip_strategy, skip_layers) -> Iterator[GenerationChunk]:
        budget, strategy, layers = self._check_skip_args(skip_budget, skip_strategy, skip_layers)
        max_tokens, temperature, top_p, stops = self._check_gen_args(max_tokens, temperature, top_p, stop)

        logits, n_eval, t_prefill = self._prefill(prompt_tokens)
        n_prompt = len(prompt_tokens)
        scores = self.prompt_router_scores(n_prompt)
        skip = self._choose_skip(budget, strategy, layers, scores)
        self._set_mask(skip)
        lora_used = self._lora_on

        generated: list[int] = []
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        text = ""
        emitted = 0
        hold = max((len(s) for s in stops), default=1) - 1
        finish = "length"
        t_decode, n_decode = 0.0, 0
        try:
            while True:
                tok = self._sample(logits, temperature, top_p)
                if llama_cpp.llama_vocab_is_eog(self._vocab, tok):
                    finish = "stop"
                    break
                generated.append(tok)
                text += decoder.decode(self._llama.detokenize([tok], prev_tokens=prompt_tokens + generated[:-1]))
                cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
                if cut >= 0:
                    text = text[:cut]
                    finish = "stop"
                    decoder = None  # the text ends at the stop string
                    break
                safe = len(text) - hold if stops else len(text)
                if safe > emitted:
                    yield GenerationChunk(text[emitted:safe], tok)
                    emitted = safe
                else:
                    yield GenerationChunk("", tok)
                if len(generated) >= max_tokens or n_prompt + len(generated) >= self.n_ctx:
                    break
                t0 = time.perf_counter()
                logits = self._eval([tok], masked=bool(skip), logits="last")[-1]
                t_decode += time.perf_counter() - t0
                n_decode += 1
            if decoder is not None:
                text += decoder.decode(b"", final=True)  # bytes of an incomplete character, if any
        finally:
            self._set_mask(())
            self._drop_dirty()
        gen = Generation(
            text=text,
            tokens=generated,
            skipped_layers=list(skip),
            router_scores=None if scores is None else [float(s) for s in scores],
            n_prompt_tokens=n_prompt,
            prefill_tokens_per_s=n_eval / t_prefill if t_prefill > 0 else float("inf"),
            decode_tokens_per_s=n_decode / t_decode if t_decode > 0 else 0.0,
            finish_reason=finish,
            skip_strategy="explicit" if layers is not None else strategy,
            n_prefill_tokens=n_eval,
            bypassed_layers=[il for il in skip if self.bypass and il in self._bypass_blocks],
            decode_lora=lora_used,
        )
        yield GenerationChunk(text[emitted:], None, gen)

    def stream_generate(self, prompt: str, skip_budget: float = 0.0, *, max_tokens: int = 256,
                        temperature: float = 0.0, top_p: float = 1.0, stop: str | Sequence[str] | None = None,
                        skip_strategy: str = "router", skip_layers: Sequence[int] | None = None
                        ) -> Iterator[GenerationChunk]:
        """Stream a raw completion of ``prompt``; see generate()."""
        tokens = self.tokenize(prompt)
        return self._stream(tokens, skip_budget, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                            stop=stop, skip_strategy=skip_strategy, skip_layers=skip_layers)

    def generate(self, prompt: str, skip_budget: float = 0.0, *, max_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, stop: str | Sequence[str] | None = None, skip_strategy: str = "router",
                 skip_layers: Sequence[int] | None = None) -> Generation:
        """Complete ``prompt``, skipping blocks during decode.

        Args:
            prompt: raw text (special tokens are parsed; BOS added when the model wants one).
            skip_budget: fraction of blocks that may be skipped while decoding, in [0, 1);
                k = floor(skip_budget * n_layer) blocks are skipped.
            max_tokens: most tokens to generate.
            temperature: 0 is greedy; otherwise softmax sampling with the model's seed.
            top_p: nucleus sampling threshold in (0, 1].
            stop: string(s) that end the generation (not included in the text).
            skip_strategy: "router" (lowest aggregated router keep-score first), "static" (the
                GGUF's default static ranking), the name of a stored static ranking, "last" (the
                last k blocks), "random" / "random:<seed>" (k blocks drawn with a seed), or "auto"
                (router when the GGUF has routers, else static; the choice is reported in
                Generation.skip_strategy).
            skip_layers: explicit block indices to skip; overrides skip_budget and skip_strategy.
        """
        last = None
        for last in self.stream_generate(prompt, skip_budget, max_tokens=max_tokens, temperature=temperature,
                                         top_p=top_p, stop=stop, skip_strategy=skip_strategy,
                                         skip_layers=skip_layers):
            pass
        return last.generation

    @staticmethod
    def _check_messages(messages) -> None:
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
            raise TypeError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise TypeError(f"messages[{i}] must be a dict with str 'role' and 'content'; got {m!r}")

    def chat_prompt_tokens(self, messages: Sequence[dict]) -> tuple[list[int], list[str]]:
        """Tokens of ``messages`` rendered with the GGUF's chat template, plus its stop strings."""
        self._check_messages(messages)
        template = self._llama.metadata.get("tokenizer.chat_template")
        if not template:
            raise ValueError(f"{self.path} has no chat template (tokenizer.chat_template); use generate()")
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        eos = self._llama.detokenize([self._llama.token_eos()], special=True).decode("utf-8", errors="replace")
        bos = self._llama.detokenize([self._llama.token_bos()], special=True).decode("utf-8", errors="replace")
        fmt = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos,
                                  add_generation_prompt=True, stop_token_ids=[self._llama.token_eos()])
        res = fmt(messages=list(messages))
        tokens = self._llama.tokenize(res.prompt.encode("utf-8"), add_bos=not res.added_special, special=True)
        stops = res.stop if isinstance(res.stop, list) else ([res.stop] if res.stop else [])
        return tokens, [s for s in stops if s]

    def prompt_tokens_for(self, messages: Sequence[dict]) -> tuple[list[int], list[str]]:
        """Chat-template tokens of ``messages``, or (no template) their text as a raw prompt."""
        if self._llama.metadata.get("tokenizer.chat_template"):
            return self.chat_prompt_tokens(messages)
        self._check_messages(messages)
        return self.tokenize("\n".join(m["content"] for m in messages) + "\n"), []

    def stream_chat(self, messages: Sequence[dict], skip_budget: float = 0.0, *, max_tokens: int = 256,
                    temperature: float = 0.0, top_p: float = 1.0, stop: str | Sequence[str] | None = None,
                    skip_strategy: str = "router", skip_layers: Sequence[int] | None = None
                    ) -> Iterator[GenerationChunk]:
        """Stream a chat reply; see chat()."""
        tokens, template_stops = self.chat_prompt_tokens(messages)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        return self._stream(tokens, skip_budget, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                            stop=stops + [s for s in template_stops if s not in stops] or None,
                            skip_strategy=skip_strategy, skip_layers=skip_layers)

    def chat(self, messages: Sequence[dict], skip_budget: float = 0.0, *, max_tokens: int = 256,
             temperature: float = 0.0, top_p: float = 1.0, stop: str | Sequence[str] | None = None,
             skip_strategy: str = "router", skip_layers: Sequence[int] | None = None) -> Generation:
        """Reply to ``messages`` (OpenAI-style dicts) with the GGUF's chat template.

        Same options as generate(). Earlier turns stay in the KV cache when they
        were evaluated at full depth; turns generated with skipping are
        re-evaluated at full depth, so a continued conversation is exact.
        """
        last = None
        for last in self.stream_chat(messages, skip_budget, max_tokens=max_tokens, temperature=temperature,
                                     top_p=top_p, stop=stop, skip_strategy=skip_strategy, skip_layers=skip_layers):
            pass
        return last.generation

    # -------------------------------------------------------------- scoring
    def score_details(self, prompt: str, continuation: str, skip_budget: float = 0.0, *,
                      skip_strategy: str = "router", skip_layers: Sequence[int] | None = None) -> ScoreResult:
        """Teacher-forced log-probabilities of ``continuation`` after ``prompt``; see score()."""
        if not isinstance(continuation, str):
            raise TypeError(f"continuation must be a str; got {type(continuation).__name__}")
        return self.score_tokens(self.tokenize(prompt), self.tokenize(continuation, add_bos=False), skip_budget,
                                 skip_strategy=skip_strategy, skip_layers=skip_layers)

    def score_tokens(self, prompt_tokens: Sequence[int], continuation_tokens: Sequence[int],
                     skip_budget: float = 0.0, *, skip_strategy: str = "router",
                     skip_layers: Sequence[int] | None = None) -> ScoreResult:
        """score() on token ids."""
        budget, strategy, layers = self._check_skip_args(skip_budget, skip_strategy, skip_layers)
        p_tokens, c_tokens = self._check_tokens(prompt_tokens, "prompt"), self._check_tokens(continuation_tokens,
                                                                                               "continuation")
        if len(p_tokens) + len(c_tokens) > self.n_ctx:
            raise ValueError(f"prompt + continuation have {len(p_tokens) + len(c_tokens)} tokens; n_ctx is {self.n_ctx}")
        last, _, _ = self._prefill(p_tokens)
        scores = self.prompt_router_scores(len(p_tokens))
        skip = self._choose_skip(budget, strategy, layers, scores)
        lp = [float(_log_softmax(last)[c_tokens[0]])]
        self._set_mask(skip)
        try:
            rows = self._eval(c_tokens[:-1], masked=bool(skip), logits="all")
        finally:
            self._set_mask(())
            self._drop_dirty()
        if rows is not None:
            ls = _log_softmax(rows)
            lp.extend(float(ls[i, c_tokens[i + 1]]) for i in range(len(c_tokens) - 1))
        return ScoreResult(lp, c_tokens, list(skip), None if scores is None else [float(s) for s in scores])

    def _check_tokens(self, tokens, what: str) -> list[int]:
        if isinstance(tokens, (str, bytes)) or not isinstance(tokens, Sequence):
            raise TypeError(f"{what} tokens must be a list of token ids; got {type(tokens).__name__}")
        out = []
        for t in tokens:
            if isinstance(t, bool) or not isinstance(t, numbers.Integral) or not 0 <= t < self.n_vocab:
                raise ValueError(f"{what} token {t!r} is not a token id in [0, {self.n_vocab})")
            out.append(int(t))
        if not out:
            raise ValueError(f"the {what} is empty after tokenization")
        return out

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
    def layer_inputs(self, prompt: str, layers: Sequence[int]) -> tuple[list[int], dict[int, np.ndarray]]:
        """Block-input hidden states [n_tokens, n_embd] of a full-depth pass over ``prompt`` (analysis, tests)."""
        tokens = self.tokenize(prompt)
        for il in layers:
            _lib.first_set_layer_inp_output(self._ctx, il, True)
        try:
            self.reset()
            self._eval(tokens, masked=False, logits="last")
            n_embd = self.info.n_embd
            out = {}
            for il in layers:
                ptr = _lib.first_get_layer_inp(self._ctx, il)
                out[il] = np.ctypeslib.as_array(ptr, shape=(len(tokens), n_embd)).copy()
        finally:
            for il in layers:
                _lib.first_set_layer_inp_output(self._ctx, il, False)
            self.reset()
        return tokens, out

    def cached_router_scores(self) -> np.ndarray:
        """Per-token router keep-scores [n_cached, n_layer] of the clean cached tokens."""
        return self._cached_scores.copy()
