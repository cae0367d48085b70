"""Router training: the torch gated forward matches the runtime, training lowers the objective,
routers learn input-dependent choices on a synthetic two-task model, DDP, config errors."""
from __future__ import annotations

import json
import random
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import N_LAYER  # noqa: E402

from first_gguf.train import (Routers, Sequence_, TrainConfig, attn_normed, choose_gates,  # noqa: E402
                              gated_forward, train)

PROMPT = [1, 17, 45, 99, 120, 33, 8, 76, 201, 150, 64, 12]
CONT = [55, 90, 130, 7, 66, 181, 23, 140]


def _logprobs(model, prompt, cont, gates):
    ids = torch.tensor([prompt + cont])
    with torch.no_grad():
        hid, _ = gated_forward(model, ids, torch.tensor([len(prompt)]), gates)
        ls = torch.log_softmax(model.get_output_embeddings()(hid[0]).double(), -1)
    n = len(prompt)
    return np.array([float(ls[n - 1 + i, t]) for i, t in enumerate(cont)])


@pytest.mark.parametrize("skip", [(), (1,), (0, 2), (3,)])
def test_training_forward_equals_runtime_decode(tiny, tiny_gguf_model, skip):
    """The gated forward used for training == the runtime's masked decode (f32 GGUF; F16 K/V -> 5e-3)."""
    _, model = tiny
    gates = torch.tensor([[0.0 if il in skip else 1.0 for il in range(N_LAYER)]])
    ours = _logprobs(model, PROMPT, CONT, gates)
    rt = np.array(tiny_gguf_model.score_tokens(PROMPT, CONT, skip_layers=list(skip)).logprobs)
    assert float(np.max(np.abs(ours - rt))) < 5e-3


def test_router_definition_equals_runtime(tiny, tiny_gguf_model, tiny_routers):
    _, model = tiny
    _, w, b = tiny_routers
    r = Routers(N_LAYER, 64)
    r.weight.data = torch.tensor(np.stack([w[i] for i in range(N_LAYER)]))
    r.bias.data = torch.tensor([b[i] for i in range(N_LAYER)])
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        _, inputs = gated_forward(model, ids, torch.tensor([len(PROMPT)]), capture=True)
        s = r.scores(attn_normed(model, inputs[:N_LAYER]), torch.ones(1, len(PROMPT), dtype=torch.bool))
    rt = tiny_gguf_model.score_tokens(PROMPT, CONT).router_scores
    np.testing.assert_allclose(s[0].numpy(), rt, atol=1e-3)


def test_choose_gates_skips_the_k_lowest():
    s = torch.tensor([[0.5, 0.1, 0.9, 0.3], [0.2, 0.8, 0.7, 0.6]], requires_grad=True)
    g, hard = choose_gates(s, torch.tensor([2, 1]), 0.5)
    assert hard.tolist() == [[1, 0, 1, 0], [0, 1, 1, 1]]
    assert torch.equal(g.detach(), hard)
    g.sum().backward()
    assert s.grad.abs().sum() > 0  # straight-through gradient reaches the scores


def _random_seqs(n, rng, lo=3, hi=300, task="t"):
    return [Sequence_([1] + [rng.randrange(lo, hi) for _ in range(11)], [rng.randrange(lo, hi) for _ in range(8)], task)
            for _ in range(n)]


def _objective(model, routers, seqs, k):
    """KL(full || skipped) with the routers' hard choice of k blocks per sequence."""
    from first_gguf.train.data import _batch
    from first_gguf.train.losses import _kl_positions

    ids, n_prompt, length = _batch(seqs, 0)
    T = ids.shape[1]
    with torch.no_grad():
        hid, inputs = gated_forward(model, ids, n_prompt, capture=True)
        s = routers.scores(attn_normed(model, inputs[:N_LAYER]), torch.arange(T)[None] < n_prompt[:, None])
        _, hard = choose_gates(s, torch.full((len(seqs),), k), 0.5)
        hid_s, _ = gated_forward(model, ids, n_prompt, hard)
        pos = _kl_positions(n_prompt, length, T)
        head = model.get_output_embeddings()
        t, q = torch.log_softmax(head(hid[pos]), -1), torch.log_softmax(head(hid_s[pos]), -1)
        return float((t.exp() * (t - q)).sum(-1).mean())


