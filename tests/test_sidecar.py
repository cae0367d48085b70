"""Sidecar GGUFs: routers, bypasses and rankings in a small file of their own, attached at load
time to an untouched base GGUF that every other llama.cpp tool still opens.

References: the same data attached into a single-file GGUF (convert.attach) must give the same tokens,
skipped blocks, router scores and log-probs; the base file's bytes never change; stock llama-cpp-python
(the unpatched reference build) loads the base and generates.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest

import first_gguf
from first_gguf.convert.attach import attach, write_sidecar
from first_gguf.convert.gguf_edit import GGUFEditError
from first_gguf.gguf_info import read_info

PROMPT = "The three primary colours are"
RANK = 4
BYPASS_BLOCKS = (5, 12, 13, 14, 16, 17)


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def data(router_weights):
    rng = np.random.default_rng(99)
    n_embd = next(iter(router_weights.values()))[0].shape[0]
    bypasses = {b: ((rng.standard_normal((RANK, n_embd)) * 0.05).astype(np.float32),
                    (rng.standard_normal((n_embd, RANK)) * 0.05).astype(np.float32)) for b in BYPASS_BLOCKS}
    rankings = {"test_rank": {"ranking": list(range(29, -1, -1)), "method": "test"}}
    return {"routers": router_weights, "bypasses": bypasses, "rankings": rankings,
            "router_source": {"test": "sidecar"}}


@pytest.fixture(scope="module")
def files(tmp_path_factory, base_gguf, data):
    d = tmp_path_factory.mktemp("sidecar")
    before = _sha(base_gguf)
    side = write_sidecar(base_gguf, d / "smollm2.first.gguf", **data)
    single = attach(base_gguf, d / "single.gguf", **data)
    assert _sha(base_gguf) == before
    return side, single


def test_sidecar_header(files, base_gguf):
    side, _ = files
    r = gguf.GGUFReader(side)
    assert r.get_field("general.type").contents() == "adapter"
    assert r.get_field("adapter.type").contents() == "first-gguf"
    assert r.get_field("general.architecture").contents() == "llama"
    info = read_info(side)
    assert info.sidecar and info.base_fingerprint["n_layer"] == 30
    assert side.stat().st_size < 2 << 20  # routers + rank-4 bypasses, no model weights
    assert not read_info(base_gguf).sidecar


def test_sidecar_equals_attached_file(files, base_gguf):
    side, single = files
    before = _sha(base_gguf)
    with first_gguf.load(base_gguf, routers=side, n_ctx=512, n_threads=1) as a, \
            first_gguf.load(single, n_ctx=512, n_threads=1) as b:
        assert a.path == Path(base_gguf) and a.routers_path == Path(side) and b.routers_path is None
        assert (a.n_routers, a.n_bypasses) == (b.n_routers, b.n_bypasses) == (30, len(BYPASS_BLOCKS))
        assert a.static_rankings == b.static_rankings == {"test_rank": list(range(29, -1, -1))}
        for budget, strategy in ((0.0, "auto"), (0.2, "router"), (0.2, "static"), (0.34, "router")):
            ga = a.generate(PROMPT, budget, skip_strategy=strategy, max_tokens=12)
            gb = b.generate(PROMPT, budget, skip_strategy=strategy, max_tokens=12)
            assert ga.tokens == gb.tokens, (budget, strategy)
            assert ga.skipped_layers == gb.skipped_layers and ga.bypassed_layers == gb.bypassed_layers
            if budget:
                assert ga.skipped_layers
            np.testing.assert_array_equal(np.asarray(ga.router_scores), np.asarray(gb.router_scores))
        # the bypasses take part: skipped blocks with an adapter give other log-probs than without
        skip = list(BYPASS_BLOCKS[:3])
        la = a.score(PROMPT, " red, yellow and blue.", 0.1, skip_layers=skip)
        lb = b.score(PROMPT, " red, yellow and blue.", 0.1, skip_layers=skip)
        assert la == lb
        a.bypass = False
        assert a.score(PROMPT, " red, yellow and blue.", 0.1, skip_layers=skip) != la
    assert _sha(base_gguf) == before


def test_stock_llama_cpp_loads_the_base(stock_python, base_gguf, files):
    """The base a sidecar goes with is a plain GGUF: unpatched llama-cpp-python opens it and generates the
    same greedy tokens as first-gguf with the sidecar at skip_budget 0."""
    side, _ = files
    code = ("import json, sys\nfrom llama_cpp import Llama\n"
            "llm = Llama(model_path=sys.argv[1], n_ctx=512, n_threads=1, verbose=False)\n"
            "toks = []\n"
            "for t in llm.generate(llm.tokenize(sys.argv[2].encode(), add_bos=True, special=True), temp=0.0, "
            "repeat_penalty=1.0):\n"
            "    toks.append(int(t))\n"
            "    if len(toks) == 10: break\n"
            "print(json.dumps(toks))\n")
    res = subprocess.run([str(stock_python), "-c", code, str(base_gguf), PROMPT], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    with first_gguf.load(base_gguf, routers=side, n_ctx=512, n_threads=1) as m:
        assert m.generate(PROMPT, 0.0, max_tokens=10).tokens[:len(json.loads(res.stdout))] == json.loads(res.stdout)


def _other_model(tmp_path, base_gguf) -> Path:
    """The base GGUF with one value of the fingerprint tensor changed (output_norm.weight)."""
    from first_gguf.convert.gguf_edit import rewrite_gguf

    r = gguf.GGUFReader(base_gguf)
    t = next(t for t in r.tensors if t.name == "output_norm.weight")
    w = np.array(t.data, dtype=np.float32)
    w[0] += 1.0
    return rewrite_gguf(base_gguf, tmp_path / "other.gguf", drop_tensor=lambda n: n == "output_norm.weight",
                        add_tensors=[("output_norm.weight", w)])


def test_mismatched_sidecars_refused(tmp_path, files, base_gguf, data):
    side, single = files
    other = _other_model(tmp_path, base_gguf)
    with pytest.raises(ValueError, match=r"sidecar .*smollm2\.first\.gguf does not belong to .*other\.gguf: "
                                         r"ref_sha256"):
        first_gguf.load(other, routers=side, n_ctx=256, n_threads=1)
    with pytest.raises(ValueError, match="already carries first-gguf data"):
        first_gguf.load(single, routers=side, n_ctx=256, n_threads=1)
    with pytest.raises(ValueError, match="not a first-gguf sidecar"):
        first_gguf.load(base_gguf, routers=single, n_ctx=256, n_threads=1)
    with pytest.raises(ValueError, match="is a first-gguf sidecar, not a model"):
        first_gguf.load(side, n_ctx=256, n_threads=1)
    with pytest.raises(ValueError, match="not found"):
        first_gguf.load(base_gguf, routers=tmp_path / "missing.gguf", n_ctx=256, n_threads=1)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(side.read_bytes()[: side.stat().st_size - 1000])
    with pytest.raises(ValueError, match="cut.gguf"):
        first_gguf.load(base_gguf, routers=cut, n_ctx=256, n_threads=1)
    with pytest.raises(GGUFEditError, match="already carries first-gguf data"):
        write_sidecar(single, tmp_path / "x.gguf", **data)
    assert not (tmp_path / "x.gguf").exists()


def test_runtime_checks_without_python(tmp_path, files, base_gguf):
    """The C loader checks what it relies on itself (a caller that skips the Python checks gets an error,
    never a half-applied sidecar): a sidecar for another width is refused and the model keeps no router."""
    import ctypes

    from first_gguf import _lib

    side, _ = files
    r = gguf.GGUFReader(side)
    w = gguf.GGUFWriter(str(tmp_path / "wide.gguf"), "llama")
    w.add_type("adapter")
    w.add_string("adapter.type", "first-gguf")
    for t in r.tensors:
        a = np.array(t.data)
        if t.name == "blk.3.router.weight":
            a = np.zeros((1, a.size + 1), dtype=np.float32)
        w.add_tensor(t.name, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with first_gguf.load(base_gguf, n_ctx=256, n_threads=1) as m:
        err = ctypes.create_string_buffer(512)
        rc = _lib.first_model_attach_sidecar(m._model, str(tmp_path / "wide.gguf").encode(), err, len(err))
        assert rc == -7 and b"blk.3.router.weight" in err.value, err.value
        assert _lib.first_model_n_routers(m._model) == 0 and _lib.first_model_n_bypasses(m._model) == 0


def test_cli_attach_sidecar_and_routers_option(tmp_path, base_gguf, files):
    """attach --sidecar writes the sidecar; --routers loads it on the commands that load a model; info
    shows both files; the sidecar written from a router file equals the one from the library."""
    from click.testing import CliRunner

    from first_gguf.cli import main
    from first_gguf.convert.router_file import RouterFile, fingerprint_gguf, save_router_file

    side, _ = files
    rf = RouterFile(30, 576, {b: w for b, (w, _) in read_routers(side).items()},
                    {b: bias for b, (_, bias) in read_routers(side).items()}, fingerprint_gguf(base_gguf))
    rpath = save_router_file(tmp_path / "r.safetensors", rf)
    out = tmp_path / "cli.first.gguf"
    res = CliRunner().invoke(main, ["attach", str(base_gguf), str(rpath), "--sidecar", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert read_info(out).sidecar and read_info(out).router_blocks == list(range(30))
    res = CliRunner().invoke(main, ["info", str(base_gguf), "--routers", str(out), "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert d["path"] == str(base_gguf) and d["routers_path"] == str(out) and len(d["router_blocks"]) == 30
    res = CliRunner().invoke(main, ["generate", PROMPT, "--raw", "--model", str(base_gguf), "--routers", str(out),
                                    "--skip-budget", "0.2", "--max-tokens", "8", "--threads", "1", "--json"])
    assert res.exit_code == 0, res.output
    g = json.loads(res.output[res.output.index("{"):])
    with first_gguf.load(base_gguf, routers=out, n_ctx=512, n_threads=1) as m:
        ref = m.generate(PROMPT, 0.2, max_tokens=8, skip_strategy="auto")
    assert g["tokens"] == ref.tokens and g["skipped_layers"] == ref.skipped_layers and len(ref.skipped_layers) == 6
    res = CliRunner().invoke(main, ["generate", PROMPT, "--model", str(base_gguf), "--routers", str(base_gguf)])
    assert res.exit_code != 0 and "not a first-gguf sidecar" in res.output


def read_routers(path):
    """{block: (weight, bias)} of a GGUF's router tensors, read with gguf-py."""
    r = gguf.GGUFReader(path)
    t = {x.name: np.array(x.data, dtype=np.float32).reshape(-1) for x in r.tensors}
    return {int(n.split(".")[1]): (w, float(t[n.replace("weight", "bias")][0]))
            for n, w in t.items() if n.endswith("router.weight")}


