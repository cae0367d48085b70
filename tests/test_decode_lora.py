"""Decode-only LoRA (issue 7): the llama.cpp adapter is attached exactly while blocks are skipped, and the
runtime's masked decode with it equals the torch reference (tests/torch_reference.py: the adapter on
continuation tokens only) and, greedy, the training forward (DecodeLora active on continuation tokens)."""
from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import N_EMBD, N_LAYER  # noqa: E402
from torch_reference import skipped_logprobs, training_bypasses  # noqa: E402

import first_gguf  # noqa: E402
from first_gguf.convert.attach import attach  # noqa: E402
from first_gguf.train import DecodeLora, gated_forward  # noqa: E402

PROMPT = [1, 17, 45, 99, 120, 33, 8, 76, 201, 150, 64, 12]
CONT = [55, 90, 130, 7, 66, 181, 23, 140]


@pytest.fixture(scope="module")
def lora_setup(tiny, tiny_gguf_model, tmp_path_factory):
    """A random decode LoRA (on a copy of the tiny model: its hooks stay off the shared one) and random
    bypasses, written to files; the runtime model with both."""
    _, model = tiny
    student = copy.deepcopy(model)
    lora = DecodeLora(student, 4, seed=5)
    g = torch.Generator().manual_seed(11)
    for (il, n), b in lora.b.items():
        b.data = torch.randn(b.shape, generator=g) * 0.3
    rng = np.random.default_rng(4)
    bypasses = {il: ((rng.standard_normal((4, N_EMBD)) / np.sqrt(N_EMBD)).astype(np.float32),
                     (rng.standard_normal((N_EMBD, 4)) * 0.3).astype(np.float32)) for il in range(N_LAYER)}
    d = tmp_path_factory.mktemp("lora")
    lora.save_gguf(d / "tiny.lora.gguf", student)
    attach(tiny_gguf_model.path, d / "tiny.bypass.gguf", bypasses=bypasses, bypass_dtype="f32")
    m = first_gguf.load(d / "tiny.bypass.gguf", n_ctx=1024, n_threads=2, decode_lora=d / "tiny.lora.gguf")
    plain = first_gguf.load(d / "tiny.bypass.gguf", n_ctx=1024, n_threads=2)
    yield student, lora, bypasses, m, plain, d
    m.close()
    plain.close()


@pytest.mark.parametrize("skip", [(1,), (0, 2), (1, 2, 3)])
def test_decode_lora_forward_equals_runtime_decode(lora_setup, skip):
    """Teacher-forced log-probs with skipped blocks, bypasses and the decode LoRA: runtime == torch within
    1e-2 nats (f32 GGUF; llama.cpp keeps K/V in F16). Control: torch without the LoRA is > 0.15 nats off, so
    the LoRA (q/k rope permutation included: the tiny model has 4 heads, 2 KV heads) is really applied."""
    student, lora, bypasses, m, _, _ = lora_setup
    rt = np.array(m.score_tokens(PROMPT, CONT, skip_layers=list(skip)).logprobs)
    pairs = {k: (lora.a[k], lora.b[k]) for k in lora.a}  # the LoRA's weights; its hooks stay inactive
    ours = skipped_logprobs(student, PROMPT, CONT, skip=skip, bypasses=bypasses, lora=pairs, lora_scale=lora.scale)
    assert float(np.max(np.abs(ours - rt))) < 1e-2
    without = skipped_logprobs(student, PROMPT, CONT, skip=skip, bypasses=bypasses)
    assert float(np.max(np.abs(without - rt))) > 0.15
    # the training forward with the LoRA's own hooks on the decoded positions == runtime
    ids = torch.tensor([PROMPT + CONT])
    gates = torch.ones(1, N_LAYER)
    gates[0, list(skip)] = 0.0
    cont = (torch.arange(ids.shape[1])[None, :] >= len(PROMPT))[..., None]
    with torch.no_grad(), lora.active(cont):
        hid, _ = gated_forward(student, ids, torch.tensor([len(PROMPT)]), gates,
                               bypass=training_bypasses(bypasses, N_LAYER, 1e-5))
        ls = torch.log_softmax(student.get_output_embeddings()(hid[0]).double(), -1)
    trained = np.array([float(ls[len(PROMPT) - 1 + i, t]) for i, t in enumerate(CONT)])
    assert float(np.max(np.abs(trained - rt))) < 1e-2


