"""Training on a device: --device validation, explicit CPU equals the default, the KV-cached sampler
computes a block only for the rows that keep it, the time budget stops cleanly with a resumable checkpoint
(full / compact / params formats, resumed from another path), two gloo processes with on-policy steps and a
time budget, the GPU check script's CPU dry run. CUDA paths are tested where CUDA is available."""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from conftest import N_EMBD, N_LAYER  # noqa: E402

from first_gguf.train import (Bypasses, Routers, Sequence_, TrainConfig, checkpoint_path,  # noqa: E402
                              onpolicy_loss, prefix_forward, resolve_device, sample_decode, sample_prefill, train)

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device here (the GPU machine runs scripts/gpu_check.py)")
PROMPTS = [[1, 17, 45, 99, 120, 33, 8, 76, 201, 150, 64, 12], [1, 40, 41, 42], [1, 250, 9, 31, 77, 5, 6],
           [1, 3, 5, 7, 9]]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _data(n=24, seed=0):
    rng = random.Random(seed)
    pool = [Sequence_([1] + [rng.randrange(3, 300) for _ in range(rng.randrange(4, 12))], [], "p") for _ in range(n)]
    seqs = [Sequence_(p.prompt, [rng.randrange(3, 300) for _ in range(6)], "t") for p in pool]
    return seqs, pool


def _cfg(d, out, **kw):
    base = dict(model=str(d), output=str(out), steps=4, batch_size=2, onpolicy_batch=3, onpolicy_tokens=6,
                bypass_rank=4, budget_min=0.25, budget_max=0.5, bf16=False, checkpoint_every=100,
                n_static_examples=4, lr=1e-2, bypass_lr=1e-2)
    return TrainConfig(**{**base, **kw})


# ------------------------------------------------------------------ device validation
@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "CUDA", "cuda:", "mps", ""])
def test_device_spelling_is_refused_naming_the_value(tmp_path, bad):
    with pytest.raises(ValueError, match=f"device must be auto, cpu, cuda or cuda:N; got {bad!r}"):
        TrainConfig(model="m", output=str(tmp_path / "r.safetensors"), device=bad).validate()
    with pytest.raises(ValueError, match="device must be"):
        resolve_device(bad)


def test_device_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == (torch.device("cuda", 0) if CUDA else torch.device("cpu"))
    if not CUDA:
        for spec in ("cuda", "cuda:0", "cuda:3"):
            with pytest.raises(ValueError, match=f"device '{spec}': CUDA is not available here"):
                resolve_device(spec)
    else:
        n = torch.cuda.device_count()
        assert resolve_device("cuda:0") == torch.device("cuda", 0)
        assert resolve_device("cuda", local_rank=n - 1) == torch.device("cuda", n - 1)
        with pytest.raises(ValueError, match=f"no CUDA device {n}"):
            resolve_device(f"cuda:{n}")


def test_cli_device_errors(tiny, tmp_path):
    from click.testing import CliRunner

    from first_gguf.cli import main

    d, _ = tiny
    out = str(tmp_path / "r.safetensors")
    res = CliRunner().invoke(main, ["train", "--model", str(d), "-o", out, "--device", "tpu"])
    assert res.exit_code != 0 and "got 'tpu'" in res.output and "Traceback" not in res.output
    if not CUDA:
        res = CliRunner().invoke(main, ["train", "--model", str(d), "-o", out, "--device", "cuda:1"])
        assert res.exit_code != 0 and "CUDA is not available" in res.output
        res = CliRunner().invoke(main, ["train", "--model", str(d), "-o", out, "--device", "cpu", "--compile"])
        assert res.exit_code != 0 and "compile is for CUDA devices only" in res.output
    res = CliRunner().invoke(main, ["train", "--model", str(d), "-o", out, "--time-budget", "-3"])
    assert res.exit_code != 0 and "time_budget must be" in res.output
    res = CliRunner().invoke(main, ["train", "--model", str(d), "-o", out, "--resume-from", str(tmp_path / "no.pt")])
    assert res.exit_code != 0 and "resume_from checkpoint not found" in res.output


