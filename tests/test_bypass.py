"""Bypass adapters (issue 7): the runtime's skipped block == the training forward, GGUF round trips, training."""
from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")

from conftest import N_EMBD, N_LAYER  # noqa: E402
from torch_reference import skipped_logprobs, training_bypasses  # noqa: E402

import first_gguf  # noqa: E402
from first_gguf.cli import main  # noqa: E402
from first_gguf.convert.attach import attach, strip  # noqa: E402
from first_gguf.convert.gguf_edit import GGUFEditError, rewrite_gguf  # noqa: E402
from first_gguf.convert.router_file import RouterFile, RouterFileError, load_router_file, save_router_file  # noqa: E402
from first_gguf.gguf_info import read_info  # noqa: E402
from first_gguf.train import Sequence_, TrainConfig, gated_forward, train  # noqa: E402

PROMPT = [1, 17, 45, 99, 120, 33, 8, 76, 201, 150, 64, 12]
CONT = [55, 90, 130, 7, 66, 181, 23, 140]
RANK = 4


@pytest.fixture(scope="module")
def bypasses():
    """Random bypasses, large enough to change the output a lot when applied."""
    rng = np.random.default_rng(3)
    return {il: ((rng.standard_normal((RANK, N_EMBD)) / np.sqrt(N_EMBD)).astype(np.float32),
                 (rng.standard_normal((N_EMBD, RANK)) * 0.5).astype(np.float32)) for il in range(N_LAYER)}


@pytest.fixture(scope="module", params=["f32", "f16"])
def bypass_model(request, tiny_gguf_model, bypasses, tmp_path_factory):
    out = tmp_path_factory.mktemp("bypass") / f"tiny.bypass-{request.param}.gguf"
    attach(tiny_gguf_model.path, out, bypasses=bypasses, bypass_dtype=request.param)
    m = first_gguf.load(out, n_ctx=1024, n_threads=2)
    yield request.param, m
    m.close()


@pytest.mark.parametrize("skip", [(1,), (0, 2), (3,), (1, 2, 3)])
def test_bypass_forward_equals_runtime_decode(tiny, bypass_model, bypasses, skip):
    """Teacher-forced log-probs of the runtime's masked decode with bypasses == the torch reference
    (tests/torch_reference.py; f32 GGUF; llama.cpp keeps K/V in F16: measured 2e-3..5e-3 nats). Control: the
    same forward without bypasses is 0.19..4.4 nats off, so the comparison can fail."""
    dtype, m = bypass_model
    _, model = tiny
    ours = skipped_logprobs(model, PROMPT, CONT, skip=skip, bypasses=bypasses, bypass_dtype=dtype)
    rt = np.array(m.score_tokens(PROMPT, CONT, skip_layers=list(skip)).logprobs)
    assert float(np.max(np.abs(ours - rt))) < 1e-2
    plain = skipped_logprobs(model, PROMPT, CONT, skip=skip)
    assert float(np.max(np.abs(plain - rt))) > 0.15
    # the training forward (first_gguf.train.gated_forward, what the adapters are trained through) == runtime
    gates = torch.ones(1, N_LAYER)
    gates[0, list(skip)] = 0.0
    with torch.no_grad():
        hid, _ = gated_forward(model, torch.tensor([PROMPT + CONT]), torch.tensor([len(PROMPT)]), gates,
                               bypass=training_bypasses(bypasses, N_LAYER, 1e-5, dtype))
        ls = torch.log_softmax(model.get_output_embeddings()(hid[0]).double(), -1)
    trained = np.array([float(ls[len(PROMPT) - 1 + i, t]) for i, t in enumerate(CONT)])
    assert float(np.max(np.abs(trained - rt))) < 1e-2


def test_full_depth_is_untouched_by_bypasses(tiny_gguf_model, bypass_model):
    _, m = bypass_model
    tiny_gguf_model.reset()
    m.reset()  # same cache state: the batch split changes llama.cpp's rounding
    a = tiny_gguf_model.score_tokens(PROMPT, CONT)
    b = m.score_tokens(PROMPT, CONT)
    assert a.logprobs == b.logprobs  # bit-identical: a block that runs never sees its bypass
    tiny_gguf_model.reset()
    m.reset()
    g0 = tiny_gguf_model.generate("the value of", max_tokens=12)
    g1 = m.generate("the value of", max_tokens=12)
    assert g0.tokens == g1.tokens


