"""Measures users feel (first_gguf.measures) and the held-out sources (first_gguf.datasets.heldout).

Repetition on hand-made token lists; on-policy KL on the tiny random model against an independent
computation from Model.score_tokens; the held-out loader, and that no training path can load it.
None of these needs the BIG-bench download (news / yesno are read from hand-made task files).
"""
from __future__ import annotations

import codecs

import json

import numpy as np
import pytest

from first_gguf.datasets import heldout
from first_gguf.measures import (greedy_repetition, longest_run, onpolicy_kl, repeated_ngram_share,
                                 repeated_word_ngram_share, repetition_stats)
from first_gguf.datasets.tasks import HELDOUT_SOURCES, is_reserved, load_task, parse_tasks, read_examples_jsonl

PROMPTS = ["The quick brown fox", "Return the sum of the values", "Open the file and read"]


# ------------------------------------------------------------ repetition
def test_repeated_token_4grams_on_hand_made_lists():
    assert repeated_ngram_share([1, 2, 3, 4, 5, 6, 7]) == 0.0
    assert repeated_ngram_share([1, 2, 3, 4, 1, 2, 3, 4]) == pytest.approx(1 / 5)  # 5 grams, the last repeats
    assert repeated_ngram_share([1, 2, 3, 4]) == 0.0  # one 4-gram: nothing to repeat
    assert repeated_ngram_share([]) == 0.0
    assert repeated_ngram_share([5, 6] * 10) == pytest.approx(15 / 17)  # a two-token loop: all but 2 of 17
    assert longest_run([]) == 0 and longest_run([3]) == 1
    assert longest_run([1, 2, 2, 3, 3, 3, 1]) == 3


def test_one_token_run_caught_by_tokens_missed_by_words():
    # "Basoooooooooooo...": one word, many tokens ("Bas" then one "o" token over and over)
    tokens, text = [101, 102] + [7] * 14, "Bas" + "o" * 14
    assert repeated_word_ngram_share(text) == 0.0 and repeated_word_ngram_share(text + " and more words") == 0.0
    assert repeated_ngram_share(tokens) == pytest.approx(10 / 13) and longest_run(tokens) == 14
    r = repetition_stats([tokens, [1, 2, 3, 4, 5, 6]], [text, "a fine reply of words"])
    assert (r.token_4gram, r.looping, r.long_runs, r.longest_run) == (pytest.approx(5 / 13), 0.5, 0.5, 7.5)
    assert r.word_4gram == 0.0 and r.n == 2 and r.per_reply[0]["longest_run"] == 14
    # word-level: the definition of the earlier side-by-side loop measure
    assert repeated_word_ngram_share("A b c d a b c d") == pytest.approx(1 / 5)
    with pytest.raises(ValueError, match="as many texts as token lists"):
        repetition_stats([[1, 2]], [])


def test_greedy_repetition_on_tiny_model(tiny1):
    full = greedy_repetition(tiny1, PROMPTS, 0.0, max_tokens=12)
    assert full.n == 3 and all(s == [] for s in full.skipped) and len(full.replies) == 3
    skipped = greedy_repetition(tiny1, PROMPTS, 0.5, max_tokens=12)
    assert all(len(s) == 2 for s in skipped.skipped)
    g = tiny1.generate(PROMPTS[0] + "\n", 0.5, max_tokens=12)  # the same reply through the public API (raw text)
    assert skipped.replies[0] == g.text and skipped.per_reply[0]["token_4gram"] == repeated_ngram_share(g.tokens)


# ---------------------------------------------------------- on-policy KL
def test_onpolicy_kl_is_zero_at_budget_zero(tiny1):
    r = onpolicy_kl(tiny1, PROMPTS, 0.0, max_tokens=10)
    assert r.kl == 0.0 and r.n_tokens > 0 and all(v in (0.0, None) for v in r.per_prompt)
    assert all(s == [] for s in r.skipped)