def test_full_depth_never_sees_the_decode_lora(lora_setup):
    """skip_budget=0: bit-identical to the same GGUF without the adapter (it is never attached); after a
    skipped generation the next full-depth call is still identical (detached again)."""
    _, _, _, m, plain, _ = lora_setup
    m.reset()
    plain.reset()
    assert m.score_tokens(PROMPT, CONT).logprobs == plain.score_tokens(PROMPT, CONT).logprobs
    m.generate("the value of", skip_layers=[1, 2], max_tokens=6)
    m.reset()
    plain.reset()
    assert m.generate("the value of", max_tokens=12).tokens == plain.generate("the value of", max_tokens=12).tokens
    assert m.score_tokens(PROMPT, CONT).logprobs == plain.score_tokens(PROMPT, CONT).logprobs


def test_greedy_decode_with_decode_lora_matches_torch(lora_setup):
    student, lora, bypasses, m, plain, _ = lora_setup
    bp = training_bypasses(bypasses, N_LAYER, 1e-5)
    prompt = m.tokenize("the value of", add_bos=True)
    ids = list(prompt)
    gates = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    for _ in range(10):
        x = torch.tensor([ids])
        cont = (torch.arange(len(ids))[None, :] >= len(prompt))[..., None]
        with torch.no_grad(), lora.active(cont):
            hid, _ = gated_forward(student, x, torch.tensor([len(prompt)]), gates, bypass=bp)
            ids.append(int(student.get_output_embeddings()(hid[0, -1]).argmax()))
    g = m.generate("the value of", skip_layers=[1, 2], max_tokens=10)
    assert g.decode_lora and not m.generate("the value of", max_tokens=2).decode_lora
    assert g.tokens == ids[len(prompt):len(prompt) + len(g.tokens)] and len(g.tokens) >= 5
    m.use_decode_lora = False  # switched off: the same as the model without the adapter
    try:
        off = m.generate("the value of", skip_layers=[1, 2], max_tokens=10)
    finally:
        m.use_decode_lora = True
    assert off.tokens == plain.generate("the value of", skip_layers=[1, 2], max_tokens=10).tokens
    assert off.tokens != g.tokens


def test_bad_decode_lora_files_are_refused_by_name(tiny, tiny_gguf_model, lora_setup, tmp_path):
    student, lora, _, _, _, d = lora_setup
    with pytest.raises(ValueError, match="decode LoRA adapter not found: .*missing.gguf"):
        first_gguf.load(tiny_gguf_model.path, decode_lora=tmp_path / "missing.gguf")
    with pytest.raises(ValueError, match=r"failed to load LoRA adapter .*tiny.gguf.*general.type"):
        first_gguf.load(tiny_gguf_model.path, decode_lora=tiny_gguf_model.path)  # a model, not an adapter
    # an adapter whose shapes do not fit the base model (k's pair swapped and transposed: k is 64 -> 32)
    from first_gguf.convert.lora_gguf import write_lora_gguf

    a, b = lora.a[0, "k_proj"].detach().numpy(), lora.b[0, "k_proj"].detach().numpy()
    write_lora_gguf(tmp_path / "bad.gguf", {(0, "attn_k"): (np.ascontiguousarray(b.T), np.ascontiguousarray(a.T))},
                    alpha=8.0, n_head=4, n_head_kv=2)
    with pytest.raises(ValueError, match=r"bad.gguf.*incorrect shape|bad.gguf.*not transposed"):
        first_gguf.load(tiny_gguf_model.path, decode_lora=tmp_path / "bad.gguf")
    with pytest.raises(ValueError, match="several ranks"):
        write_lora_gguf(tmp_path / "x.gguf", {(0, "attn_q"): (np.zeros((2, 8)), np.zeros((8, 2))),
                                              (0, "attn_k"): (np.zeros((4, 8)), np.zeros((8, 4)))},
                        alpha=1.0, n_head=4, n_head_kv=2)
    assert not (tmp_path / "x.gguf").exists()


