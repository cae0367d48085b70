"""attach / strip / quantize and the router file."""
from __future__ import annotations

import json
import subprocess

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from first_gguf.cli import main
from first_gguf.constants import ROUTER_DEFINITION
from first_gguf.convert.attach import attach, strip
from first_gguf.convert.gguf_edit import GGUFEditError
from first_gguf.convert.router_file import (RouterFile, RouterFileError, fingerprint_gguf, load_router_file,
                                            save_router_file)


def _tensors(path):
    r = gguf.GGUFReader(path)
    return {t.name: (t.tensor_type, [int(x) for x in t.shape], bytes(t.data.tobytes())) for t in r.tensors}


def _kvs(path):
    r = gguf.GGUFReader(path)
    out = {}
    for f in r.fields.values():
        if f.name.startswith("GGUF."):
            continue
        v = f.contents()
        out[f.name] = (f.types, v.tolist() if hasattr(v, "tolist") else v)
    return out


@pytest.fixture(scope="module")
def router_file(tmp_path_factory, base_gguf, router_weights):
    p = tmp_path_factory.mktemp("rf") / "routers.safetensors"
    rf = RouterFile(30, 576, {b: w for b, (w, _) in router_weights.items()},
                    {b: v for b, (_, v) in router_weights.items()}, fingerprint_gguf(base_gguf),
                    {"mean_router": {"ranking": list(range(30)), "method": "test"}}, {"command": "test"})
    return save_router_file(p, rf)


def test_attach_strip_round_trip_is_bit_exact(base_gguf, router_gguf, tmp_path):
    stripped = strip(router_gguf, tmp_path / "stripped.gguf")
    assert _tensors(stripped) == _tensors(base_gguf)
    assert _kvs(stripped) == _kvs(base_gguf)
    with_routers = _tensors(router_gguf)
    base = _tensors(base_gguf)
    assert {k: v for k, v in with_routers.items() if ".router." not in k} == base
    assert sum(".router." in k for k in with_routers) == 60


def test_stripped_file_loads_in_stock_llama_cpp(stock_python, router_gguf, tmp_path):
    stripped = strip(router_gguf, tmp_path / "stripped.gguf")
    code = ("import sys; from llama_cpp import Llama\n"
            "try:\n    Llama(model_path=sys.argv[1], verbose=False); print('LOADED')\n"
            "except ValueError: print('REFUSED')\n")
    run = lambda p: subprocess.run([str(stock_python), "-c", code, str(p)], capture_output=True, text=True,  # noqa: E731
                                   timeout=300).stdout.strip()
    assert run(stripped) == "LOADED"


def test_router_file_round_trip_and_attach(router_file, router_weights, base_gguf, tmp_path):
    rf = load_router_file(router_file)
    assert rf.n_layer == 30 and rf.n_embd == 576 and rf.definition == ROUTER_DEFINITION
    for b, (w, v) in router_weights.items():
        np.testing.assert_array_equal(rf.weights[b], w)
        assert rf.biases[b] == np.float32(v)
    out = tmp_path / "a.gguf"
    res = CliRunner().invoke(main, ["attach", str(base_gguf), str(router_file), "-o", str(out)])
    assert res.exit_code == 0, res.output
    t = _tensors(out)
    np.testing.assert_array_equal(np.frombuffer(t["blk.7.router.weight"][2], np.float32), router_weights[7][0])
    assert t["blk.7.router.weight"][:2] == (gguf.GGMLQuantizationType.F32, [576, 1])
    info = json.loads(CliRunner().invoke(main, ["info", str(out), "--json"]).output)
    assert info["router_blocks"] == list(range(30)) and "mean_router" in info["static_rankings"]


def test_quantize_keeps_routers_exact(router_gguf, tmp_path):
    out = tmp_path / "q8.gguf"
    res = CliRunner().invoke(main, ["quantize", str(router_gguf), str(out), "--type", "Q8_0", "--allow-requantize"])
    assert res.exit_code == 0, res.output
    a, b = _tensors(router_gguf), _tensors(out)
    routers = [k for k in a if ".router." in k]
    norm = lambda shape: shape[:1] if shape[1:] == [1] else shape  # noqa: E731  (llama.cpp drops trailing 1s)
    assert routers and all(a[k][0] == b[k][0] == gguf.GGMLQuantizationType.F32 for k in routers)
    assert all(a[k][2] == b[k][2] and norm(a[k][1]) == norm(b[k][1]) for k in routers)
    assert b["blk.0.attn_q.weight"][0] == gguf.GGMLQuantizationType.Q8_0
    import first_gguf

    with first_gguf.load(out, n_ctx=256) as m:
        assert m.n_routers == 30
        assert len(m.generate("Hello", 0.2, max_tokens=3).skipped_layers) == 6
    res = CliRunner().invoke(main, ["quantize", str(router_gguf), str(tmp_path / "x.gguf"), "--type", "Q9_9"])
    assert res.exit_code != 0 and "unknown quantization type 'Q9_9'" in res.output