def test_onpolicy_kl_equals_an_independent_computation(tiny1):
    r = onpolicy_kl(tiny1, PROMPTS, 0.5, max_tokens=10, seed=3)
    assert all(len(s) == 2 for s in r.skipped) and r.kl > 0
    total, n, first = 0.0, 0, []
    for prompt, toks in zip(PROMPTS, r.reply_tokens):
        p = tiny1.tokenize(prompt + "\n")  # the tiny model has no chat template: the raw text
        skip, full = tiny1.score_tokens(p, toks, 0.5), tiny1.score_tokens(p, toks, 0.0)
        first.append(skip.logprobs[0] - full.logprobs[0])
        total += sum(a - b for a, b in zip(skip.logprobs[1:], full.logprobs[1:]))
        n += len(toks) - 1
    # token 0 comes from the full-depth prefill for both models (equal up to the rounding of the prefill's
    # batch shape), so it is excluded from the count
    assert r.n_tokens == n and first == pytest.approx([0.0] * 3, abs=1e-5)
    assert r.kl == pytest.approx(total / n, abs=1e-12)
    # the reply is its tokens' text; a reply cut inside a multi-byte character drops the incomplete bytes
    # (as llama-cpp-python does), which the random tiny model's byte tokens often leave at the end
    cut = [codecs.getincrementaldecoder("utf-8")("replace").decode(b"".join(tiny1.token_bytes(t) for t in k))
           for k in r.reply_tokens]
    assert r.replies == cut


def test_onpolicy_kl_exact_per_state_equals_step_by_step_decoding(tiny1):
    """kl_exact: at every visited state (the reply's prefixes after token 0), the exact KL between the
    skipped and the full model's next-token distributions, here recomputed from the logits of decoding
    the reply one token at a time (Model.decoding), not from the batched teacher-forced pass."""
    r = onpolicy_kl(tiny1, PROMPTS, 0.5, max_tokens=10, seed=3)
    per = []
    for prompt, toks in zip(PROMPTS, r.reply_tokens):
        p = tiny1.tokenize(prompt + "\n")
        rows = {}
        for budget in (0.5, 0.0):
            with tiny1.decoding(p, budget) as d:
                out = []
                for t in toks[:-1]:
                    out.append(d.step(t).astype(np.float64))
            x = np.array(out)
            rows[budget] = x - x.max(1, keepdims=True) - np.log(np.exp(x - x.max(1, keepdims=True)).sum(1, keepdims=True))
        ls, lf = rows[0.5], rows[0.0]
        per.append(float(np.mean(np.sum(np.exp(ls) * (ls - lf), axis=1))))
    assert r.per_prompt_exact == pytest.approx(per, abs=1e-4)
    counts = [len(t) - 1 for t in r.reply_tokens]
    assert r.kl_exact == pytest.approx(sum(v * c for v, c in zip(per, counts)) / sum(counts), abs=1e-4)
    assert r.kl_exact > 0 and all(v >= 0 for v in r.per_prompt_exact)
    zero = onpolicy_kl(tiny1, PROMPTS, 0.0, max_tokens=10)
    assert zero.kl_exact == 0.0


def test_onpolicy_kl_reproducible_and_seeded_per_prompt(tiny1):
    a = onpolicy_kl(tiny1, PROMPTS, 0.5, max_tokens=10, seed=3)
    tiny1.generate("something else", 0.0, max_tokens=5, temperature=1.0)  # moves the model's own sampler
    b = onpolicy_kl(tiny1, PROMPTS, 0.5, max_tokens=10, seed=3)
    assert (a.reply_tokens, a.kl) == (b.reply_tokens, b.kl)
    rev = onpolicy_kl(tiny1, PROMPTS[::-1], 0.5, max_tokens=10, seed=3)  # a prompt's sample ignores the order
    assert rev.reply_tokens == a.reply_tokens[::-1]
    other = onpolicy_kl(tiny1, PROMPTS, 0.5, max_tokens=10, seed=4)
    assert other.reply_tokens != a.reply_tokens
    with pytest.raises(ValueError, match="seed must be a non-negative integer; got -1"):
        onpolicy_kl(tiny1, PROMPTS, 0.5, seed=-1)
    with pytest.raises(TypeError, match="prompts must be a non-empty list"):
        onpolicy_kl(tiny1, "one prompt", 0.5)


