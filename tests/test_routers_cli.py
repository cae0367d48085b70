"""`first-gguf routers ship` and `first-gguf routers from-checkpoint`: router files for shipping and from a
training checkpoint (convert/ship.py, first_gguf/train/from_checkpoint.py); bad input is one
'Error:' line naming the file or the value."""
from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from first_gguf.cli import main
from first_gguf.convert.router_file import RouterFile, load_router_file, save_router_file

N_LAYER, N_EMBD, RANK = 4, 8, 3


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _error_line(output: str) -> str:
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, output
    return lines[0]


@pytest.fixture
def trained(tmp_path):
    """A router file as training writes it: float32 adapters for every block, block 0's never trained (up = 0)."""
    rng = np.random.default_rng(3)
    byp = {b: (rng.standard_normal((RANK, N_EMBD)).astype(np.float32),
               rng.standard_normal((N_EMBD, RANK)).astype(np.float32)) for b in range(N_LAYER)}
    byp[0] = (byp[0][0], np.zeros((N_EMBD, RANK), np.float32))
    rf = RouterFile(N_LAYER, N_EMBD, {b: rng.standard_normal(N_EMBD).astype(np.float32) for b in range(N_LAYER)},
                    {b: float(b) for b in range(N_LAYER)}, {"architecture": "llama", "n_layer": N_LAYER},
                    {"router_mean": {"ranking": [3, 2, 1, 0]}}, {"command": "test"}, bypasses=byp)
    return save_router_file(tmp_path / "trained.safetensors", rf), rf


# ---------------------------------------------------------------- routers ship
def test_ship_drops_identity_adapters_and_halves_the_rest(trained, tmp_path):
    src, rf = trained
    out = tmp_path / "ship.safetensors"
    res = _invoke("routers", "ship", src, "-o", out)
    assert res.exit_code == 0, res.output
    assert f"wrote {out}: 3 adapters as float16; dropped (identity or not in --blocks): [0]" in res.output
    back = load_router_file(out)
    assert sorted(back.bypasses) == [1, 2, 3]
    for b in (1, 2, 3):
        for got, want in zip(back.bypasses[b], rf.bypasses[b]):
            assert got.dtype == np.float16
            np.testing.assert_array_equal(got, want.astype(np.float16))
    assert back.static_rankings == rf.static_rankings and back.fingerprint == rf.fingerprint
    assert back.provenance == rf.provenance and back.biases == rf.biases
    res = _invoke("routers", "ship", src, "-o", out, "--force", "--blocks", "1,3", "--rank", "2")
    assert res.exit_code == 0, res.output
    back = load_router_file(out)
    assert sorted(back.bypasses) == [1, 3] and back.bypass_rank == 2
    np.testing.assert_array_equal(back.bypasses[3][1], rf.bypasses[3][1][:, :2].astype(np.float16))


@pytest.mark.parametrize("args, shown", [
    (["--blocks", "1,x"], "--blocks '1,x': expected comma-separated block indices"),
    (["--blocks", "1,7"], "--blocks names blocks without an adapter in {src}: [7]"),
    (["--rank", "9"], "--rank 9: expected 1..3"),
])
def test_ship_refuses_bad_values_by_name(trained, tmp_path, args, shown):
    src, _ = trained
    out = tmp_path / "ship.safetensors"
    res = _invoke("routers", "ship", src, "-o", out, *args)
    assert res.exit_code == 1, res.output
    assert shown.format(src=src) in _error_line(res.output)
    assert not out.exists()


def test_ship_refuses_bad_files_by_name(trained, tmp_path):
    src, rf = trained
    res = _invoke("routers", "ship", tmp_path / "none.safetensors", "-o", tmp_path / "o.safetensors")
    assert res.exit_code == 1 and f"router file not found: {tmp_path / 'none.safetensors'}" in _error_line(res.output)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    res = _invoke("routers", "ship", tmp_path / "junk.safetensors", "-o", tmp_path / "o.safetensors")
    assert res.exit_code == 1 and str(tmp_path / "junk.safetensors") in _error_line(res.output)
    plain = save_router_file(tmp_path / "plain.safetensors", RouterFile(N_LAYER, N_EMBD, rf.weights))
    res = _invoke("routers", "ship", plain, "-o", tmp_path / "o.safetensors")
    assert res.exit_code == 1 and f"{plain} has no bypass adapters" in _error_line(res.output)
    (tmp_path / "o.safetensors").write_bytes(b"keep")
    res = _invoke("routers", "ship", src, "-o", tmp_path / "o.safetensors")
    assert res.exit_code == 1 and f"output file exists: {tmp_path / 'o.safetensors'}" in _error_line(res.output)
    assert (tmp_path / "o.safetensors").read_bytes() == b"keep"
    assert not list(tmp_path.glob("*.tmp*"))
    res = _invoke("routers", "ship", src, "-o", tmp_path / "no-dir" / "o.safetensors")
    assert res.exit_code == 1 and "no-dir" in _error_line(res.output)


