"""The skip choice: which blocks a request skips, shared by Model and first_gguf.Llama (the llama-cpp-python
drop-in) so both runtimes parse strategies and pick blocks with the same code.

Holds SkipRequest (a checked request: budget, resolved strategy, explicit blocks), the strategy names
(STRATEGIES), check_skip_request (the one parser of skip_budget / skip_strategy / skip_layers),
n_skip_for_budget, choose_skip (the blocks a request skips, from the prompt's router scores, a static ranking,
the last blocks or a seeded draw) and aggregate_router_scores (the per-block score a router strategy ranks).
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import NamedTuple, Sequence

import numpy as np

from . import _lib
from .gguf_info import GGUFInfo

# the strategy names every model accepts; besides them "random:<seed>" and the names of the GGUF's static rankings
STRATEGIES = ("router", "static", "auto", "last", "random")


class SkipRequest(NamedTuple):
    """Checked skip options (Model.check_skip): the budget, the resolved strategy, explicit blocks or None."""

    budget: float
    strategy: str
    layers: list[int] | None


def _random_seed(strategy: str) -> int | None:
    """The seed of a "random:<seed>" strategy; None for any other name."""
    return int(strategy[7:]) if strategy.startswith("random:") and strategy[7:].isdigit() else None


def _check_number(name: str, value, lo: float, hi: float, *, hi_open: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number; got {value!r} ({type(value).__name__})")
    v = float(value)
    if math.isnan(v) or v < lo or (v >= hi if hi_open else v > hi):
        rng = f"[{lo:g}, {hi:g})" if hi_open else f"[{lo:g}, {hi:g}]"
        raise ValueError(f"{name} must be in {rng}; got {value!r}")
    return v


def check_skip_request(path, info: GGUFInfo, n_layer: int, supports_skip: bool, n_routers: int,
                       skip_budget: float = 0.0, skip_strategy: str = "router",
                       skip_layers: Sequence[int] | None = None) -> SkipRequest:
    """Model.check_skip for a model at ``path`` with ``info``, ``n_layer`` blocks, skip support and routers."""
    budget = _check_number("skip_budget", skip_budget, 0.0, 1.0, hi_open=True)
    if not isinstance(skip_strategy, str):
        raise TypeError(f"skip_strategy must be a str; got {type(skip_strategy).__name__}")
    strategies = [*STRATEGIES, *info.static_rankings]
    if skip_strategy not in strategies and _random_seed(skip_strategy) is None:
        raise ValueError(f"unknown skip_strategy {skip_strategy!r}; expected one of "
                         f"{strategies + ['random:<seed>']}")
    if skip_strategy == "auto":  # stated in Generation.skip_strategy, never silent
        skip_strategy = "router" if n_routers or not info.static_rankings else "static"
    layers = None
    if skip_layers is not None:
        if isinstance(skip_layers, (str, bytes)) or not isinstance(skip_layers, Sequence):
            raise TypeError(f"skip_layers must be a list of block indices; got {type(skip_layers).__name__}")
        layers = []
        for il in skip_layers:
            if isinstance(il, bool) or not isinstance(il, numbers.Integral):
                raise TypeError(f"skip_layers must hold integers; got {il!r}")
            if not 0 <= il < n_layer:
                raise ValueError(f"skip_layers index {il} out of range; the model has blocks 0..{n_layer - 1}")
            layers.append(int(il))
        repeated = sorted({il for il in layers if layers.count(il) > 1})
        if repeated:
            raise ValueError(f"skip_layers lists block{'s' if len(repeated) > 1 else ''} "
                             f"{', '.join(map(str, repeated))} more than once; got {layers}")
        layers = sorted(layers)
        if len(layers) == n_layer:
            raise ValueError(f"skip_layers would skip all {n_layer} blocks; keep at least one")
    wants_skip = (layers and len(layers) > 0) or budget > 0
    if wants_skip and not supports_skip:
        raise ValueError(f"{path}: {_lib.unsupported_architecture(info.architecture)}; only "
                         f"skip_budget=0 is possible")
    if layers is None and budget > 0:
        if skip_strategy == "router" and n_routers == 0:
            hint = " (try skip_strategy='static')" if info.static_rankings else " and the model has neither routers nor a static ranking (first.static_rankings) for 'auto'/'static': use skip_strategy='last' or 'random', or attach a router sidecar"
            raise ValueError(f"{path} has no router tensors (blk.N.router.weight); "
                             f"skip_budget={budget:g} needs routers{hint}")
        if skip_strategy == "static" and not info.static_rankings:
            raise ValueError(f"{path} stores no static ranking (first.static_rankings); "
                             f"skip_strategy='static' is not available")
    return SkipRequest(budget, skip_strategy, layers)


def n_skip_for_budget(skip_budget: float, n_layer: int) -> int:
    """Blocks a budget skips: floor(skip_budget * n_layer)."""
    return int(math.floor(skip_budget * n_layer + 1e-9))


def choose_skip(req: SkipRequest, scores: np.ndarray | None, *, n_layer: int, seed: int, info: GGUFInfo,
                warned: set, report: str = "Generation.n_skip_requested", stacklevel: int = 5
                ) -> tuple[list[int], int]:
    """(blocks to skip, blocks the budget asked for) for a checked request and the prompt's aggregated router
    scores (``seed``: the "random" strategy's); warns once per (strategy, k), kept in ``warned``, when the
    strategy has fewer candidates than the budget asks for (``report``: where the shortfall is reported)."""
    if req.layers is not None:
        return req.layers, len(req.layers)
    k = n_skip_for_budget(req.budget, n_layer)
    strategy = req.strategy
    if k == 0:
        return [], 0
    if strategy == "router":
        cand = [il for il in range(n_layer) if not np.isnan(scores[il])]
        cand.sort(key=lambda il: (scores[il], il))
        skip, why = sorted(cand[:k]), f"only {len(cand)} blocks have routers"
    elif strategy == "last":  # the last k blocks (a common naive baseline)
        skip, why = list(range(n_layer - k, n_layer)), ""
    elif strategy.startswith("random"):  # k blocks drawn with a fixed seed ("random:<seed>", default: model seed)
        seed = _random_seed(strategy) if strategy != "random" else seed
        skip, why = sorted(np.random.default_rng(seed).choice(n_layer, size=k, replace=False).tolist()), ""
    else:
        name = info.default_static_ranking if strategy == "static" else strategy
        ranking = info.static_rankings[name]
        skip, why = sorted(ranking[:k]), f"ranking {name!r} lists only {len(ranking)} blocks"
    if len(skip) < k and (strategy, k) not in warned:
        warned.add((strategy, k))
        warnings.warn(f"skip_budget {req.budget:g} asks for {k} skipped blocks but skip_strategy {strategy!r} "
                      f"can skip only {len(skip)} ({why}); skipping {len(skip)} (reported in "
                      f"{report})", UserWarning, stacklevel=stacklevel)
    return skip, k


def aggregate_router_scores(per_token: np.ndarray, n_layer: int) -> np.ndarray:
    """Aggregated keep-score per block: the mean over the tokens of ``per_token`` [n_tokens, n_layer], NaN
    ignored (NaN: no router)."""
    out = np.full(n_layer, np.nan, dtype=np.float64)
    valid = ~np.isnan(per_token)
    cnt = valid.sum(axis=0)
    tot = np.where(valid, per_token, 0.0).sum(axis=0, dtype=np.float64)
    np.divide(tot, cnt, out=out, where=cnt > 0)
    return out
