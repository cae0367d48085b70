"""On-policy distillation: the KV-cached sampler decodes exactly like the training forward (and so like the
runtime), sampling is reproducible, set noise stays near the routers' choice, and training on the
student's own samples lowers KL(student || full) on them."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import N_EMBD, N_LAYER  # noqa: E402

from first_gguf.train import (Bypasses, DecodeLora, Routers, Sequence_, TrainConfig, draw_sets,  # noqa: E402
                              gated_forward, onpolicy_loss, prefix_forward, sample_decode, sample_prefill,
                              train)

PROMPTS = [[1, 17, 45, 99, 120, 33, 8, 76, 201, 150, 64, 12], [1, 40, 41, 42], [1, 250, 9, 31, 77, 5, 6]]


def _greedy_by_recompute(model, prompt, gates, n, bypass=None, lora=None):
    """Greedy decoding by re-running the whole training forward (no cache) for every new token."""
    toks = []
    for _ in range(n):
        ids = torch.tensor([prompt + toks])
        ctx = lora.active((torch.arange(ids.shape[1]) >= len(prompt))[None, :, None]) if lora else _null()
        with torch.no_grad(), ctx:
            hid, _ = gated_forward(model, ids, torch.tensor([len(prompt)]), gates, bypass=bypass)
            toks.append(int(model.get_output_embeddings()(hid[0, -1]).argmax()))
    return toks


def _random_adapters(model, seed):
    """Bypasses and a decode LoRA that change the model (random non-zero up / B matrices)."""
    g = torch.Generator().manual_seed(seed)
    bypass = Bypasses(N_LAYER, N_EMBD, 4, 1e-5, seed=1)
    bypass.up.data = torch.randn(bypass.up.shape, generator=g) * 0.5
    lora = DecodeLora(model, 2, seed=1)
    for k in lora.b:
        lora.b[k].data = torch.randn(lora.b[k].shape, generator=g) * 0.05
    return bypass, lora


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


@pytest.mark.parametrize("skip", [[(), (), ()], [(1,), (1,), (1,)], [(0, 2), (1,), ()], [(3,), (2, 3), (1, 3)]])
def test_cached_sampler_equals_recomputed_greedy(tiny, skip):
    """Left-padded batch, per-sequence sets (a block skipped by all, by some, by none), bypasses and a
    decode LoRA: the KV-cached greedy sampler gives the tokens of a full recompute per sequence."""
    _, model = tiny
    bypass, lora = _random_adapters(model, 3)
    gates = torch.tensor([[0.0 if il in s else 1.0 for il in range(N_LAYER)] for s in skip])
    try:
        state = sample_prefill(model, PROMPTS, pad=0, bf16=False)
        got = sample_decode(model, state, gates, max_new=10, temperature=0.0, generator=None, stop_ids=set(), pad=0,
                            bypass=bypass, lora=lora)
        for i, p in enumerate(PROMPTS):
            assert got[i] == _greedy_by_recompute(model, p, gates[i:i + 1], 10, bypass, lora), f"sequence {i}"
    finally:
        for h in lora._hooks:
            h.remove()


def test_prefix_forward_equals_gated_forward(tiny):
    """The continuation-only passes of on-policy training (prompt from the prefill cache) give the log-probs
    of the full gated forward over prompt + continuation, teacher and skipped, with bypasses and LoRA."""
    _, model = tiny
    bypass, lora = _random_adapters(model, 4)
    conts = [[5, 9, 200, 31, 7], [60, 61], [300, 12, 12, 90]]
    gates = torch.tensor([[1.0, 0.0, 1.0, 1.0], [1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 1.0, 0.0]])
    head = model.get_output_embeddings()
    try:
        state = sample_prefill(model, PROMPTS, pad=0, bf16=False)
        for gt in (None, gates):
            with torch.no_grad():
                ours = torch.log_softmax(head(prefix_forward(model, state, conts, gt, bypass=bypass, lora=lora)), -1)
            for i, (p, c) in enumerate(zip(PROMPTS, conts)):
                ids = torch.tensor([p + c])
                ctx = lora.active((torch.arange(ids.shape[1]) >= len(p))[None, :, None]) if gt is not None else _null()
                with torch.no_grad(), ctx:
                    hid, _ = gated_forward(model, ids, torch.tensor([len(p)]), None if gt is None else gt[i:i + 1],
                                           bypass=bypass)
                    ref = torch.log_softmax(head(hid[0, len(p):]), -1)
                assert torch.allclose(ours[i, : len(c)], ref, atol=1e-4), (i, gt is None)
    finally:
        for h in lora._hooks:
            h.remove()


def test_sampling_is_reproducible_and_stops(tiny):
    _, model = tiny
    gates = torch.ones(len(PROMPTS), N_LAYER)
    gates[:, 1] = 0

    def run(seed, stop=frozenset()):
        st = sample_prefill(model, PROMPTS, pad=0, bf16=False)
        return sample_decode(model, st, gates, max_new=12, temperature=1.0, generator=torch.Generator().manual_seed(seed),
                             stop_ids=set(stop), pad=0)

    a, b, c = run(5), run(5), run(6)
    assert a == b and a != c
    assert all(len(x) == 12 for x in a)
    stop = a[0][3]  # stop at the 4th token of the first sequence: that sequence ends there, token included
    s = run(5, {stop})
    assert s[0] == a[0][: a[0].index(stop) + 1]


def test_set_noise_moves_sets_near_the_routers_choice():
    scores = torch.tensor([[0.1 * i for i in range(12)]] * 200)  # block i ranked i-th lowest
    cfg = TrainConfig(model="m", output="o", budget_min=0.25, budget_max=0.25, set_noise=1.0)
    hard, alt, a, b = draw_sets(scores, cfg, random.Random(0))
    k = 3
    assert torch.all((hard == 0).sum(1) == k)
    moved = [(hard[i] == 0).nonzero()[:, 0].tolist() != [0, 1, 2] for i in range(200)]
    assert all(moved)  # every set moved (probability 1)
    assert int((hard[:, 3 * k + 2:] == 0).sum()) == 0  # only to blocks the routers rank next
    # the swap: a was skipped and is kept in alt, b the reverse
    assert all(hard[i, a[i]] == 0 and alt[i, a[i]] == 1 and hard[i, b[i]] == 1 and alt[i, b[i]] == 0
               for i in range(200))
    # without noise the routed set is the k lowest
    hard0, *_ = draw_sets(scores, TrainConfig(model="m", output="o", budget_min=0.25, budget_max=0.25),
                          random.Random(0))
    assert torch.all(hard0[:, :3] == 0) and torch.all(hard0[:, 3:] == 1)


def _onpolicy_kl(model, bypass, prompts, seed):
    """Mean KL(student || full) on the student's own samples with block 1 skipped."""
    r = Routers(N_LAYER, N_EMBD, seed=0)
    cfg = TrainConfig(model="m", output="o", budget_min=0.25, budget_max=0.25, bf16=False, onpolicy_tokens=12,
                      static_mix=1.0, static_ranking=[1, 0, 2, 3])
    tot = []
    for s in range(4):
        _, info = onpolicy_loss(model, r, prompts, cfg, random.Random(s), torch.Generator().manual_seed(seed + s),
                                pad=0, stop_ids=set(), bypass=bypass)
        tot.append(info["okl"])
    return float(np.mean(tot))