def test_greedy_decode_with_bypass_matches_torch(tiny, tiny_gguf_model, bypass_model, bypasses):
    """The decode path (not only scoring) applies the bypasses: greedy tokens with blocks 1, 2 skipped equal a
    torch greedy loop with the same bypasses, and differ from skipping without bypasses."""
    dtype, m = bypass_model
    _, model = tiny
    bp = training_bypasses(bypasses, N_LAYER, 1e-5, dtype)
    prompt = m.tokenize("the value of", add_bos=True)
    ids = list(prompt)
    gates = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    for _ in range(10):
        with torch.no_grad():
            hid, _ = gated_forward(model, torch.tensor([ids]), torch.tensor([len(prompt)]), gates, bypass=bp)
            ids.append(int(model.get_output_embeddings()(hid[0, -1]).argmax()))
    g = m.generate("the value of", skip_layers=[1, 2], max_tokens=10)
    assert g.tokens == ids[len(prompt):len(prompt) + len(g.tokens)] and len(g.tokens) >= 5
    plain = tiny_gguf_model.generate("the value of", skip_layers=[1, 2], max_tokens=10)
    assert plain.tokens != g.tokens


def test_bypass_switch_and_graph_reuse(tiny_gguf_model, bypass_model):
    """Model.bypass=False gives plain skipping (== the same file without bypasses), and switching back and forth
    never reuses a graph built for the other setting."""
    _, m = bypass_model
    plain = tiny_gguf_model.score_tokens(PROMPT, CONT, skip_layers=[1, 2]).logprobs
    with_bp = m.score_tokens(PROMPT, CONT, skip_layers=[1, 2]).logprobs
    try:
        for _ in range(2):
            m.bypass = False
            assert m.score_tokens(PROMPT, CONT, skip_layers=[1, 2]).logprobs == pytest.approx(plain, abs=1e-6)
            g = m.generate("the value of", skip_layers=[1, 2], max_tokens=4)
            assert g.bypassed_layers == []
            m.bypass = True
            assert m.score_tokens(PROMPT, CONT, skip_layers=[1, 2]).logprobs == pytest.approx(with_bp, abs=1e-6)
            g = m.generate("the value of", skip_layers=[1, 2], max_tokens=4)
            assert g.bypassed_layers == [1, 2]
        with pytest.raises(TypeError, match="bypass must be a bool"):
            m.bypass = 1
    finally:
        m.bypass = True
    assert m.n_bypasses == N_LAYER and tiny_gguf_model.n_bypasses == 0


def test_info_attach_strip_and_router_file(tiny_gguf_model, bypass_model, bypasses, tiny_routers, tmp_path):
    dtype, m = bypass_model
    inf = read_info(m.path)
    assert inf.bypass_blocks == list(range(N_LAYER)) and inf.bypass_rank == RANK
    assert inf.router_blocks == list(range(N_LAYER))  # routers kept when only bypasses are attached
    r = gguf.GGUFReader(m.path)
    t = next(t for t in r.tensors if t.name == "blk.1.bypass.down.weight")
    assert [int(x) for x in t.shape] == [N_EMBD, RANK]
    assert t.tensor_type == (gguf.GGMLQuantizationType.F16 if dtype == "f16" else gguf.GGMLQuantizationType.F32)
    res = CliRunner().invoke(main, ["info", str(m.path)])
    assert res.exit_code == 0 and f"rank {RANK}" in res.output
    stripped = strip(m.path, tmp_path / "s.gguf")
    assert read_info(stripped).bypass_blocks == [] and read_info(stripped).router_blocks == []

    # router file with bypasses -> CLI attach -> the same tensors
    rf = load_router_file(tiny_routers[0])
    rf.bypasses = {il: bypasses[il] for il in (1, 2)}
    rf.static_rankings = {"router_mean": {"ranking": [3, 2, 1, 0], "method": "test"}}
    p = save_router_file(tmp_path / "rb.safetensors", rf)
    (tmp_path / "g.json").write_text(json.dumps({"name": "greedy", "ranking": [1, 2, 3, 0]}))
    back = load_router_file(p)
    assert back.bypass_rank == RANK and sorted(back.bypasses) == [1, 2]
    np.testing.assert_array_equal(back.bypasses[2][1], bypasses[2][1])
    base = strip(tiny_gguf_model.path, tmp_path / "base.gguf")
    res = CliRunner().invoke(main, ["attach", str(base), str(p), "--ranking", str(tmp_path / "g.json"),
                                    "-o", str(tmp_path / "rb.gguf")])
    assert res.exit_code == 0, res.output
    inf = read_info(tmp_path / "rb.gguf")
    assert inf.bypass_blocks == [1, 2] and inf.router_blocks == list(range(N_LAYER))
    assert list(inf.static_rankings) == ["greedy", "router_mean"]  # an explicit --ranking is the default