def test_bench_and_cli_with_decode_lora(lora_setup):
    """bench measures with the adapters (bypasses + decode LoRA) and without; the user's switches survive it."""
    from click.testing import CliRunner

    from first_gguf.bench import format_table, run_bench
    from first_gguf.cli import main

    _, _, _, m, _, d = lora_setup
    res = run_bench(m, [0.5], skip_strategy="router", repeats=1, gen_tokens=4, prompt_tokens=16)
    assert res["decode_lora"].endswith("tiny.lora.gguf") and "plain_decode_ratio" in res["rows"][-1]
    assert "decode LoRA tiny.lora.gguf" in format_table(res)
    assert m.use_decode_lora and m.bypass
    out = CliRunner().invoke(main, ["generate", "the value of", "--model", str(d / "tiny.bypass.gguf"),
                                    "--decode-lora", str(d / "tiny.lora.gguf"), "--skip-layers", "1,2",
                                    "--max-tokens", "4", "--raw", "--threads", "1"])
    assert out.exit_code == 0, out.output
    assert "skipped 2 blocks (explicit, bypass adapters, decode LoRA): 1,2" in out.output
    out = CliRunner().invoke(main, ["generate", "x", "--model", str(d / "tiny.bypass.gguf"),
                                    "--decode-lora", str(d / "nope.gguf"), "--raw"])
    assert out.exit_code != 0 and "decode LoRA adapter not found" in out.output and "nope.gguf" in out.output


def test_routers_from_checkpoint_writes_the_checkpoints_decode_lora(lora_setup, tiny_routers, tiny_gguf_model,
                                                                   tmp_path):
    """first-gguf routers from-checkpoint --lora-out (measuring a --lora-rank run mid-run) writes the checkpoint's
    LoRA as the adapter the run writes at its end: same tensors as DecodeLora.save_gguf, same decoded tokens."""
    import gguf
    from click.testing import CliRunner

    from first_gguf.cli import main

    def from_checkpoint(*args):
        return CliRunner().invoke(main, ["routers", "from-checkpoint", *map(str, args)])

    student, lora, _, m, _, d = lora_setup
    w = np.stack([tiny_routers[1][il] for il in range(N_LAYER)])
    st = {"weight": torch.tensor(w), "bias": torch.tensor([tiny_routers[2][il] for il in range(N_LAYER)]),
          "step": 7, "lora": lora.state_dict()}
    ckpt = tmp_path / "run.ckpt.pt"
    torch.save(st, ckpt)
    base = [ckpt, "--like", tiny_routers[0], "-o", tmp_path / "r.safetensors"]
    out = tmp_path / "run.lora.gguf"
    res = from_checkpoint(*base, "--lora-out", out, "--model", tiny_gguf_model.path)
    assert res.exit_code == 0, res.output
    want = {t.name: np.array(t.data) for t in gguf.GGUFReader(d / "tiny.lora.gguf").tensors}
    got = {t.name: np.array(t.data) for t in gguf.GGUFReader(out).tensors}
    assert sorted(got) == sorted(want) and len(got) == 2 * 7 * N_LAYER
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
    ck = first_gguf.load(d / "tiny.bypass.gguf", n_ctx=1024, n_threads=2, decode_lora=out)
    try:
        assert (ck.generate("the value of", skip_layers=[1, 2], max_tokens=10).tokens
                == m.generate("the value of", skip_layers=[1, 2], max_tokens=10).tokens)
    finally:
        ck.close()
    # refused before anything is written: no --model, a checkpoint without a LoRA, an existing output
    res = from_checkpoint(*base[:-1], tmp_path / "r2.safetensors", "--lora-out", tmp_path / "x.gguf")
    assert res.exit_code != 0 and "--lora-out needs --model" in res.stderr
    assert not (tmp_path / "r2.safetensors").exists()
    res = from_checkpoint(*base[:-1], tmp_path / "r2.safetensors", "--lora-out", tmp_path / "x.gguf",
                          "--model", ckpt)
    assert res.exit_code != 0 and f"cannot read --model {ckpt}" in res.stderr
    assert not (tmp_path / "r2.safetensors").exists() and not (tmp_path / "x.gguf").exists()
    del st["lora"]
    torch.save(st, tmp_path / "plain.ckpt.pt")
    res = from_checkpoint(tmp_path / "plain.ckpt.pt", "--like", tiny_routers[0], "-o", tmp_path / "r3.safetensors",
                          "--lora-out", tmp_path / "y.gguf", "--model", tiny_gguf_model.path)
    assert res.exit_code != 0 and "plain.ckpt.pt has no decode-only LoRA" in res.stderr
    res = from_checkpoint(*base, "--force", "--lora-out", out, "--model", tiny_gguf_model.path)
    assert res.exit_code == 0, res.output
    res = from_checkpoint(*base, "--force", "--lora-out", out)
    assert res.exit_code != 0 and "--lora-out needs --model" in res.stderr