def test_onpolicy_training_lowers_the_student_kl(tiny, tmp_path):
    d, model = tiny
    rng = random.Random(0)
    pool = [Sequence_([1] + [rng.randrange(3, 300) for _ in range(rng.randrange(4, 12))], [], "p") for _ in range(24)]
    seqs = [Sequence_(p.prompt, [rng.randrange(3, 300) for _ in range(6)], "t") for p in pool]
    # a fixed set (block 1, through a static ranking) so that before and after measure the same set
    cfg = TrainConfig(model=str(d), output=str(tmp_path / "r.safetensors"), steps=25, batch_size=0,
                      onpolicy_batch=6, onpolicy_tokens=12, lr=1e-3, bypass_rank=8, bypass_lr=1e-1,
                      budget_min=0.25, budget_max=0.25, bf16=False, checkpoint_every=10, n_static_examples=8,
                      static_mix=1.0, static_ranking=[1, 0, 2, 3])
    from first_gguf.convert.router_file import load_router_file

    held = [p.prompt for p in pool[:6]]
    before = _onpolicy_kl(model, None, held, 100)
    summary = train(cfg, sequences=seqs, progress=False, onpolicy_prompts=pool)
    rf = load_router_file(cfg.output)
    bp = Bypasses(N_LAYER, N_EMBD, 8, 1e-5)
    for il, (down, up) in rf.bypasses.items():
        bp.down.data[il], bp.up.data[il] = torch.tensor(down), torch.tensor(up)
    after = _onpolicy_kl(model, bp, held, 100)
    print(f"on-policy KL before {before:.4f} after {after:.4f}")
    assert math.isfinite(summary["last_loss"]) and after < 0.97 * before
    assert "okl" in rf.provenance["loss_curve"][-1]
    # resume continues from the checkpoint
    s2 = train(TrainConfig(**{**cfg.__dict__, "steps": 27, "resume": True}), sequences=seqs, progress=False,
               onpolicy_prompts=pool)
    assert s2["steps_this_run"] == 2 and s2["steps"] == 27