def test_bad_bypasses_are_refused_with_names(tiny_gguf_model, bypasses, tiny_routers, tmp_path):
    down, up = bypasses[0]
    with pytest.raises(GGUFEditError, match=r"bypass of block 0: down \(4, 64\) / up \(64, 3\)"):
        attach(tiny_gguf_model.path, tmp_path / "x.gguf", bypasses={0: (down, up[:, :3])})
    with pytest.raises(GGUFEditError, match="block 9: the model has blocks 0..3"):
        attach(tiny_gguf_model.path, tmp_path / "x.gguf", bypasses={9: (down, up)})
    with pytest.raises(GGUFEditError, match="different ranks"):
        attach(tiny_gguf_model.path, tmp_path / "x.gguf", bypasses={0: (down, up), 1: (down[:2], up[:, :2])})
    assert not (tmp_path / "x.gguf").exists()
    # a GGUF with a down tensor but no up tensor: our reader and llama.cpp both refuse it, naming it
    half = rewrite_gguf(tiny_gguf_model.path, tmp_path / "half.gguf",
                        add_tensors=[("blk.2.bypass.down.weight", down)])
    with pytest.raises(ValueError, match="block 2 has bypass down but not up"):
        read_info(half)
    wrong = rewrite_gguf(tiny_gguf_model.path, tmp_path / "wrong.gguf",
                         add_tensors=[("blk.2.bypass.down.weight", down.T.copy()),
                                      ("blk.2.bypass.up.weight", up.T.copy())])
    with pytest.raises(ValueError, match="bypass of block 2 has wrong shape"):
        read_info(wrong)
    # router file: a down without up
    rf = load_router_file(tiny_routers[0])
    p = save_router_file(tmp_path / "ok.safetensors", rf)
    from safetensors.numpy import load_file, save_file
    from safetensors import safe_open

    with safe_open(str(p), framework="np") as f:
        meta = f.metadata()
    t = load_file(str(p))
    t["bypass.1.down"] = down
    meta["bypass_definition"] = json.dumps("x")
    save_file(t, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(RouterFileError, match="bypasses use definition"):
        load_router_file(tmp_path / "bad.safetensors")
    from first_gguf.constants import BYPASS_DEFINITION

    meta["bypass_definition"] = BYPASS_DEFINITION
    save_file(t, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(RouterFileError, match="bypass.1: has down but not up"):
        load_router_file(tmp_path / "bad.safetensors")


def test_llama_cpp_itself_refuses_a_bad_bypass(tiny_gguf_model, bypasses, tmp_path):
    """The C++ loader checks too (for users of the C API who skip first_gguf's validation), naming the tensor."""
    from llama_cpp import Llama

    from first_gguf.model import _LOG

    down, up = bypasses[0]
    for name, arrays, pattern in [
        ("i32.gguf", (down.astype(np.int32), up), "blk.0.bypass.down.weight' has wrong type; expected f32 or f16"),
        ("shape.gguf", (down[:, :32].copy(), up), "blk.0.bypass.down.weight' has wrong shape"),
    ]:
        bad = rewrite_gguf(tiny_gguf_model.path, tmp_path / name,
                           add_tensors=[("blk.0.bypass.down.weight", arrays[0]), ("blk.0.bypass.up.weight", arrays[1])])
        _LOG.lines.clear()
        with pytest.raises(ValueError):
            Llama(model_path=str(bad), verbose=False)
        assert any(pattern in line for line in _LOG.lines), _LOG.lines[-5:]


def test_training_learns_bypasses(tiny, tmp_path):
    """With --bypass-rank the bypasses move from their zero init and the distillation KL at a fixed budget
    ends lower than plain skipping with the same routers; resume continues from the checkpoint."""
    d, model = tiny
    rng = np.random.default_rng(0)
    seqs = [Sequence_([1] + rng.integers(3, 399, 11).tolist(), rng.integers(3, 399, 8).tolist(), "t")
            for _ in range(24)]
    cfg = TrainConfig(model=str(d), output=str(tmp_path / "r.safetensors"), steps=40, batch_size=4,
                      budget_min=0.25, budget_max=0.5, bypass_rank=RANK, bypass_lr=1e-2, bf16=False,
                      n_static_examples=8, checkpoint_every=20, static_mix=0.5, static_ranking=[1, 2, 3, 0])
    train(cfg, sequences=seqs, progress=False)
    rf = load_router_file(cfg.output)
    assert rf.bypass_rank == RANK and sorted(rf.bypasses) == list(range(N_LAYER))
    assert max(float(np.abs(u).max()) for _, u in rf.bypasses.values()) > 0  # up moved away from zero
    bp = training_bypasses(rf.bypasses, N_LAYER, 1e-5)

    def kl(bypass):
        ids = torch.tensor([s.prompt + s.cont for s in seqs])
        n_prompt = torch.tensor([len(s.prompt) for s in seqs])
        gates = torch.ones(len(seqs), N_LAYER)
        gates[:, 1] = gates[:, 2] = 0
        with torch.no_grad():
            t = torch.log_softmax(model.get_output_embeddings()(gated_forward(model, ids, n_prompt)[0]), -1)
            s = torch.log_softmax(model.get_output_embeddings()(gated_forward(model, ids, n_prompt, gates,
                                                                              bypass=bypass)[0]), -1)
        pos = slice(len(seqs[0].prompt), ids.shape[1] - 1)
        return float((t.exp() * (t - s)).sum(-1)[:, pos].mean())

    assert kl(bp) < kl(None)
    cfg2 = TrainConfig(**{**cfg.__dict__, "steps": 50, "resume": True})
    summary = train(cfg2, sequences=seqs, progress=False)
    assert summary["steps_this_run"] == 10
    bad = TrainConfig(**{**cfg.__dict__, "output": str(tmp_path / "x.safetensors"), "static_ranking": None})
    with pytest.raises(ValueError, match="static_mix > 0 needs a static ranking"):
        train(bad, sequences=seqs, progress=False)


def test_mixed_batch_with_bypass_equals_each_sequence_alone(bypass_model):
    """Two sequences in one ubatch, one skipping blocks 1, 2 (MIXED plan: the skipping row takes the bypass)
    give the logits each gets alone (SKIP plan / full depth)."""
    from llama_batch import decode, make_ctx, set_mask

    _, m = bypass_model
    p0, p1 = m.tokenize("the value of"), m.tokenize("a list of the")
    nv, nl, skip = m.n_vocab, m.n_layer, [1, 2]
    ctx = make_ctx(m, 2, n_ctx=512, n_threads=2)
    try:
        decode(ctx, [(t, i, 0, False) for i, t in enumerate(p0)] + [(t, i, 1, False) for i, t in enumerate(p1)], nv)
        set_mask(ctx, 0, skip, nl)
        both = decode(ctx, [(p0[-1], len(p0), 0, True), (p1[-1], len(p1), 1, True)], nv)
    finally:
        first_gguf._lib.llama_cpp.llama_free(ctx)
    alone = []
    for prompt, masked in ((p0, True), (p1, False)):
        ctx = make_ctx(m, 1, n_ctx=512, n_threads=2)
        try:
            decode(ctx, [(t, i, 0, False) for i, t in enumerate(prompt)], nv)
            if masked:
                set_mask(ctx, 0, skip, nl)
            alone.append(decode(ctx, [(prompt[-1], len(prompt), 0, True)], nv)[0])
        finally:
            first_gguf._lib.llama_cpp.llama_free(ctx)
    for seq in range(2):
        assert float(np.max(np.abs(both[seq] - alone[seq]))) < 1e-3
    # control: the masked row really used the bypass (plain skipping gives other logits)
    ctx = make_ctx(m, 1, n_ctx=512, n_threads=2)
    try:
        first_gguf._lib.first_set_bypass(ctx, False)
        decode(ctx, [(t, i, 0, False) for i, t in enumerate(p0)], nv)
        set_mask(ctx, 0, skip, nl)
        plain = decode(ctx, [(p0[-1], len(p0), 0, True)], nv)[0]
    finally:
        first_gguf._lib.llama_cpp.llama_free(ctx)
    assert float(np.max(np.abs(plain - alone[0]))) > 0.05


def test_init_routers_loads_a_file_with_omitted_adapters(tiny, tmp_path):
    """--init-routers with a router file that omits some adapters (the shipped file drops the identity ones)
    loads the adapters it has, keeps identity for the others, and refuses another rank."""
    d, _ = tiny
    rng = np.random.default_rng(1)
    seqs = [Sequence_([1] + rng.integers(3, 399, 11).tolist(), rng.integers(3, 399, 8).tolist(), "t")
            for _ in range(8)]
    cfg = TrainConfig(model=str(d), output=str(tmp_path / "a.safetensors"), steps=2, batch_size=2, bypass_rank=RANK,
                      bf16=False, n_static_examples=4)
    train(cfg, sequences=seqs, progress=False)
    rf = load_router_file(cfg.output)
    rf.bypasses = {il: (rng.normal(0, 0.1, (RANK, N_EMBD)).astype(np.float32),
                        rng.normal(0, 0.1, (N_EMBD, RANK)).astype(np.float32)) for il in (1, 3)}
    save_router_file(tmp_path / "init.safetensors", rf, force=True)
    cfg2 = TrainConfig(**{**cfg.__dict__, "output": str(tmp_path / "b.safetensors"), "steps": 1, "lr": 1e-9,
                          "bypass_lr": 1e-9, "init_routers": str(tmp_path / "init.safetensors")})
    train(cfg2, sequences=seqs, progress=False)
    out = load_router_file(cfg2.output)
    for il in (1, 3):
        for a, b in zip(out.bypasses[il], rf.bypasses[il]):
            assert float(np.max(np.abs(a - b))) < 1e-6
    for il in (0, 2):
        assert float(np.max(np.abs(out.bypasses[il][1]))) < 1e-6  # up stays (about) zero: identity
    cfg3 = TrainConfig(**{**cfg2.__dict__, "output": str(tmp_path / "c.safetensors"), "bypass_rank": RANK + 1})
    with pytest.raises(ValueError, match=f"bypasses of rank {RANK}; this run trains rank {RANK + 1}"):
        train(cfg3, sequences=seqs, progress=False)


def test_routers_ship_drops_identity_adapters_and_halves_the_rest(bypasses, tiny_routers, tmp_path):
    """first-gguf routers ship (convert/ship.py)."""
    def ship(*args):
        return CliRunner().invoke(main, ["routers", "ship", *map(str, args)])

    rf = load_router_file(tiny_routers[0])
    rf.bypasses = {il: bypasses[il] for il in range(N_LAYER)}
    rf.bypasses[0] = (bypasses[0][0], np.zeros_like(bypasses[0][1]))  # never trained: the identity
    src = save_router_file(tmp_path / "trained.safetensors", rf)
    out = tmp_path / "ship.safetensors"
    res = ship(src, "-o", out)
    assert res.exit_code == 0, res.output
    assert "dropped (identity or not in --blocks): [0]" in res.stderr
    back = load_router_file(out)
    assert sorted(back.bypasses) == list(range(1, N_LAYER))
    for il in range(1, N_LAYER):
        for got, want in zip(back.bypasses[il], bypasses[il]):
            assert got.dtype == np.float16
            np.testing.assert_array_equal(got, want.astype(np.float16))
    for il in range(N_LAYER):
        np.testing.assert_array_equal(back.weights[il], rf.weights[il])
    assert back.biases == rf.biases and back.fingerprint == rf.fingerprint
    # an existing output is not overwritten without --force; a file without adapters is refused by name
    res = ship(src, "-o", out)
    assert res.exit_code != 0 and str(out) in res.stderr and "exists" in res.stderr
    res = ship(tiny_routers[0], "-o", tmp_path / "n.safetensors")
    assert res.exit_code != 0 and "no bypass adapters" in res.stderr and str(tiny_routers[0]) in res.stderr
    # --blocks keeps only the named blocks' adapters (the others skip plainly); unknown blocks are refused
    res = ship(src, "-o", out, "--force", "--blocks", "1,3")
    assert res.exit_code == 0, res.output
    assert sorted(load_router_file(out).bypasses) == [1, 3]
    # --rank keeps the first components of every adapter; a rank above the adapters' is refused
    res = ship(src, "-o", out, "--force", "--rank", "2")
    assert res.exit_code == 0, res.output
    back = load_router_file(out)
    assert back.bypass_rank == 2
    np.testing.assert_array_equal(back.bypasses[1][0], bypasses[1][0][:2].astype(np.float16))
    np.testing.assert_array_equal(back.bypasses[1][1], bypasses[1][1][:, :2].astype(np.float16))
    res = ship(src, "-o", out, "--force", "--rank", "999")
    assert res.exit_code != 0 and "--rank 999" in res.stderr
    res = ship(src, "-o", out, "--force", "--blocks", "1,99")
    assert res.exit_code != 0 and "without an adapter" in res.stderr and "[99]" in res.stderr