# ------------------------------------------------------------- held out
def test_heldout_sources_are_refused_for_training(tmp_path):
    assert all(is_reserved(s) for s in HELDOUT_SOURCES)
    for name in ("news", "de", "yesno", "everyday", "xsum", "strategyqa"):
        with pytest.raises(ValueError, match=f"task '{name}' is reserved"):
            load_task(name)
        with pytest.raises(ValueError, match=f"task '{name}' is reserved"):
            parse_tasks(f"qa,{name}")
    with pytest.raises(ValueError, match="eval --heldout"):
        parse_tasks("news")
    for name in ("xsum", "news", "everyday"):
        p = tmp_path / f"{name}.jsonl"
        p.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}], "target": "a", "task": name}) + "\n")
        with pytest.raises(ValueError, match=f"task '{name}' is reserved"):
            read_examples_jsonl(p)


def test_train_refuses_a_heldout_source(tiny, tmp_path):
    from click.testing import CliRunner

    from first_gguf.cli import main

    res = CliRunner().invoke(main, ["train", "--model", str(tiny[0]), "-o", str(tmp_path / "r.safetensors"),
                                    "--data", "qa,everyday", "--steps", "1", "--threads", "1"])
    assert res.exit_code != 0 and "'everyday' is reserved" in res.output


def test_load_heldout_everyday_and_de():
    ex = heldout.load_heldout("everyday")
    assert len(ex) == len(heldout.EVERYDAY_PROMPTS) == 40 and len(set(heldout.EVERYDAY_PROMPTS)) == 40
    assert all(e.task == "everyday" and e.target == "" for e in ex)
    assert heldout.load_heldout("everyday", 5) == ex[:5] == heldout.load_heldout("everyday")[:5]
    assert {e.messages[0]["content"] for e in ex} == set(heldout.EVERYDAY_PROMPTS)
    code = heldout.load_heldout("coding")
    assert len(code) == len(set(heldout.CODING_PROMPTS)) == 40 and all(e.task == "coding" and e.target == "" for e in code)
    assert {e.messages[0]["content"] for e in code} == set(heldout.CODING_PROMPTS)
    assert not set(heldout.CODING_PROMPTS) & set(heldout.EVERYDAY_PROMPTS) and len({e.uid for e in code + ex}) == 80
    assert is_reserved("coding") and is_reserved("coding-train") and not is_reserved("decode")
    de = heldout.load_heldout("de", 20)
    if not de:
        pytest.skip("no German catalogues on this machine")
    assert all(e.task == "de" and e.messages[0]["content"].startswith("Translate to German:\n") and e.target
               for e in de)
    with pytest.raises(ValueError, match="unknown held-out source 'cooking'; expected some of news, de"):
        heldout.load_heldout("cooking")
    with pytest.raises(ValueError, match="n must be a positive integer or None; got 0"):
        heldout.load_heldout("everyday", 0)
    with pytest.raises(ValueError, match="repeat a name"):
        heldout.parse_heldout("news,news")
    assert heldout.parse_heldout("") == [] and heldout.parse_heldout(" news , de") == ["news", "de"]


def _write_mo(path, messages: dict[str, str]) -> None:
    """A GNU .mo catalogue (little-endian, no hash table) of ``messages``, as msgfmt writes it."""
    import struct

    keys = sorted(messages)
    ids, strs = b"", b""
    id_entries, str_entries = [], []
    for k in keys:
        id_entries.append((len(k.encode()), len(ids)))
        ids += k.encode() + b"\0"
        str_entries.append((len(messages[k].encode()), len(strs)))
        strs += messages[k].encode() + b"\0"
    n = len(keys)
    ids_at = 28 + 16 * n
    strs_at = ids_at + len(ids)
    head = struct.pack("<7I", 0x950412DE, 0, n, 28, 28 + 8 * n, 0, 0)
    table = b"".join(struct.pack("<2I", ln, ids_at + off) for ln, off in id_entries)
    table += b"".join(struct.pack("<2I", ln, strs_at + off) for ln, off in str_entries)
    path.write_bytes(head + table + ids + strs)


