"""first_gguf.Llama: llama-cpp-python's ``Llama`` with prompt-decided layer skipping, a drop-in.

    from first_gguf import Llama          # was: from llama_cpp import Llama
    llm = Llama("qwen2.5-coder-1.5b", n_ctx=4096)        # a known name, or model_path=..., routers=...
    out = llm.create_chat_completion(messages, skip_budget=0.3)
    out["choices"][0]["message"]["content"], out["first_gguf"]["skipped_layers"]

A real subclass of ``llama_cpp.Llama`` (the patched 0.3.36 package first-gguf installs): tokenize, chat
formats and handlers, response_format / grammar, logprobs, stop strings, embeddings, the cache and n_ctx=0
are llama-cpp-python's own code. first-gguf hooks only the evaluation (``eval`` / ``generate``):

* the prompt is evaluated at full depth with the routers scoring every prompt token;
* the blocks to skip are chosen once per request, right after the prompt, from ``skip_budget`` /
  ``skip_strategy`` by the same code as first_gguf.Model (model.check_skip_request / choose_skip);
* every generated token is evaluated with those blocks skipped (their bypass adapters run when the model
  or its sidecar carries them);
* tokens evaluated with skipped blocks hold stale K/V in those blocks (cpp/first.h), so they are never
  reused as a full-depth prefix: before the next request (or a full-depth ``eval`` after them, or a
  ``save_state``) they are dropped from llama-cpp-python's token prefix, and re-evaluated at full depth
  when a later prompt starts with them (a continued chat is exact).

With ``skip_budget=0`` (the default) nothing is skipped and nothing is dropped: the output is stock
llama-cpp-python's, token for token (tests/test_llama_dropin.py checks it against an unpatched build).
"""
from __future__ import annotations

import ctypes
import inspect
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from . import _lib
from ._lib import llama_cpp
from .gguf_info import GGUFInfo, read_info, read_with_sidecar
from .loading import _LOG, attach_sidecar
from .skip import SkipRequest, aggregate_router_scores, check_skip_request, choose_skip, n_skip_for_budget

import llama_cpp.llama as _stock  # noqa: E402  (after _lib, which loads the patched library)

REPORT_KEY = "first_gguf"  # the response key (and every stream chunk's) that reports the skipped blocks
SEQ = 0  # llama-cpp-python evaluates sequence 0 (LlamaBatch.set_batch)
_GENERATE_SIG = inspect.signature(_stock.Llama.generate)


class _Request:
    """One request's skip state: the checked options, then (after the prompt) the chosen blocks."""

    def __init__(self, skip: SkipRequest) -> None:
        self.skip = skip
        self.skipped: list[int] | None = None  # None until the prompt has been evaluated
        self.n_requested = 0
        self.bypassed: list[int] = []
        self.router_scores: np.ndarray | None = None

    @property
    def chosen(self) -> bool:
        return self.skipped is not None

    def report(self) -> dict:
        return {"skipped_layers": list(self.skipped or []), "skip_budget": self.skip.budget,
                "skip_strategy": self.skip.strategy, "n_skip_requested": self.n_requested,
                "bypassed_layers": list(self.bypassed)}


_DEFAULT = object()


