"""The one glue from a router file and static ranking files to what a GGUF or sidecar gets
(convert.attach.attach_data), its one merge rule for rankings, and the one ranking validator
(convert.ranking_file): errors name the file and the field."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from first_gguf.cli import main
from first_gguf.convert.attach import attach_data
from first_gguf.convert.ranking_file import RankingError, check_ranking, read_ranking_file
from first_gguf.convert.router_file import RouterFile, RouterFileError, load_router_file, save_router_file

N_LAYER, N_EMBD = 6, 8


def _router_file(path, rankings, n_layer=N_LAYER, n_embd=N_EMBD, fingerprint=None):
    rng = np.random.default_rng(0)
    rf = RouterFile(n_layer, n_embd, {b: rng.standard_normal(n_embd).astype(np.float32) for b in range(n_layer)},
                    {b: 0.1 * b for b in range(n_layer)}, fingerprint or {}, rankings, {"command": "test"})
    return save_router_file(path, rf)


def _ranking(path, name, order, **extra):
    path.write_text(json.dumps({"name": name, "ranking": order, **extra}))
    return path


# ---------------------------------------------------------------- the merge rule
def test_a_given_ranking_overrides_the_router_files_and_comes_first(tmp_path):
    rf = _router_file(tmp_path / "r.safetensors", {"block_influence": {"ranking": [5, 4, 3, 2, 1, 0], "method": "bi"},
                                                   "router_mean": {"ranking": [0, 1, 2, 3, 4, 5], "method": "rm"}})
    mine = _ranking(tmp_path / "mine.json", "router_mean", [2, 3, 1, 0, 4, 5], method="mine")
    extra = _ranking(tmp_path / "extra.json", "greedy_nll", [1, 0, 2, 3, 4, 5])
    data = attach_data(rf, [extra, mine])
    # the given rankings first, in the order given; then the router file's that no given one replaced
    assert list(data.rankings) == ["greedy_nll", "router_mean", "block_influence"]
    assert data.rankings["router_mean"]["ranking"] == [2, 3, 1, 0, 4, 5]
    assert data.rankings["router_mean"]["method"] == "mine"
    assert data.overridden == ["router_mean"]
    assert data.ranking_sources["router_mean"] == f"ranking {mine}"
    kw = data.kwargs()
    assert sorted(kw) == ["bypasses", "rankings", "router_source", "routers"]
    assert sorted(kw["routers"]) == list(range(N_LAYER)) and kw["router_source"] == {"command": "test"}
    # a loaded RouterFile and a mapping with its name are the same as their files
    same = attach_data(load_router_file(rf), [json.loads(extra.read_text()), json.loads(mine.read_text())])
    assert same.rankings == data.rankings and same.overridden == ["router_mean"]


def test_without_given_rankings_the_router_files_are_kept_in_order(tmp_path):
    rf = _router_file(tmp_path / "r.safetensors", {"b": {"ranking": [0, 1]}, "a": {"ranking": [1, 0]}})
    data = attach_data(rf)
    assert list(data.rankings) == ["a", "b"] and data.overridden == []  # the file stores them sorted by name
    assert attach_data(None, []).kwargs() == {"routers": None, "bypasses": None, "rankings": None,
                                               "router_source": None}


def test_two_given_rankings_with_one_name_are_refused_naming_both(tmp_path):
    a = _ranking(tmp_path / "a.json", "greedy_nll", [0, 1])
    b = _ranking(tmp_path / "b.json", "greedy_nll", [1, 0])
    with pytest.raises(RankingError) as e:
        attach_data(None, [a, b])
    assert str(e.value).startswith(f"ranking {b}:") and str(a) in str(e.value) and "'greedy_nll'" in str(e.value)


def test_cli_attach_stores_the_given_ranking_in_place_of_the_router_files(base_gguf, tmp_path):
    from first_gguf.convert.router_file import fingerprint_gguf
    from first_gguf.gguf_info import read_with_sidecar

    fp = fingerprint_gguf(base_gguf)
    rf = _router_file(tmp_path / "r.safetensors", {"router_mean": {"ranking": list(range(30))}},
                      n_layer=fp["n_layer"], n_embd=fp["n_embd"], fingerprint=fp)
    mine = _ranking(tmp_path / "mine.json", "router_mean", list(range(29, -1, -1)))
    side = tmp_path / "side.gguf"
    res = CliRunner().invoke(main, ["attach", str(base_gguf), str(rf), "--ranking", str(mine), "--sidecar",
                                    "-o", str(side)])
    assert res.exit_code == 0, res.output
    assert f"static ranking 'router_mean': ranking {mine} replaces the router file's" in res.output
    info = read_with_sidecar(base_gguf, side)
    assert info.static_rankings == {"router_mean": list(range(29, -1, -1))}


# ---------------------------------------------------------------- the validator
@pytest.mark.parametrize("content, field, why", [
    ({"name": "r", "ranking": [1, 1, 0]}, "'ranking'", "[1] appear more than once"),
    ({"name": "r", "ranking": [0, 7]}, "'ranking'", "[0, 6)"),
    ({"name": "r", "ranking": [0.5]}, "'ranking'", "integers"),
    ({"name": "r"}, "'ranking'", "missing"),
    ({"name": "a b", "ranking": [0]}, "'name'", "letters, digits"),
    ({"name": "static", "ranking": [0]}, "'name'", "not 'router' or 'static'"),
    ({"name": "", "ranking": [0]}, "'name'", "non-empty"),
    ({"ranking": [0]}, "'name'", "missing"),
    ([0, 1], "'name' and 'ranking'", "got a JSON list"),
])
def test_ranking_file_errors_name_the_file_the_field_and_what_was_expected(tmp_path, content, field, why):
    p = tmp_path / "rank.json"
    p.write_text(json.dumps(content))
    with pytest.raises(RankingError) as e:
        read_ranking_file(p, n_layer=6)
    msg = str(e.value)
    assert msg.startswith(f"ranking {p}: ") and field in msg and why in msg, msg


def test_unreadable_ranking_files_are_named(tmp_path):
    with pytest.raises(RankingError, match=f"cannot read ranking {tmp_path / 'none.json'}"):
        read_ranking_file(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(RankingError, match=f"ranking {tmp_path / 'bad.json'} is not valid JSON"):
        read_ranking_file(tmp_path / "bad.json")


def test_a_ranking_without_a_name_is_fine_where_none_is_needed(tmp_path):
    p = tmp_path / "r.json"
    p.write_text(json.dumps({"ranking": [np.int64(2).item(), 0, 1]}))
    assert read_ranking_file(p, need_name=False)["ranking"] == [2, 0, 1]
    assert check_ranking({"ranking": np.array([1, 0])}, "x") == [1, 0]


def test_router_file_rankings_go_through_the_same_validator(tmp_path):
    with pytest.raises(RouterFileError) as e:
        _router_file(tmp_path / "r.safetensors", {"bad": {"ranking": [0, 9]}})
    assert "static ranking 'bad': 'ranking' must hold block indices in [0, 6)" in str(e.value)
    assert str(tmp_path / "r.safetensors") in str(e.value)


def test_the_base_is_checked_against_the_rankings_and_the_routers(base_gguf, tmp_path):
    big = _ranking(tmp_path / "big.json", "wide", list(range(40)))  # the base has 30 blocks
    data = attach_data(None, [big])
    with pytest.raises(RankingError, match=rf"^ranking {big}: 'ranking' must hold block indices in \[0, 30\)"):
        data.check_base(base_gguf)
    rf = _router_file(tmp_path / "r.safetensors", {}, fingerprint={"architecture": "llama", "n_layer": 6})
    with pytest.raises(RouterFileError, match="does not fit") as e:
        attach_data(rf).check_base(base_gguf)
    assert str(rf) in str(e.value) and "n_layer" in str(e.value)
    attach_data(rf).check_base(base_gguf, force=True)  # force: attach anyway


def test_a_name_keyed_rankings_dict_is_refused():
    """convert_hf / attach_data once took {name: ranking}; such a dict is refused by what it holds, not read
    as file names."""
    from first_gguf.convert.attach import attach_data

    with pytest.raises(TypeError, match="keys \\['greedy'\\]"):
        attach_data(None, {"greedy": {"ranking": [1, 0]}})
    data = attach_data(None, {"name": "greedy", "ranking": [1, 0]})
    assert list(data.rankings) == ["greedy"]