@pytest.mark.parametrize("kw, msg", [
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"onpolicy_batch": -1}, "onpolicy_batch"),
    ({"onpolicy_batch": 2, "onpolicy_tokens": 1}, "onpolicy_tokens"),
    ({"onpolicy_batch": 2, "onpolicy_temperature": -1}, "onpolicy_temperature"),
    ({"onpolicy_batch": 2, "onpolicy_beta": 1.5}, "onpolicy_beta"),
    ({"onpolicy_batch": 2, "onpolicy_data": "tasks,web"}, "onpolicy_data"),
    ({"set_noise": 2}, "set_noise"),
])
def test_onpolicy_config_errors(tmp_path, kw, msg):
    cfg = TrainConfig(model="m", output=str(tmp_path / "r.safetensors"), **kw)
    with pytest.raises(ValueError, match=msg):
        cfg.validate()


def test_chat_prompts_kept_apart_from_everyday():
    """The chat training source shares no subject with the held-out everyday prompts: no content word of
    a topic or how-to task appears in any everyday prompt (instruction words such as make / write / good
    aside), and no prompt is an everyday prompt."""
    import re

    from first_gguf.datasets.broad import CHAT_TASKS, CHAT_TOPICS, chat_prompts
    from first_gguf.datasets.heldout import EVERYDAY_PROMPTS

    def words(s):
        return {w for w in re.findall(r"[a-z]+", s.lower()) if len(w) > 3}

    generic = {"make", "write", "short", "good", "first", "change", "small", "start", "keep", "play"}
    everyday = set().union(*(words(p) for p in EVERYDAY_PROMPTS))
    shared = {t: words(t) & everyday - generic for t in CHAT_TOPICS + CHAT_TASKS}
    assert not {t: w for t, w in shared.items() if w}
    prompts = [r["prompt"] for r in chat_prompts()]
    assert len(prompts) == len(set(prompts)) > 1000
    assert not set(prompts) & set(EVERYDAY_PROMPTS)
    assert {r["source"] for r in chat_prompts()} == {"chat"}


def test_broad_prompts_leave_out_heldout_and_task_sources():
    """No broad prompt comes from a held-out evaluation source (news = xsum, yesno = strategyqa, German
    text), from a task's own source, or from another subtask over the qa task's passages."""
    from first_gguf.datasets.broad import excluded

    for name in ("gem/xsum", "strategyqa", "gem/mlsum_de", "gender_inclusive_sentences_german",
                 "salient_translation_error_detection", "social_iqa", "gem/wikilingua_en",
                 "natural_instructions/subtask024_cosmosqa_answer_generation",
                 "natural_instructions/subtask025_cosmosqa_incorrect_answer_generation",
                 "natural_instructions/subtask050_multirc_answerability",
                 "natural_instructions/subtask059_ropes_story_generation",
                 "natural_instructions/subtask004_mctaco_answer_generation_event_duration"):
        assert excluded(name), name
    for name in ("implicatures", "anachronisms", "natural_instructions/subtask001_quoref_question_generation",
                 "gem/common_gen", "timedial"):
        assert not excluded(name), name