def test_fingerprint_mismatch_is_refused(router_file, tmp_path, base_gguf):
    rf = load_router_file(router_file)
    rf.fingerprint = dict(rf.fingerprint, ref_sha256="0" * 64)
    other = save_router_file(tmp_path / "other.safetensors", rf)
    out = tmp_path / "o.gguf"
    res = CliRunner().invoke(main, ["attach", str(base_gguf), str(other), "-o", str(out)])
    assert res.exit_code != 0 and "does not fit" in res.output and "ref_sha256" in res.output
    assert not out.exists()
    res = CliRunner().invoke(main, ["attach", str(base_gguf), str(other), "-o", str(out), "--force"])
    assert res.exit_code == 0 and out.exists()


def test_bad_router_files(tmp_path, router_file):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(RouterFileError, match="corrupt or truncated"):
        load_router_file(bad)
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(router_file.read_bytes()[:-100])
    with pytest.raises(RouterFileError, match="trunc.safetensors"):
        load_router_file(trunc)
    with pytest.raises(RouterFileError, match="not found"):
        load_router_file(tmp_path / "missing.safetensors")
    rf = load_router_file(router_file)
    rf.weights[3] = np.full(576, np.nan, np.float32)
    with pytest.raises(RouterFileError, match=r"router.3.weight holds NaN"):
        save_router_file(tmp_path / "nan.safetensors", rf)
    rf.weights[3] = np.zeros(575, np.float32)
    with pytest.raises(RouterFileError, match=r"router.3.weight has shape \(575,\); expected \(576,\)"):
        save_router_file(tmp_path / "shape.safetensors", rf)
    assert not (tmp_path / "shape.safetensors").exists()


def test_writers_never_clobber_or_leave_partial_files(base_gguf, tmp_path):
    out = tmp_path / "exists.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(GGUFEditError, match="output file exists"):
        strip(base_gguf, out)
    assert out.read_bytes() == b"keep me"
    with pytest.raises(GGUFEditError, match="is the input file"):
        strip(base_gguf, base_gguf, force=True)
    # a failure while writing leaves nothing behind
    with pytest.raises(GGUFEditError):
        attach(base_gguf, tmp_path / "bad.gguf", routers={99: (np.zeros(576, np.float32), None)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.gguf"]


def test_router_file_with_missing_blocks_is_refused(router_file, tmp_path):
    from safetensors.numpy import safe_open, save_file

    with safe_open(str(router_file), framework="np") as f:
        meta = f.metadata()
        arrays = {k: f.get_tensor(k) for k in f.keys() if k != "router.29.weight"}
    broken = tmp_path / "missing.safetensors"
    save_file(arrays, str(broken), metadata=meta)
    with pytest.raises(RouterFileError, match=r"blocks \[29\] are listed .* missing"):
        load_router_file(broken)


def test_attach_refuses_mismatched_shapes_and_architectures(base_gguf, router_file, tmp_path):
    from first_gguf.convert.gguf_edit import _copy_kv, read_gguf, rewrite_gguf

    rf = load_router_file(router_file)
    small = {b: (w[:512], None) for b, (w, _) in rf.routers().items()}
    with pytest.raises(GGUFEditError, match=r"router weight of block 0 has shape \(512,\); expected \(576,\)"):
        attach(base_gguf, tmp_path / "x.gguf", routers=small)
    with pytest.raises(GGUFEditError, match=r"router for block 40: the model has blocks 0..29"):
        attach(base_gguf, tmp_path / "x.gguf", routers={40: (rf.weights[0], None)})
    r = read_gguf(base_gguf)
    kv = {"exaone" + f.name[len("llama"):]: _copy_kv(f) for f in r.fields.values() if f.name.startswith("llama.")}
    q = rewrite_gguf(base_gguf, tmp_path / "q.gguf", set_kv=kv, drop_kv=lambda k: k.startswith("llama."),
                     arch="exaone")
    with pytest.raises(GGUFEditError, match=r"architecture 'exaone' is not covered .*\(supported: llama, "):
        attach(q, tmp_path / "x.gguf", routers=rf.routers())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.gguf"]


def test_interrupted_write_leaves_no_file(base_gguf, router_weights, tmp_path, monkeypatch):
    import gguf as gguf_mod

    calls = {"n": 0}
    real = gguf_mod.GGUFWriter.write_tensor_data

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 50:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(gguf_mod.GGUFWriter, "write_tensor_data", flaky)
    with pytest.raises(KeyboardInterrupt):
        attach(base_gguf, tmp_path / "out.gguf", routers=router_weights)
    assert list(tmp_path.iterdir()) == []
