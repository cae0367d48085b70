"""Introspection for analysis and fitting: the hidden states entering chosen blocks (block inputs), read from
the patched runtime (first_set_layer_inp_output / first_get_layer_inp). Model.layer_inputs_tokens (one
full-depth pass) and Model.continuation_layer_inputs (a continuation as decoding sees it, per skip set)
delegate here; both capture through _capture_block_inputs."""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from . import _lib

if TYPE_CHECKING:
    from .model import Model


def _check_blocks(model: Model, layers: Sequence[int]) -> list[int]:
    layers = [int(il) for il in layers]
    bad = [il for il in layers if not 0 <= il < model.n_layer]
    if bad:
        raise ValueError(f"block indices {bad} out of range; the model has blocks 0..{model.n_layer - 1}")
    return layers


def _capture_block_inputs(model: Model, tokens: list[int], layers: list[int], *, masked: bool,
                          routing: bool) -> dict[int, np.ndarray]:
    """Evaluate ``tokens`` after the cache (in one llama_decode: at most n_batch tokens) with the inputs of
    ``layers`` kept; {block: F32 [len(tokens), n_embd]}. Keeping them is off again afterwards, raise or not."""
    for il in layers:
        _lib.first_set_layer_inp_output(model._ctx, il, True)
    try:
        model._eval(tokens, masked=masked, logits="last", routing=routing)
        n_embd = model.info.n_embd
        return {il: np.ctypeslib.as_array(_lib.first_get_layer_inp(model._ctx, il),
                                          shape=(len(tokens), n_embd)).copy() for il in layers}
    finally:
        for il in layers:
            _lib.first_set_layer_inp_output(model._ctx, il, False)


def layer_inputs_tokens(model: Model, tokens: Sequence[int], layers: Sequence[int]) -> dict[int, np.ndarray]:
    """Model.layer_inputs_tokens: one full-depth pass over ``tokens`` from an empty cache (emptied after)."""
    tokens = model._check_tokens(tokens, "input")
    if len(tokens) > model.n_batch:
        raise ValueError(f"layer_inputs_tokens takes at most {model.n_batch} tokens; got {len(tokens)}")
    layers = _check_blocks(model, layers)
    try:
        model.reset()
        return _capture_block_inputs(model, tokens, layers, masked=False, routing=True)
    finally:
        model.reset()


def continuation_layer_inputs(model: Model, prompt_tokens: Sequence[int], continuation_tokens: Sequence[int],
                              layers: Sequence[int], skip_sets: Sequence[Sequence[int]]
                              ) -> list[dict[int, np.ndarray]]:
    """Model.continuation_layer_inputs: the prompt at full depth once, then per skip set the continuation
    under that set's mask, dropped again before the next set; the cache is emptied after."""
    p_tokens = model._check_tokens(prompt_tokens, "prompt")
    c_tokens = model._check_tokens(continuation_tokens, "continuation")
    if len(c_tokens) > model.n_batch:
        raise ValueError(f"continuation_layer_inputs takes at most {model.n_batch} continuation tokens; "
                         f"got {len(c_tokens)}")
    if len(p_tokens) + len(c_tokens) > model.n_ctx:
        raise ValueError(f"prompt + continuation have {len(p_tokens) + len(c_tokens)} tokens; n_ctx is {model.n_ctx}")
    layers = _check_blocks(model, layers)
    sets = [model.check_skip(skip_layers=list(s)).layers if s else [] for s in skip_sets]
    out = []
    try:
        model.reset()
        model._set_mask(())
        model._eval(p_tokens, masked=False, logits="none", routing=False)
        for skip in sets:
            model._set_mask(skip)
            out.append(_capture_block_inputs(model, c_tokens, layers, masked=bool(skip), routing=False))
            model._truncate(len(p_tokens))
    finally:
        model._set_mask(())
        model.reset()
    return out