def test_training_lowers_the_objective(tiny, tmp_path):
    d, model = tiny
    seqs = _random_seqs(32, random.Random(0))
    cfg = TrainConfig(model=str(d), output=str(tmp_path / "r.safetensors"), steps=40, batch_size=8, lr=2e-2,
                      budget_min=0.25, budget_max=0.5, bf16=False, checkpoint_every=20, n_static_examples=8)
    before = _objective(model, Routers(N_LAYER, 64, seed=0), seqs, 1)
    summary = train(cfg, sequences=seqs, progress=False)
    from first_gguf.convert.router_file import load_router_file

    rf = load_router_file(cfg.output)
    trained = Routers(N_LAYER, 64)
    trained.weight.data = torch.tensor(np.stack([rf.weights[i] for i in range(N_LAYER)]))
    trained.bias.data = torch.tensor([rf.biases[i] for i in range(N_LAYER)])
    after = _objective(model, trained, seqs, 1)
    print(f"objective (KL at k=1) before {before:.4f} after {after:.4f}; loss {summary['first_loss']:.4f} -> "
          f"{summary['last_loss']:.4f}")
    assert after < before
    assert set(rf.static_rankings) == {"router_mean", "block_influence"}
    assert sorted(rf.static_rankings["block_influence"]["ranking"]) == list(range(N_LAYER))
    assert rf.provenance["config"]["steps"] == 40 and rf.provenance["loss_curve"]
    # resume from the checkpoint continues instead of restarting
    cfg2 = TrainConfig(**{**cfg.__dict__, "steps": 45, "resume": True})
    s2 = train(cfg2, sequences=seqs, progress=False)
    assert s2["steps"] == 45