class Llama(_stock.Llama):
    """llama-cpp-python's ``Llama`` on first-gguf's patched runtime, with layer skipping per request.

    Args:
        model_path: a GGUF file, as in llama-cpp-python; or the name of a model first-gguf fetches
            ("smollm2-135m-instruct", "gemma3-270m", "qwen2.5-coder-1.5b", see first_gguf.models)
            when no file of that name exists: it is downloaded and verified once, and gets its shipped
            sidecar (routers, bypass adapters, static rankings) unless ``routers`` is given.
        routers: a first-gguf sidecar GGUF (``first-gguf attach --sidecar`` writes one) attached at load
            time; ``model_path`` stays the untouched base GGUF. A missing file, or a sidecar made for
            another model, is a ValueError naming the file(s).
        **kwargs: llama-cpp-python's ``Llama`` options, unchanged (n_ctx, n_threads, seed, chat_format,
            logits_all, verbose, ...).

    ``create_completion``, ``create_chat_completion`` and ``__call__`` take two more keyword options:

        skip_budget: fraction of the blocks skipped while generating, in [0, 1): floor(skip_budget * n_layer)
            blocks. 0 (the default) is stock llama-cpp-python.
        skip_strategy: how the blocks are chosen: "router" (the default: lowest aggregated router keep-score
            over the prompt), "static" (the model's default static ranking) or a stored ranking's name,
            "last", "random" / "random:<seed>", "auto" (router when the model has routers, else static).

    Responses (and every stream chunk) carry ``"first_gguf": {"skipped_layers", "skip_budget",
    "skip_strategy", "n_skip_requested", "bypassed_layers"}``; ``last_skip_report`` holds the latest one.
    ``generate()`` takes the same two options (keyword only) for token-level use.
    """

    def __init__(self, model_path: str | os.PathLike, *, routers: str | os.PathLike | None = None,
                 **kwargs: Any) -> None:
        if not isinstance(model_path, (str, os.PathLike)):
            raise TypeError(f"model_path must be a path to a GGUF file or a known model name; "
                            f"got {type(model_path).__name__}")
        if routers is not None and not isinstance(routers, (str, os.PathLike)):
            raise TypeError(f"routers must be a path to a first-gguf sidecar GGUF or None; "
                            f"got {type(routers).__name__}")
        from .models import resolve

        model_path, routers = resolve(os.fspath(model_path), routers)
        model_path = os.fspath(model_path)
        if routers is not None and not Path(routers).is_file():
            raise ValueError(f"router sidecar not found: {routers}; expected a first-gguf sidecar GGUF "
                             f"(first-gguf attach --sidecar writes one)")
        info: GGUFInfo | None = None
        if os.path.isfile(model_path):  # else llama-cpp-python says "Model path does not exist"
            # checked before loading: a sidecar for another model fails in a second, naming both files
            info = read_info(model_path) if routers is None else read_with_sidecar(model_path, routers)
            if info.sidecar:
                raise ValueError(f"{model_path}: is a first-gguf sidecar, not a model; load its base GGUF "
                                 f"with routers={model_path}")
        _LOG.verbose = bool(kwargs.get("verbose", True))  # first_gguf owns llama.cpp's log callback
        super().__init__(model_path, **kwargs)
        assert info is not None
        self.routers_path: Path | None = None if routers is None else Path(routers)
        self.first_info = info
        try:
            if routers is not None:
                attach_sidecar(self, routers, model_path, self.verbose)
                if self._lora_adapter is not None:  # the fresh context needs llama-cpp-python's LoRA again
                    adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self._lora_adapter)
                    scales = (ctypes.c_float * 1)(self.lora_scale)
                    if llama_cpp.llama_set_adapters_lora(self._ctx.ctx, adapters, 1, scales):
                        raise RuntimeError(f"Failed to set LoRA adapter from lora path: {self.lora_path}")
        except BaseException:
            self.close()
            raise
        m = self._model.model
        self.n_layer = int(llama_cpp.llama_model_n_layer(m))
        self.supports_skip = bool(_lib.first_model_supports_skip(m))
        self.n_routers = int(_lib.first_model_n_routers(m))
        self.n_bypasses = int(_lib.first_model_n_bypasses(m))
        self._first_seed = int(self._seed)  # the "random" strategy's seed (set_seed changes _seed per request)
        self._first_warned: set = set()
        # input_ids[:_first_n_clean] were evaluated at full depth; their router scores are valid up to
        # _first_n_scored (<= _first_n_clean). Tokens past _first_n_clean (up to n_tokens) are the dirty tail.
        self._first_n_clean = 0
        self._first_n_scored = 0
        self._first_scores = (np.full((len(self.input_ids), self.n_layer), np.nan, dtype=np.float32)
                              if self.n_routers else None)
        self._first_state: _Request | None = None    # the request generate() is running
        self._first_next: _Request | None = None     # handed from a completion to the generate() it calls
        self._first_pending: _Request | None = None  # handed from create_completion / chat to _create_completion
        self._first_collect: list | None = None      # the requests a chat completion made
        self._first_mask: tuple = ()  # the blocks the context skips now
        self.last_skip_report: dict | None = None

    def close(self) -> None:
        if hasattr(self, "_stack"):  # an __init__ that failed before llama-cpp-python's has nothing to free
            super().close()

    def __getstate__(self):
        state = super().__getstate__()
        state["routers"] = None if self.routers_path is None else str(self.routers_path)
        return state

    # ------------------------------------------------------------ skip options
    @property
    def static_rankings(self) -> dict[str, list[int]]:
        return dict(self.first_info.static_rankings)

    def check_skip(self, skip_budget: float = 0.0, skip_strategy: str = "router") -> SkipRequest:
        """The checked skip options (``"auto"`` resolved); TypeError/ValueError naming the value otherwise."""
        return check_skip_request(self.model_path, self.first_info, self.n_layer, self.supports_skip,
                                  self.n_routers, skip_budget, skip_strategy)

    def n_skip_for_budget(self, skip_budget: float) -> int:
        return n_skip_for_budget(skip_budget, self.n_layer)

    def _first_request(self, skip_budget, skip_strategy) -> _Request:
        if skip_budget is None and skip_strategy is None:
            if self._first_pending is not None:  # called by create_chat_completion's handler
                return _Request(self._first_pending.skip)
            return _Request(SkipRequest(0.0, "router", None))
        return _Request(self.check_skip(0.0 if skip_budget is None else skip_budget,
                                        "router" if skip_strategy is None else skip_strategy))

    # ------------------------------------------------------------ evaluation
    def _first_set_mask(self, skip) -> None:
        """Skip these blocks (none: clear the mask) for the tokens evaluated next."""
        skip = tuple(skip)
        if skip == self._first_mask:
            return
        if not skip:
            _lib.check(_lib.first_set_skip_mask(self._ctx.ctx, SEQ, None, 0), "first_set_skip_mask")
        else:
            mask = (ctypes.c_uint8 * self.n_layer)()
            for il in skip:
                mask[il] = 1
            _lib.check(_lib.first_set_skip_mask(self._ctx.ctx, SEQ, mask, self.n_layer), "first_set_skip_mask")
        self._first_mask = skip

    def _first_clamp(self) -> None:
        self._first_n_clean = min(self._first_n_clean, self.n_tokens)
        self._first_n_scored = min(self._first_n_scored, self._first_n_clean)

    def _first_drop_dirty(self) -> None:
        """Forget the tokens evaluated with skipped blocks, so llama-cpp-python's prefix matching (and a
        saved state) sees only the full-depth prefix; a later prompt that starts with them re-evaluates them."""
        self._first_clamp()
        if self.n_tokens > self._first_n_clean:
            self._ctx.kv_cache_seq_rm(-1, self._first_n_clean, -1)
            self.n_tokens = self._first_n_clean
            self._requires_eval = True

    def eval(self, tokens) -> None:
        """llama-cpp-python's eval, at full depth (routers scoring the tokens) unless a request is decoding
        with skipped blocks; a dirty tail before ``tokens`` is re-evaluated at full depth first."""
        tokens = list(tokens)
        self._first_clamp()
        st = self._first_state
        if st is not None and st.chosen and st.skipped:
            self._first_set_mask(st.skipped)
            super().eval(tokens)  # dirty: _first_n_clean stays
            return
        self._first_set_mask(())
        start = self._first_n_scored if self.n_routers else self._first_n_clean
        if start < self.n_tokens:
            tokens = self.input_ids[start:self.n_tokens].tolist() + tokens
            self.n_tokens = start
        self._first_full_eval(tokens)
        if st is not None and not st.chosen:
            self._first_choose(st)

    def _first_full_eval(self, tokens: list[int]) -> None:
        start = self.n_tokens
        routing = self.n_routers > 0 and bool(tokens)
        ctx = self._ctx.ctx
        if routing:
            _lib.check(_lib.first_set_routing(ctx, SEQ, True), "first_set_routing")
            _lib.first_clear_router_scores(ctx, SEQ)
        try:
            super().eval(tokens)
        except BaseException:
            self._first_n_clean = self.n_tokens  # the chunks evaluated are full depth, their scores unread
            self._first_n_scored = min(self._first_n_scored, start)
            raise
        finally:
            if routing:
                n = _lib.first_get_router_n_tokens(ctx, SEQ)
                buf = np.empty((max(n, 1), self.n_layer), dtype=np.float32)
                pos = np.empty(max(n, 1), dtype=np.int32)
                _lib.first_get_router_scores(ctx, SEQ, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                                             pos.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), n)
                _lib.first_set_routing(ctx, SEQ, False)
                _lib.first_clear_router_scores(ctx, SEQ)
        self._first_n_clean = self.n_tokens
        if routing:
            if n != len(tokens) or not np.array_equal(pos[:n], np.arange(start, start + len(tokens))):
                self._first_n_scored = min(self._first_n_scored, start)
                raise RuntimeError(f"router scores cover {n} tokens; expected {len(tokens)} at {start}..")
            self._first_scores[start:start + n] = buf[:n]
        self._first_n_scored = self.n_tokens

    def _first_choose(self, st: _Request) -> None:
        """The prompt is evaluated: choose the request's blocks and set the mask for what it generates."""
        scores = (aggregate_router_scores(self._first_scores[:self.n_tokens], self.n_layer)
                  if self.n_routers else None)
        skip, k = choose_skip(st.skip, scores, n_layer=self.n_layer, seed=self._first_seed, info=self.first_info,
                              warned=self._first_warned, report=f"the response's {REPORT_KEY}.n_skip_requested",
                              stacklevel=2)
        st.skipped, st.n_requested, st.router_scores = list(skip), k, scores
        bypass_on = bool(skip) and bool(_lib.first_get_bypass(self._ctx.ctx))
        blocks = set(self.first_info.bypass_blocks)
        st.bypassed = [il for il in skip if bypass_on and il in blocks]
        self._first_set_mask(skip)
        self.last_skip_report = st.report()

    def generate(self, tokens, *args, skip_budget: float | None = None, skip_strategy: str | None = None,
                 **kwargs) -> Iterator[int]:
        """llama-cpp-python's generate(); with ``skip_budget`` / ``skip_strategy`` (checked here) the prompt
        runs at full depth and the generated tokens with the chosen blocks skipped. With ``reset=False``
        ``tokens`` continue everything evaluated, as in llama-cpp-python: tokens evaluated with skipped blocks
        before them are evaluated again at full depth (not dropped)."""
        if skip_budget is not None or skip_strategy is not None:
            st = self._first_request(skip_budget, skip_strategy)
        else:
            st, self._first_next = self._first_next or _Request(SkipRequest(0.0, "router", None)), None
        reset = _GENERATE_SIG.bind(self, tokens, *args, **kwargs).arguments.get("reset", True)
        return self._first_generate(st, super().generate(tokens, *args, **kwargs), drop=bool(reset))

    def _first_generate(self, st: _Request, inner, drop: bool = True):
        """Runs ``inner`` with ``st`` as the request only while ``inner`` runs: between two tokens (a stream
        kept but not finished, eval()/sample()/embed() by the caller) nothing is skipped."""
        if drop:
            self._first_drop_dirty()  # before llama-cpp-python's prefix matching
        sent = None
        try:
            while True:
                prev, self._first_state = self._first_state, st
                try:
                    token = inner.send(sent)
                except StopIteration:
                    return
                finally:
                    self._first_state = prev
                    if prev is None:
                        self._first_set_mask(())
                sent = yield token
        finally:
            inner.close()

    def reset(self) -> None:
        """llama-cpp-python's reset(); outside a running request it also clears any skip state, so a
        following eval() runs the full model."""
        super().reset()
        if getattr(self, "_first_state", None) is None and getattr(self, "_first_mask", ()):
            self._first_set_mask(())

    def save_state(self) -> _stock.LlamaState:
        """llama-cpp-python's state, without a dirty tail (the K/V cells past ``n_tokens`` are never read:
        llama-cpp-python removes them before evaluating there), with the router scores of its tokens."""
        self._first_clamp()
        state = super().save_state()
        if state.n_tokens > self._first_n_clean:
            state.n_tokens = self._first_n_clean
            state.scores = state.scores[:self._first_n_clean]
        if self._first_scores is not None:
            state.first_router_scores = self._first_scores[:min(self._first_n_scored, state.n_tokens)].copy()
        return state

    def load_state(self, state: _stock.LlamaState) -> None:
        super().load_state(state)
        self._first_n_clean = self.n_tokens
        scores = getattr(state, "first_router_scores", None)
        if self._first_scores is None:
            self._first_n_scored = self.n_tokens
        elif scores is not None and scores.shape[1:] == (self.n_layer,):
            n = min(len(scores), self.n_tokens)
            self._first_scores[:n] = scores[:n]
            self._first_n_scored = n
        else:  # a state without scores: its tokens are re-evaluated (with routers) by the next prompt
            self._first_n_scored = 0

    # ------------------------------------------------------------ completions
    def _create_completion(self, *args, **kwargs):
        st = self._first_request(None, None)
        if self._first_collect is not None:
            self._first_collect.append(st)
        return self._first_completion(st, super()._create_completion(*args, **kwargs))

    def _first_completion(self, st: _Request, inner) -> Iterator[dict]:
        self._first_drop_dirty()  # before llama-cpp-python's cache lookup compares the prompt with it
        try:
            first = True
            while True:
                if first:
                    self._first_next = st  # taken by the generate() this completion calls
                try:
                    chunk = next(inner)
                except StopIteration:
                    return
                finally:
                    if first and self._first_next is st:
                        self._first_next = None
                    first = False
                if st.chosen:
                    chunk[REPORT_KEY] = st.report()
                yield chunk
        finally:
            inner.close()

    def create_completion(self, prompt, *args, skip_budget: float | None = None, skip_strategy: str | None = None,
                          **kwargs):
        """llama-cpp-python's create_completion, plus ``skip_budget`` and ``skip_strategy`` (see the class);
        the response and every stream chunk carry ``"first_gguf"``. The options are checked before a stream
        is returned."""
        req = self._first_request(skip_budget, skip_strategy)
        saved, self._first_pending = self._first_pending, req
        try:
            return super().create_completion(prompt, *args, **kwargs)
        finally:
            self._first_pending = saved

    def __call__(self, prompt, *args, skip_budget: float | None = None, skip_strategy: str | None = None, **kwargs):
        """create_completion(), as llama-cpp-python's ``__call__``."""
        return self.create_completion(prompt, *args, skip_budget=skip_budget, skip_strategy=skip_strategy, **kwargs)

    def create_chat_completion(self, messages, *args, skip_budget: float | None = None,
                               skip_strategy: str | None = None, **kwargs):
        """llama-cpp-python's create_chat_completion (chat format / handler, tools, response_format, ...), plus
        ``skip_budget`` and ``skip_strategy``; the response and every stream chunk carry ``"first_gguf"``."""
        req = self._first_request(skip_budget, skip_strategy)
        saved = self._first_pending, self._first_collect
        self._first_pending, self._first_collect = req, []
        try:
            res = super().create_chat_completion(messages, *args, **kwargs)
            made = self._first_collect
        finally:
            self._first_pending, self._first_collect = saved
        if isinstance(res, dict):
            if made and made[-1].chosen:
                res[REPORT_KEY] = made[-1].report()
            return res
        return self._first_chat_stream(res, made)

    @staticmethod
    def _first_chat_stream(chunks, made: list) -> Iterator[dict]:
        for chunk in chunks:
            if made and made[-1].chosen:
                chunk[REPORT_KEY] = made[-1].report()
            yield chunk