# ---------------------------------------------------------------- routers from-checkpoint
@pytest.fixture
def checkpoint(trained, tmp_path):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    w = rng.standard_normal((N_LAYER, N_EMBD)).astype(np.float32)
    b = rng.standard_normal(N_LAYER).astype(np.float32)
    down = rng.standard_normal((N_LAYER, 2, N_EMBD)).astype(np.float32)
    up = rng.standard_normal((N_LAYER, N_EMBD, 2)).astype(np.float32)
    state = {"weight": torch.tensor(w).half(), "bias": torch.tensor(b).half(), "step": 20, "format": "params",
             "history": [{"step": s, "loss": 1.0 / s} for s in range(1, 21)], "config": {"model": "m.gguf"},
             "bypass_down": torch.tensor(down).half(), "bypass_up": torch.tensor(up).half()}
    path = tmp_path / "run.ckpt.pt"
    torch.save(state, path)
    return path, state


def test_from_checkpoint_takes_routers_from_the_checkpoint_and_the_rest_from_like(trained, checkpoint, tmp_path):
    like, rf = trained
    ckpt, state = checkpoint
    out = tmp_path / "mid.safetensors"
    res = _invoke("routers", "from-checkpoint", ckpt, "--like", like, "-o", out)
    assert res.exit_code == 0, res.output
    assert f"wrote {out}: step 20, {N_LAYER} bypasses" in res.output
    back = load_router_file(out)
    np.testing.assert_array_equal(np.stack([back.weights[i] for i in range(N_LAYER)]), state["weight"].float().numpy())
    assert back.biases == {i: float(state["bias"][i].float()) for i in range(N_LAYER)}
    assert back.bypass_rank == 2
    assert back.static_rankings == rf.static_rankings and back.fingerprint == rf.fingerprint
    assert back.provenance["step"] == 20 and back.provenance["static_rankings_from"] == str(like)
    assert [h["step"] for h in back.provenance["loss_curve"]] == [10, 20]


def test_from_checkpoint_refuses_bad_input_by_name(trained, checkpoint, tmp_path):
    like, _ = trained
    ckpt, state = checkpoint
    out = tmp_path / "mid.safetensors"
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    res = _invoke("routers", "from-checkpoint", tmp_path / "junk.pt", "--like", like, "-o", out)
    assert res.exit_code == 1 and f"cannot read checkpoint {tmp_path / 'junk.pt'}" in _error_line(res.output)
    other = save_router_file(tmp_path / "other.safetensors",
                             RouterFile(6, N_EMBD, {i: np.zeros(N_EMBD, np.float32) for i in range(6)}))
    res = _invoke("routers", "from-checkpoint", ckpt, "--like", other, "-o", out)
    line = _error_line(res.output)
    assert res.exit_code == 1 and str(ckpt) in line and f"{other} is for 6 x {N_EMBD}" in line
    res = _invoke("routers", "from-checkpoint", ckpt, "--like", tmp_path / "none.safetensors", "-o", out)
    assert res.exit_code == 1 and f"router file not found: {tmp_path / 'none.safetensors'}" in _error_line(res.output)
    res = _invoke("routers", "from-checkpoint", ckpt, "--like", like, "-o", out, "--lora-out", tmp_path / "x.gguf")
    assert res.exit_code == 1 and "--lora-out needs --model" in _error_line(res.output)
    res = _invoke("routers", "from-checkpoint", ckpt, "--like", like, "-o", out, "--lora-out", tmp_path / "x.gguf",
                  "--model", like)
    assert res.exit_code == 1 and f"{ckpt} has no decode-only LoRA" in _error_line(res.output)
    assert not out.exists() and not (tmp_path / "x.gguf").exists()