# ------------------------------------------------------- synthetic two tasks
def _two_task_model(path):
    """4 blocks; residual dims 0-31 carry task A, 32-63 task B. Block 1 only acts on A, block 2 only
    on B, blocks 0 and 3 on both (block-diagonal). So for task A skipping block 2 is free and
    skipping block 1 is not, and the other way round for task B."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False, initializer_range=0.3, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(3)
    m = LlamaForCausalLM(cfg).eval()
    res = torch.arange(64) >= 32                   # False: A, True: B
    q_out = torch.arange(64) >= 32
    kv_out = torch.arange(32) >= 16
    ff = torch.arange(128) >= 64

    def restrict(lin, out_lab, in_lab, only=None):
        w = lin.weight.data
        keep = out_lab[:, None] == in_lab[None, :]
        if only is not None:
            keep &= (out_lab[:, None] == only) & (in_lab[None, :] == only)
        w *= keep

    with torch.no_grad():
        for il, layer in enumerate(m.model.layers):
            only = {1: False, 2: True}.get(il)
            a, f = layer.self_attn, layer.mlp
            restrict(a.q_proj, q_out, res, only)
            restrict(a.k_proj, kv_out, res, only)
            restrict(a.v_proj, kv_out, res, only)
            restrict(a.o_proj, res, q_out, only)
            restrict(f.gate_proj, ff, res, only)
            restrict(f.up_proj, ff, res, only)
            restrict(f.down_proj, res, ff, only)
        tok_lab = torch.arange(200) >= 100
        m.model.embed_tokens.weight.data *= (tok_lab[:, None] == res[None, :])
        m.lm_head.weight.data *= (tok_lab[:, None] == res[None, :])
    m.save_pretrained(path)
    return m


def test_routers_learn_input_dependent_choices(tmp_path):
    model = _two_task_model(tmp_path / "two-task")
    rng = random.Random(0)
    seqs = _random_seqs(32, rng, 3, 100, "A") + _random_seqs(32, rng, 100, 200, "B")
    cfg = TrainConfig(model=str(tmp_path / "two-task"), output=str(tmp_path / "r.safetensors"), steps=60,
                      batch_size=8, lr=3e-2, budget_min=0.25, budget_max=0.25, bf16=False,
                      n_static_examples=8)
    train(cfg, sequences=seqs, progress=False)
    from first_gguf.convert.router_file import load_router_file

    rf = load_router_file(cfg.output)
    r = Routers(4, 64)
    r.weight.data = torch.tensor(np.stack([rf.weights[i] for i in range(4)]))
    r.bias.data = torch.tensor([rf.biases[i] for i in range(4)])
    chosen = {}
    for task in "AB":
        ts = [s for s in seqs if s.task == task]
        from first_gguf.train.data import _batch

        ids, n_prompt, _ = _batch(ts, 0)
        with torch.no_grad():
            _, inputs = gated_forward(model, ids, n_prompt, capture=True)
            s = r.scores(attn_normed(model, inputs[:4]), torch.arange(ids.shape[1])[None] < n_prompt[:, None])
        chosen[task] = np.bincount(s.argmin(1).numpy(), minlength=4)
    print("lowest-score block per task:", {k: v.tolist() for k, v in chosen.items()})
    assert chosen["A"].argmax() == 2 and chosen["A"][2] >= 0.9 * len(seqs) / 2
    assert chosen["B"].argmax() == 1 and chosen["B"][1] >= 0.9 * len(seqs) / 2


# ------------------------------------------------------------------- errors
def test_bad_config_and_data(tmp_path, tiny):
    d, _ = tiny
    base = dict(model=str(d), output=str(tmp_path / "r.safetensors"))
    for kw, pat in [({"steps": 0}, "steps must be >= 1"), ({"budget_min": 0.6, "budget_max": 0.5}, "budget_min"),
                    ({"lr": -1}, "lr must be > 0"), ({"lora_rank": -1}, "lora_rank")]:
        with pytest.raises(ValueError, match=pat):
            TrainConfig(**base, **kw).validate()
    with pytest.raises(ValueError, match="output folder does not exist"):
        TrainConfig(model=str(d), output=str(tmp_path / "no" / "r.safetensors")).validate()
    with pytest.raises(ValueError, match="model not found"):
        train(TrainConfig(model=str(tmp_path / "missing"), output=base["output"]), sequences=[], progress=False)
    with pytest.raises(ValueError, match="no training sequences"):
        train(TrainConfig(**base), sequences=[], progress=False)
    from first_gguf.datasets.tasks import parse_tasks

    with pytest.raises(ValueError, match="reserved"):
        parse_tasks("summarization,xsum")
    with pytest.raises(ValueError, match="unknown task 'cooking'"):
        parse_tasks("cooking")
    from first_gguf.datasets.tasks import is_reserved

    # German only as a whole word: "self-student" and "decode" contain "de" and are not reserved
    assert [is_reserved(t) for t in ("de", "translation-de", "en_de", "gem/xsum", "XSum", "strategyqa_cot")] == [True] * 6
    assert [is_reserved(t) for t in ("self-student", "decode", "docs", "translation")] == [False] * 4
    from click.testing import CliRunner

    from first_gguf.cli import main

    cfgf = tmp_path / "c.json"
    cfgf.write_text(json.dumps({"stepz": 3}))
    res = CliRunner().invoke(main, ["train", "--model", str(d), "-o", base["output"], "--config", str(cfgf)])
    assert res.exit_code != 0 and "unknown keys ['stepz']" in res.output
    res = CliRunner().invoke(main, ["train", "--model", str(d), "-o", base["output"], "--data", "strategyqa"])
    assert res.exit_code != 0 and "reserved" in res.output


def test_ddp_two_cpu_processes(tiny_gguf_model, tmp_path):
    """The same entry point under torchrun with 2 processes (gloo), on a GGUF loaded by transformers."""
    d = tiny_gguf_model.path
    out = tmp_path / "ddp.safetensors"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29617",
           "-m", "first_gguf.train", "--model", str(d), "--data", "docs", "-o", str(out), "--steps", "4",
           "--batch-size", "2", "--no-bf16", "--threads", "1", "--max-examples-per-task", "16"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    from first_gguf.convert.router_file import load_router_file

    rf = load_router_file(out)
    assert rf.provenance["summary"]["world_size"] == 2
    assert rf.provenance["tasks"] == ["docs"]


def test_decode_lora_is_trained_and_written_as_llama_cpp_adapter(tiny, tmp_path):
    """--lora-rank: a decode-only LoRA is trained with the routers and written as a llama.cpp adapter GGUF."""
    import gguf
    import torch

    from first_gguf.convert.lora_gguf import rope_permute
    from first_gguf.train import DecodeLora, gated_forward

    d, model = tiny
    seqs = _random_seqs(8, random.Random(1))
    out = tmp_path / "r.safetensors"
    cfg = TrainConfig(model=str(d), output=str(out), steps=3, batch_size=4, lora_rank=2, lora_lr=1e-2,
                      bypass_rank=2, bf16=False, n_static_examples=4)
    train(cfg, sequences=seqs, progress=False)
    adapter = tmp_path / "r.lora.gguf"
    r = gguf.GGUFReader(adapter)
    assert bytes(r.fields["general.type"].parts[-1]).decode() == "adapter"
    assert bytes(r.fields["adapter.type"].parts[-1]).decode() == "lora"
    assert float(r.fields["adapter.lora.alpha"].parts[-1][0]) == 4.0
    names = {t.name for t in r.tensors}
    n_layer = model.config.num_hidden_layers
    assert len(names) == n_layer * 7 * 2 and "blk.0.attn_q.weight.lora_a" in names
    b_q = next(t for t in r.tensors if t.name == "blk.0.attn_q.weight.lora_b")
    assert float(np.abs(b_q.data).max()) > 0  # B moved away from its zero init
    # the checkpoint holds the HF-layout tensors; the file holds q's B rope-permuted, A as is
    state = torch.load(out.with_suffix(".ckpt.pt"), weights_only=False)["lora"]
    np.testing.assert_array_equal(
        np.asarray(b_q.data).reshape(state["0.q_proj.b"].shape),
        rope_permute(state["0.q_proj.b"].numpy(), model.config.num_attention_heads))
    a_v = next(t for t in r.tensors if t.name == "blk.1.attn_v.weight.lora_a")
    np.testing.assert_array_equal(np.asarray(a_v.data).reshape(state["1.v_proj.a"].shape), state["1.v_proj.a"].numpy())

    # decode-only: outside active() (and on prompt positions) the model is the frozen one
    lora = DecodeLora(model, 2)
    for p in lora.parameters():
        torch.nn.init.normal_(p.data)
    ids = torch.tensor([[1, 5, 9, 3, 7, 2]])
    n_prompt = torch.tensor([3])
    cont = (torch.arange(6)[None, :] >= 3)[..., None]
    with torch.no_grad():
        base, _ = gated_forward(model, ids, n_prompt)
        with lora.active(cont):
            on, _ = gated_forward(model, ids, n_prompt)
        off, _ = gated_forward(model, ids, n_prompt)
    torch.testing.assert_close(off, base, rtol=0, atol=0)
    torch.testing.assert_close(on[:, :3], base[:, :3], rtol=0, atol=0)
    assert float((on[:, 3:] - base[:, 3:]).abs().max()) > 1e-3
    for h in lora._hooks:
        h.remove()


def test_lr_schedule_task_balance_and_docs_supplement(tmp_path, tiny):
    from first_gguf.train import lr_factor, task_sampler

    # cosine: starts at 1, ends at lr_final, never increases; constant stays 1
    f = [lr_factor("cosine", s, 50, 0.1) for s in range(50)]
    assert f[0] == pytest.approx(1.0) and f[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f, f[1:]))
    assert {lr_factor("constant", s, 50, 0.1) for s in range(50)} == {1.0}
    # balanced sampling draws tasks uniformly however unequal their sizes
    tasks = ["a"] * 95 + ["b"] * 5
    rng = random.Random(0)
    draws = [tasks[task_sampler(tasks, True)(rng)] for _ in range(4000)]
    assert 0.45 < draws.count("b") / len(draws) < 0.55
    # unbalanced sampling is the plain uniform draw over sequences (earlier runs stay reproducible)
    r1, r2 = random.Random(5), random.Random(5)
    assert [task_sampler(tasks, False)(r1) for _ in range(20)] == [r2.randrange(100) for _ in range(20)]
    d, _ = tiny
    base = dict(model=str(d), output=str(tmp_path / "r.safetensors"))
    for kw, pat in [({"lr_schedule": "linear"}, "lr_schedule must be one of"), ({"lr_final": 2}, "lr_final"),
                    ({"docs_supplement": True, "tasks": ["qa"]}, "docs_supplement")]:
        with pytest.raises(ValueError, match=pat):
            TrainConfig(**base, **kw).validate()


def test_docs_supplement_is_disjoint_from_the_docs_task():
    from first_gguf.datasets.tasks import docs_supplement, load_task

    task = load_task("docs")
    extra = docs_supplement()
    assert len(extra) > 3 * len(task)
    assert {e.task for e in extra} == {"docs"} and all(e.uid.startswith("supplement:") for e in extra)
    assert len({e.uid for e in extra}) == len(extra)
    texts = {e.target for e in task} | {e.messages[0]["content"].split("\n", 1)[1] for e in task}
    for e in extra:
        assert e.target not in texts and e.messages[0]["content"].split("\n", 1)[1] not in texts
        assert e.messages[0]["content"].startswith("Continue this Python documentation for ")


def test_extra_data_jsonl(tmp_path, tiny):
    from first_gguf.datasets.tasks import read_examples_jsonl

    good = tmp_path / "extra.jsonl"
    good.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}], "target": "Hello there."}) + "\n\n"
                    + json.dumps({"messages": [{"role": "user", "content": "Q"}], "target": "A.", "task": "self"})
                    + "\n")
    ex = read_examples_jsonl(good)
    assert [(e.task, e.target) for e in ex] == [("extra", "Hello there."), ("self", "A.")]
    assert ex[0].messages == ({"role": "user", "content": "Hi"},)
    cases = [("not json\n", r"bad.jsonl:1: not JSON"),
             ("[1, 2]\n", r"bad.jsonl:1: expected a JSON object"),
             ('{"target": "x"}\n', r"bad.jsonl:1: expected \"messages\""),
             ('{"messages": [{"role": "user", "content": "q"}]}\n', r"bad.jsonl:1: expected \"target\""),
             ('\n{"messages": [{"role": "user", "content": "q"}], "target": "a", "task": "xsum"}\n',
              r"bad.jsonl:2: task 'xsum' is reserved"),
             ("\n", "holds no examples")]
    for text, pat in cases:
        (tmp_path / "bad.jsonl").write_text(text)
        with pytest.raises(ValueError, match=pat):
            read_examples_jsonl(tmp_path / "bad.jsonl")
    d, _ = tiny
    with pytest.raises(ValueError, match="extra_data file not found"):
        TrainConfig(model=str(d), output=str(tmp_path / "r.safetensors"),
                    extra_data=str(tmp_path / "missing.jsonl")).validate()