def test_convert_writes_either_form(tmp_path, tiny, tiny_routers, tiny_gguf_model):
    """convert --sidecar: the converted GGUF without first-gguf data plus a sidecar; loaded together they
    give what the single-file conversion gives."""
    from click.testing import CliRunner

    from first_gguf.cli import main

    d, _ = tiny
    out, side = tmp_path / "tiny.gguf", tmp_path / "tiny.first.gguf"
    res = CliRunner().invoke(main, ["convert", str(d), "--routers", str(tiny_routers[0]), "--outtype", "f32",
                                    "--sidecar", str(side), "-o", str(out)])
    assert res.exit_code == 0, res.output
    plain = read_info(out)
    assert not plain.router_blocks and not plain.sidecar and read_info(side).router_blocks == [0, 1, 2, 3]
    with first_gguf.load(out, routers=side, n_ctx=256, n_threads=1) as m:
        for budget in (0.0, 0.25, 0.5):
            a = m.generate("the sum of", budget, max_tokens=8)
            b = tiny_gguf_model.generate("the sum of", budget, max_tokens=8)
            assert (a.tokens, a.skipped_layers) == (b.tokens, b.skipped_layers)
            np.testing.assert_array_equal(np.asarray(a.router_scores), np.asarray(b.router_scores))