def test_heldout_de_reads_only_its_pinned_catalogues(tmp_path, monkeypatch):
    """Installing a package that brings another German catalogue must not change the de prompts; a pinned
    catalogue that is missing is reported, since the prompts then differ from other machines'."""
    from first_gguf.datasets import common

    where = tmp_path / "de" / "LC_MESSAGES"
    where.mkdir(parents=True)
    pinned = heldout.DE_DOMAINS[:2]
    _write_mo(where / f"{pinned[0]}.mo", {"The file could not be opened.": "Die Datei konnte nicht geoeffnet werden."})
    _write_mo(where / f"{pinned[1]}.mo", {"Press any key to continue.": "Eine Taste druecken."})
    monkeypatch.setattr(common, "LOCALE_DIR", tmp_path)
    with pytest.warns(UserWarning, match=f"{len(heldout.DE_DOMAINS) - 2} of its {len(heldout.DE_DOMAINS)} pinned"):
        before = heldout.load_heldout("de")
    assert sorted(e.target for e in before) == ["Die Datei konnte nicht geoeffnet werden.", "Eine Taste druecken."]
    assert "gtk30" not in heldout.DE_DOMAINS  # chromium's install brings it: the catalogue that moved the set
    _write_mo(where / "gtk30.mo", {"Open the selected file now.": "Die Datei jetzt oeffnen.",
                                   "The file could not be opened.": "Konnte nicht geoeffnet werden."})
    with pytest.warns(UserWarning):
        after = heldout.load_heldout("de")
    assert after == before  # the unpinned catalogue neither adds a prompt nor changes a target
    every = common.catalogue_examples("de", "German", "de")  # no pin: every installed catalogue
    assert len(every) == 3 and {e.uid for e in before} < {e.uid for e in every}


def test_load_heldout_news_and_yesno_from_task_files(tmp_path, monkeypatch):
    article = "\n".join(f"Sentence number {i} of a long article about the town council." for i in range(60))
    files = {
        "news": {"examples": [{"input": article, "target": "The council met.", "comment": ""},
                              {"input": "Short article.", "target": "", "comment": ""}]},
        "yesno": {"examples": [{"input": "Would a pear sink in water?", "target_scores": {"Yes": 0, "No": 1},
                                "target": "No. The density of a raw pear is about 0.59 g/cm^3."}]},
    }
    members = {v: k for k, v in heldout.BIGBENCH_HELDOUT_MEMBERS.items()}

    def fake_file(member):
        p = tmp_path / members[member]
        p.write_text(json.dumps(files[members[member]]))
        return p

    monkeypatch.setattr(heldout, "bigbench_file", fake_file)
    (news,) = heldout.load_heldout("news")  # the example without a summary is dropped
    body = news.messages[0]["content"]
    assert body.startswith("Summarize this news article in one sentence:\nSentence number 0 ")
    text = body.split("\n", 1)[1]
    assert len(text) <= heldout.NEWS_MAX_CHARS and text.endswith("town council.") and article.startswith(text)
    assert news.target == "The council met."
    (yn,) = heldout.load_heldout("yesno")
    assert yn.messages[0]["content"] == "Answer yes or no, and say why:\nWould a pear sink in water?"
    assert yn.target.startswith("No. The density") and yn.task == "yesno"