@pytest.mark.skipif(CUDA, reason="auto means CUDA here")
def test_explicit_cpu_equals_the_default(tiny, tmp_path):
    d, _ = tiny
    seqs, pool = _data()
    a = train(_cfg(d, tmp_path / "a.safetensors"), sequences=seqs, onpolicy_prompts=pool, progress=False)
    b = train(_cfg(d, tmp_path / "b.safetensors", device="cpu"), sequences=seqs, onpolicy_prompts=pool,
              progress=False)
    assert a["device"] == b["device"] == "cpu"
    ha = torch.load(checkpoint_path(tmp_path / "a.safetensors"), weights_only=False)
    hb = torch.load(checkpoint_path(tmp_path / "b.safetensors"), weights_only=False)
    def strip(h):  # the step times differ
        return [{k: v for k, v in x.items() if k != "sec"} for x in h]

    assert strip(ha["history"]) == strip(hb["history"])
    for k in ("weight", "bias", "bypass_down", "bypass_up"):
        assert torch.equal(ha[k], hb[k]), k


# ------------------------------------------------------------------ skipped blocks are not computed
class _RowCounter:
    """Rows entering each decoder layer, per call."""

    def __init__(self, model):
        self.rows = [[] for _ in range(N_LAYER)]
        self.hooks = [layer.register_forward_pre_hook(self._hook(il), with_kwargs=True)
                      for il, layer in enumerate(model.model.layers)]

    def _hook(self, il):
        def hook(mod, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            self.rows[il].append(int(h.shape[0]))
        return hook

    def close(self):
        for h in self.hooks:
            h.remove()


SETS = [(0, 2), (1,), (), (1, 3)]  # block 1: skipped by 2 rows; 0, 2, 3: by 1; none by all


def test_decode_runs_a_block_only_for_the_rows_that_keep_it(tiny):
    """Per-sequence skip sets: every decode step runs block l on exactly the rows that keep it (the others'
    work is gone, not computed and masked), prefix_forward likewise; a block that every row skips is not run."""
    _, model = tiny
    gates = torch.tensor([[0.0 if il in s else 1.0 for il in range(N_LAYER)] for s in SETS])
    kept = [int(gates[:, il].sum()) for il in range(N_LAYER)]
    assert kept == [3, 2, 3, 3]
    bp = Bypasses(N_LAYER, N_EMBD, 4, 1e-5)
    state = sample_prefill(model, PROMPTS, pad=0, bf16=False)
    c = _RowCounter(model)
    try:
        out = sample_decode(model, state, gates, max_new=7, temperature=1.0,
                            generator=torch.Generator().manual_seed(0), stop_ids=set(), pad=0, bypass=bp)
        assert [len(o) for o in out] == [7] * 4
        assert c.rows == [[k] * 6 for k in kept]  # 6 forward steps (the 7th token needs none)
        c.rows = [[] for _ in range(N_LAYER)]
        with torch.no_grad():
            prefix_forward(model, state, out, gates, bypass=bp)
            prefix_forward(model, state, out)  # the teacher: every row, every block
        assert c.rows == [[k, 4] for k in kept]
        c.rows = [[] for _ in range(N_LAYER)]
        all_skip_1 = gates.clone()
        all_skip_1[:, 1] = 0
        sample_decode(model, state, all_skip_1, max_new=3, temperature=0.0, generator=None, stop_ids=set(), pad=0)
        assert c.rows[1] == [] and c.rows[0] == [3, 3]
    finally:
        c.close()


def test_onpolicy_step_rows_per_block(tiny):
    """A whole on-policy step: the block calls of the student's decode carry only the rows that keep the block
    (the step's sets come from the routers; counted against the sets it drew)."""
    _, model = tiny
    cfg = TrainConfig(model="m", output="o", budget_min=0.25, budget_max=0.5, bf16=False, onpolicy_tokens=5,
                      set_noise=0.5)
    routers = Routers(N_LAYER, N_EMBD, seed=3)
    c = _RowCounter(model)
    seen = {}
    import first_gguf.train.losses as T  # where onpolicy_loss looks sample_decode up

    real = T.sample_decode

    def spy(model_, state, gates, **kw):
        seen["gates"] = gates.clone()
        return real(model_, state, gates, **kw)

    T.sample_decode = spy
    try:
        loss, info = onpolicy_loss(model, routers, PROMPTS * 3, cfg, random.Random(1), torch.Generator().manual_seed(1),
                                   pad=0, stop_ids=set())
    finally:
        T.sample_decode = real
        c.close()
    g = seen["gates"]
    assert torch.isfinite(loss) and info["otokens"] == 5
    for il in range(N_LAYER):
        kept = int((g[:, il] > 0.5).sum())
        # prefill (12 rows), 4 decode steps with the kept rows, then teacher (12), student (kept), swap (any)
        calls = c.rows[il]
        assert 0 < kept < 12  # the drawn sets differ between rows and every block is kept by some
        assert calls[:6] == [12] + [kept] * 4 + [12], (il, calls)  # prefill, 4 decode steps, teacher
        assert calls[6] == kept  # the student's scoring pass


# ------------------------------------------------------------------ time budget, checkpoints, resume
def test_time_budget_stops_with_a_resumable_checkpoint(tiny, tmp_path):
    d, _ = tiny
    seqs, pool = _data()
    out = tmp_path / "r.safetensors"
    s = train(_cfg(d, out, steps=50, time_budget=1e-3), sequences=seqs, onpolicy_prompts=pool, progress=False)
    assert s["stopped_at_time_budget"] and s["steps"] == 1 and s["steps_this_run"] == 1
    assert out.exists()  # the outputs are written at the stop
    ck = torch.load(checkpoint_path(out), weights_only=False)
    assert ck["step"] == 1 and len(ck["history"]) == 1 and ck["format"] == "full"
    s2 = train(_cfg(d, out, steps=3, resume=True), sequences=seqs, onpolicy_prompts=pool, progress=False)
    assert not s2["stopped_at_time_budget"] and s2["steps"] == 3 and s2["steps_this_run"] == 2
    ck = torch.load(checkpoint_path(out), weights_only=False)
    assert [h["step"] for h in ck["history"]] == [1, 2, 3]
    with pytest.raises(ValueError, match="leaves nothing to train"):
        train(_cfg(d, out, steps=3, resume=True), sequences=seqs, onpolicy_prompts=pool, progress=False)


def test_resume_in_slices_equals_one_run(tiny, tmp_path):
    """A full-format checkpoint resumes exactly: 2 + 2 steps give the parameters of 4 steps in one run."""
    d, _ = tiny
    seqs, pool = _data()
    one = tmp_path / "one.safetensors"
    train(_cfg(d, one, steps=4), sequences=seqs, onpolicy_prompts=pool, progress=False)
    sl = tmp_path / "sl.safetensors"
    train(_cfg(d, sl, steps=4, time_budget=1e-3), sequences=seqs, onpolicy_prompts=pool, progress=False)
    train(_cfg(d, sl, steps=4, resume=True), sequences=seqs, onpolicy_prompts=pool, progress=False)
    a, b = (torch.load(checkpoint_path(p), weights_only=False) for p in (one, sl))
    for k in ("weight", "bias", "bypass_down", "bypass_up"):
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    assert [h["loss"] for h in a["history"]] == pytest.approx([h["loss"] for h in b["history"]], abs=1e-5)


@pytest.mark.parametrize("fmt", ["compact", "params"])
def test_compact_checkpoints_resume_from_another_path(tiny, tmp_path, fmt):
    """fp16 checkpoints (with bf16 Adam moments, or parameters alone) are smaller than full ones and resume
    from any path, on a copy of the model elsewhere (the GPU machine's), continuing the step count."""
    d, _ = tiny
    seqs, pool = _data()
    full = tmp_path / "full.safetensors"
    train(_cfg(d, full, steps=2, lora_rank=2), sequences=seqs, onpolicy_prompts=pool, progress=False)
    out = tmp_path / "c.safetensors"
    train(_cfg(d, out, steps=2, lora_rank=2, checkpoint_format=fmt), sequences=seqs, onpolicy_prompts=pool,
          progress=False)
    ck_full, ck = checkpoint_path(full), checkpoint_path(out)
    st = torch.load(ck, weights_only=False)
    assert st["format"] == fmt and st["weight"].dtype == torch.float16 and st["bypass_up"].dtype == torch.float16
    assert all(v.dtype == torch.float16 for v in st["lora"].values())
    assert ("opt" in st) == (fmt == "compact")
    if fmt == "compact":
        moments = [v for s in st["opt"]["state"].values() for k, v in s.items() if k.startswith("exp_avg")]
        assert moments and all(v.dtype == torch.bfloat16 for v in moments)
    # half / a sixth of the bytes of full (fp32 parameters + 2 fp32 moments), less per-tensor overhead
    assert os.path.getsize(ck) < {"compact": 0.75, "params": 0.4}[fmt] * os.path.getsize(ck_full)
    moved = tmp_path / "elsewhere"
    shutil.copytree(d, moved)  # the same model at another path
    brought = tmp_path / "brought" / "c.ckpt.pt"
    brought.parent.mkdir()
    shutil.copy(ck, brought)
    out2 = tmp_path / "next" / "c.safetensors"
    out2.parent.mkdir()
    s = train(_cfg(moved, out2, steps=4, lora_rank=2, checkpoint_format=fmt, resume_from=str(brought)),
              sequences=seqs, onpolicy_prompts=pool, progress=False)
    assert s["steps"] == 4 and s["steps_this_run"] == 2
    st2 = torch.load(checkpoint_path(out2), weights_only=False)
    assert [h["step"] for h in st2["history"]] == [1, 2, 3, 4]
    # another model is refused, naming the checkpoint
    other = tmp_path / "other"
    shutil.copytree(d, other)
    from safetensors.torch import load_file, save_file

    w = load_file(other / "model.safetensors")
    w["model.norm.weight"] = w["model.norm.weight"] * 1.5
    save_file(w, other / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="was trained on another model"):
        train(_cfg(other, tmp_path / "x.safetensors", steps=4, lora_rank=2, resume_from=str(brought)),
              sequences=seqs, onpolicy_prompts=pool, progress=False)
    with pytest.raises(ValueError, match="bypass down matrices"):
        train(_cfg(moved, tmp_path / "y.safetensors", steps=4, lora_rank=2, bypass_rank=8, resume_from=str(brought)),
              sequences=seqs, onpolicy_prompts=pool, progress=False)


# ------------------------------------------------------------------ several processes
def test_two_gloo_processes_onpolicy_with_time_budget(tiny, tmp_path):
    """torchrun, 2 CPU processes (gloo): on-policy steps with bypasses and a time budget; both ranks stop at
    the same step (rank 0 decides), the checkpoint is written and resumes under torchrun."""
    d, _ = tiny
    seqs, pool = _data()
    data = tmp_path / "data.json"
    data.write_text(json.dumps({"seqs": [[s.prompt, s.cont] for s in seqs]}))
    script = tmp_path / "run.py"
    script.write_text(f"""
import json, os, sys
import torch
torch.set_num_threads(1)
from first_gguf.train import Sequence_, TrainConfig, train
raw = json.load(open({str(data)!r}))["seqs"]
seqs = [Sequence_(p, c, "t") for p, c in raw]
pool = [Sequence_(p, [], "p") for p, _ in raw]
kw = json.loads(sys.argv[1])
s = train(TrainConfig(model={str(d)!r}, output={str(tmp_path / 'ddp.safetensors')!r}, batch_size=1, onpolicy_batch=2,
                      onpolicy_tokens=5, bypass_rank=4, budget_min=0.25, budget_max=0.5, bf16=False,
                      n_static_examples=4, device="cpu", **kw), sequences=seqs, onpolicy_prompts=pool, progress=False)
# one file per rank: two processes printing to one pipe can interleave their lines
with open(os.path.join(sys.argv[2], "summary%s.json" % os.environ["RANK"]), "w") as f:
    json.dump(s, f)
""")

    def run(kw, port):
        out = tmp_path / f"out{port}"
        out.mkdir()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
               str(script), json.dumps(kw), str(out)]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert res.returncode == 0, res.stderr[-3000:]
        return [json.loads((out / f"summary{r}.json").read_text()) for r in (0, 1)]

    sums = run({"steps": 40, "time_budget": 1e-3}, 29631)
    assert len(sums) == 2 and all(s["world_size"] == 2 and s["stopped_at_time_budget"] for s in sums)
    assert sums[0]["steps"] == sums[1]["steps"] == 1
    assert sums[0]["onpolicy_samples_per_s"] > 0
    sums = run({"steps": 3, "resume": True}, 29632)
    assert [s["steps_this_run"] for s in sums] == [2, 2]