def test_train_writes_a_sidecar(tmp_path, tiny):
    """first-gguf train on a GGUF without first-gguf data writes <stem>.sidecar.gguf beside the router
    file, holding the trained routers, ready for --routers."""
    from click.testing import CliRunner

    from first_gguf.cli import main
    from first_gguf.convert.router_file import load_router_file

    d, _ = tiny
    plain = tmp_path / "plain.gguf"
    res = CliRunner().invoke(main, ["convert", str(d), "--outtype", "f32", "-o", str(plain)])
    assert res.exit_code == 0, res.output
    out = tmp_path / "r.safetensors"
    res = CliRunner().invoke(main, ["train", "--model", str(plain), "--data", "docs", "-o", str(out), "--steps", "2",
                                    "--batch-size", "2", "--no-bf16", "--threads", "1",
                                    "--max-examples-per-task", "8"])
    assert res.exit_code == 0, res.output
    side = tmp_path / "r.sidecar.gguf"
    rf = load_router_file(out)
    with first_gguf.load(plain, routers=side, n_ctx=256, n_threads=1) as m:
        assert m.n_routers == 4 and set(m.static_rankings) == set(rf.static_rankings)
    got = read_routers(side)
    for b, w in rf.weights.items():
        np.testing.assert_array_equal(got[b][0], w)