def test_bigbench_sdist_from_a_local_copy_or_a_clear_error(tmp_path, monkeypatch):
    """The BIG-bench sdist: a local copy named by FIRST_GGUF_BIGBENCH_SDIST is sha256-checked and cached;
    an index that does not list the file gives one error naming the file, its readers and the way out."""
    import hashlib
    import io
    import urllib.request

    from first_gguf.datasets import common

    monkeypatch.setenv("FIRST_GGUF_CACHE", str(tmp_path / "cache"))
    copy = tmp_path / "bb.tar.gz"
    copy.write_bytes(b"not really an sdist")
    monkeypatch.setenv(common.BIGBENCH_ENV, str(copy))
    with pytest.raises(common.DataUnavailableError, match=r"FIRST_GGUF_BIGBENCH_SDIST=.*bb\.tar\.gz has sha256 "):
        common.bigbench_sdist()
    assert not (tmp_path / "cache" / "data" / "sdist" / common.BIGBENCH_SDIST).exists()  # nothing half-written
    monkeypatch.setenv(common.BIGBENCH_ENV, str(tmp_path / "missing.tar.gz"))
    with pytest.raises(common.DataUnavailableError, match=r"missing\.tar\.gz: no such file"):
        common.bigbench_sdist()
    monkeypatch.setenv(common.BIGBENCH_ENV, str(copy))
    monkeypatch.setattr(common, "BIGBENCH_SHA256", hashlib.sha256(copy.read_bytes()).hexdigest())
    got = common.bigbench_sdist()
    assert got == tmp_path / "cache" / "data" / "sdist" / common.BIGBENCH_SDIST
    assert got.read_bytes() == copy.read_bytes()
    assert sorted(p.name for p in got.parent.iterdir()) == [common.BIGBENCH_SDIST]

    # the index lists only another version: the error names the file, what reads it and the alternatives
    monkeypatch.delenv(common.BIGBENCH_ENV)
    got.unlink()
    listing = json.dumps({"files": [{"filename": "bigbench-0.0.1.tar.gz", "url": "x"}]}).encode()
    monkeypatch.setattr(urllib.request, "urlopen", lambda req, timeout=0: io.BytesIO(listing))
    with pytest.raises(common.DataUnavailableError) as e:
        common.bigbench_sdist()
    msg = str(e.value)
    assert msg.startswith("bigbench-1.0.0.tar.gz is not on the package index (only bigbench-0.0.1.tar.gz is)")
    for part in ("summarization, qa and mc", "news and yesno", "Set FIRST_GGUF_BIGBENCH_SDIST", "translation and docs",
                 "de, everyday and coding"):
        assert part in msg
    assert isinstance(e.value, ValueError)  # every command reports ValueErrors as one line


def test_news_cut_falls_back_to_words():
    one_line = " ".join(["word"] * 1000)
    cut = heldout._cut(one_line)
    assert len(cut) <= heldout.NEWS_MAX_CHARS and cut.endswith("word") and one_line.startswith(cut)
    assert heldout._cut("short") == "short" and np.isscalar(len(heldout._cut("x" * 3000)))