# ------------------------------------------------------------------ CUDA (skipped without)
@needs_cuda
def test_cuda_onpolicy_step_matches_cpu(tiny):
    """The same on-policy step on CUDA (fp32, greedy: no generator difference) and on the CPU."""
    _, model = tiny
    cfg = TrainConfig(model="m", output="o", budget_min=0.25, budget_max=0.5, bf16=False, onpolicy_tokens=6,
                      onpolicy_temperature=0.0)
    res = {}
    for dev in ("cpu", "cuda"):
        m = model.to(dev)
        r, bp = Routers(N_LAYER, N_EMBD, seed=2), Bypasses(N_LAYER, N_EMBD, 4, 1e-5)
        bp.up.data = torch.randn(bp.up.shape, generator=torch.Generator().manual_seed(0)) * 0.3
        r.to(dev), bp.to(dev)
        loss, info = onpolicy_loss(m, r, PROMPTS, cfg, random.Random(0), None, pad=0, stop_ids=set(), bypass=bp)
        res[dev] = (float(loss), info["okl"])
    model.to("cpu")
    assert res["cpu"] == pytest.approx(res["cuda"], rel=1e-3, abs=1e-5)


@needs_cuda
def test_cuda_train_bf16_runs(tiny, tmp_path):
    d, _ = tiny
    seqs, pool = _data()
    s = train(_cfg(d, tmp_path / "r.safetensors", device="cuda", bf16=True), sequences=seqs, onpolicy_prompts=pool,
              progress=False)
    assert s["device"].startswith("cuda") and s["last_loss"] == s["last_loss"]


# ------------------------------------------------------------------ the GPU check script, dry run on the CPU
def test_gpu_check_dry_run_on_cpu_without_the_runtime(tmp_path):
    """scripts/gpu_check.py with a tiny random model on the CPU, as the GPU machine runs it (no llama.cpp
    runtime there: simulated), prints samples per second and writes its report."""
    rep = tmp_path / "report.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--device", "cpu", "--tiny-only", "--steps", "2",
           "--batches", "4", "--tokens", "6", "--no-runtime", "--threads", "1", "--report", str(rep)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "samples/s" in res.stdout
    r = json.loads(rep.read_text())
    assert r["runs"] and r["runs"][0]["samples_per_s"] > 0 and r["runs"][0]["device"] == "cpu"
