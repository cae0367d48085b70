"""Static rankings: the one validator for a ranking, wherever it comes from.

A static ranking is a JSON object (a mapping) as ``first-gguf rank`` writes it::

    {"name": "greedy_nll", "ranking": [12, 5, ...], ...provenance}

``ranking`` lists distinct block indices (integers), cheapest to skip first; ``name`` is what the ranking is
stored under in a GGUF (``first.static_ranking.<name>``): letters, digits, '_' or '-', and not ``router`` or
``static`` (the names of the built-in strategies). The other keys are provenance, stored beside the ranking.

``check_ranking`` checks one ranking (a file's, one inside a router file, one given to ``attach()``);
``read_ranking_file`` reads and checks a ranking file. Both raise ``RankingError`` whose message starts with
the file or ranking it is about and names the field and what was expected.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

RESERVED_NAMES = ("router", "static")


class RankingError(ValueError):
    """A static ranking is unreadable or malformed; the message names the file (or ranking) and the field."""


def check_ranking_name(name: Any, where: str) -> str:
    """``name`` as a stored ranking name, or RankingError "<where>: 'name' ..."."""
    if not isinstance(name, str) or not name:
        raise RankingError(f"{where}: 'name' must be the non-empty name to store the ranking under; got {name!r}")
    if not all(c.isalnum() or c in "_-" for c in name) or name in RESERVED_NAMES:
        raise RankingError(f"{where}: 'name' {name!r} is not a valid ranking name; expected letters, digits, '_' "
                           f"or '-', not {' or '.join(repr(n) for n in RESERVED_NAMES)}")
    return name


def check_ranking(r: Any, where: str, *, n_layer: int | None = None, need_name: bool = False) -> list[int]:
    """Check one static ranking ``r`` (see the module docstring) and return its block order as plain ints.

    ``where`` starts every error message (e.g. ``"ranking rank.json"``, ``"static ranking 'greedy_nll'"``).
    ``n_layer``: the model's block count, when known: every index must lie in [0, n_layer). ``need_name``: the
    ranking must carry its own valid ``name`` (a ranking file to store; a mapping keyed by name need not).
    Raises RankingError naming the field and what was expected."""
    fields = "'name' and 'ranking'" if need_name else "'ranking'"
    if not isinstance(r, Mapping):
        kind = f"a JSON {type(r).__name__}" if isinstance(r, (list, str, int, float, bool, type(None))) \
            else type(r).__name__
        raise RankingError(f"{where}: expected a JSON object with {fields} (first-gguf rank's output); got {kind}")
    if need_name:
        if "name" not in r:
            raise RankingError(f"{where}: 'name' must be the non-empty name to store the ranking under; it is "
                               f"missing")
        check_ranking_name(r["name"], where)
    if "ranking" not in r:
        raise RankingError(f"{where}: 'ranking' must be a list of block indices (integers); it is missing")
    order = r["ranking"]
    if not isinstance(order, (list, tuple, np.ndarray)) or not all(
            isinstance(b, (int, np.integer)) and not isinstance(b, (bool, np.bool_)) for b in order):
        raise RankingError(f"{where}: 'ranking' must be a list of block indices (integers); got {order!r}")
    order = [int(b) for b in order]
    repeated = sorted({b for b in order if order.count(b) > 1})
    if repeated:
        raise RankingError(f"{where}: 'ranking' must hold distinct block indices; {repeated} appear more than once")
    if n_layer is not None:
        outside = [b for b in order if not 0 <= b < n_layer]
        if outside:
            raise RankingError(f"{where}: 'ranking' must hold block indices in [0, {n_layer}) (the model has "
                               f"{n_layer} blocks); got {outside}")
    return order


def read_ranking_file(path: str | os.PathLike, *, need_name: bool = True, n_layer: int | None = None) -> dict:
    """A static ranking file (first-gguf rank's output), checked by check_ranking; errors start with
    ``ranking <path>``. Returns the JSON object as read, its 'ranking' as plain ints."""
    where = f"ranking {path}"
    try:
        r = json.loads(Path(path).read_text())
    except OSError as e:
        raise RankingError(f"cannot read ranking {path}: {e.strerror or e}") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise RankingError(f"{where} is not valid JSON: {e}") from None
    order = check_ranking(r, where, n_layer=n_layer, need_name=need_name)
    return {**r, "ranking": order}


__all__ = ["RESERVED_NAMES", "RankingError", "check_ranking", "check_ranking_name", "read_ranking_file"]