def test_compare_measures_pairs_prompts_with_the_first_folder(tmp_path):
    """first-gguf compare: the paired on-policy table is the mean per-prompt difference with the first
    folder (exact per-state KL where both have it), its standard error and the count of lower prompts."""
    from click.testing import CliRunner

    from first_gguf.cli import main

    rng = np.random.default_rng(3)
    base = {t: rng.uniform(0.2, 1.0, 6) for t in ("news", "de")}
    new = {t: base[t] + rng.normal(-0.05, 0.05, 6) for t in base}
    for label, vals in (("a", base), ("b", new)):
        d = tmp_path / label
        d.mkdir()
        rows = [{"task": t, "group": "held-out source", "strategy": "router", "budget": 0.2, "n": 6,
                 "onpolicy_kl": float(v.mean()) + 1.0, "onpolicy_kl_exact": float(v.mean()), "skipped": [[3, 4]] * 6,
                 "onpolicy": {"per_prompt": list(v + 1.0), "per_prompt_exact": list(v)}} for t, v in vals.items()]
        (d / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (d / "run.json").write_text(json.dumps({"measures": ["onpolicy"], "seed": 0}))
    res = CliRunner().invoke(main, ["compare", f"a={tmp_path / 'a'}", f"b={tmp_path / 'b'}"])
    assert res.exit_code == 0, res.output
    diff = np.concatenate([new[t] - base[t] for t in ("news", "de")])
    se = diff.std(ddof=1) / np.sqrt(len(diff))
    want = f"| 0.2 | router | held-out source | {diff.mean():+.3f} +- {se:.3f} (lower on {int((diff < 0).sum())}/12) |"
    assert want in res.stdout, res.stdout
    out = tmp_path / "t.md"
    res = CliRunner().invoke(main, ["compare", f"a={tmp_path / 'a'}", f"b={tmp_path / 'b'}", "-o", str(out)])
    assert res.exit_code == 0 and want in out.read_text()
    res = CliRunner().invoke(main, ["compare", f"a={tmp_path / 'a'}", f"b={tmp_path / 'b'}", "-o", str(out)])
    assert res.exit_code == 1 and "exists" in res.output
    (tmp_path / "b" / "run.json").write_text(json.dumps({"measures": ["onpolicy"], "seed": 1}))
    res = CliRunner().invoke(main, ["compare", f"a={tmp_path / 'a'}", f"b={tmp_path / 'b'}"])
    assert res.exit_code == 1 and "other settings (seed)" in res.output
    res = CliRunner().invoke(main, ["compare", "nolabel"])
    assert res.exit_code == 1 and "nolabel" in res.output and "Traceback" not in res.output


def test_oracle_sets_report_cross_fits_choices(tmp_path):
    """research/oracle_sets.py --report: the best single set, the best set per source and the per-prompt oracle,
    each chosen on one sample and scored on the other; the prompt-dependent spread of a set's cost."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "oracle_sets", Path(__file__).resolve().parents[1] / "research" / "oracle_sets.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    # set A costs 0.5 everywhere; set B 0.3 on news, 0.9 on de; seed 1 = seed 0 + 0.1 (no noise in the choice)
    rows = []
    for src, b in (("news", 0.3), ("de", 0.9)):
        for i in range(4):
            for seed in (0, 1):
                for blocks, v in (((1, 2), 0.5), ((3, 4), b)):
                    rows.append({"source": src, "uid": f"{src}{i}", "set": list(blocks), "seed": seed,
                                 "kl_exact": v + 0.1 * seed, "n_tokens": 10, "reply": ""})
    rows.append({"source": "de", "uid": "de9", "set": [1, 2], "seed": 0, "kl_exact": 0.0, "n_tokens": 10,
                 "reply": ""})  # a prompt without every set and seed: left out
    out = tmp_path / "o.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rep = mod.report(out)
    assert rep.startswith("8 prompts with all 2 sets x 2 samples")
    # single: A (0.5 mean < 0.6), scored 0.55 on average over the two directions
    assert "- best single set: 0.550" in rep
    # per source / per prompt: B on news (0.35), A on de (0.55): 0.45 on average, 0.1 lower on the 4 news prompts
    gain = np.array([-0.2] * 4 + [0.0] * 4)
    se = gain.std(ddof=1) / np.sqrt(8)
    assert f"- best set per source: 0.450; per source - single, paired: -0.100 +- {se:.3f} (lower on 4 of 8" in rep
    assert "- per-prompt oracle: 0.450;" in rep
    # B - A is +0.4 or -0.2 by source, the same on both samples: sd 0.3 (population, n/(n-1) corrected), no noise
    d = np.array([-0.2] * 4 + [0.4] * 4)
    assert f"3,4: mean +0.100, prompt-dependent sd {np.sqrt(d.var(ddof=1)):.3f}" in rep
    assert "sample noise sd 0.000" in rep
    assert "| 3,4 | - | - | 0.350 | 0.950 | 0.650 |" in rep
