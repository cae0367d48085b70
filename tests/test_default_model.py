"""The embedded default model and the main command."""
from __future__ import annotations

import json

from click.testing import CliRunner

import first_gguf
from first_gguf.cli import main
from first_gguf.default_model import GGUF_SHA256, _sha256, base_gguf_path, default_model_path, shipped_ranking


def test_default_model_is_verified_and_carries_the_shipped_ranking():
    assert _sha256(base_gguf_path()) == GGUF_SHA256
    ranking = shipped_ranking()
    assert sorted(ranking["ranking"]) == list(range(30))
    m = first_gguf.load(n_ctx=1024)
    try:
        assert m.path == default_model_path()
        assert m.static_rankings == {ranking["name"]: ranking["ranking"]}
        g = m.chat([{"role": "user", "content": "Hi"}], 0.3, skip_strategy="auto", max_tokens=8)
        assert g.skip_strategy == "static"
        assert g.skipped_layers == sorted(ranking["ranking"][:9])
        assert g.decode_tokens_per_s > 0 and g.n_prompt_tokens > 0
    finally:
        m.close()


def test_main_command_streams_and_summarises():
    res = CliRunner().invoke(main, ["generate", "Explain why the sky is blue.", "--skip-budget", "0.3",
                                    "--max-tokens", "12"])
    assert res.exit_code == 0, res.output
    assert "[first-gguf] skipped 9 blocks (static):" in res.output
    assert "decode" in res.output and "tok/s" in res.output
    res = CliRunner().invoke(main, ["generate", "Hi", "--skip-budget", "0.2", "--max-tokens", "4", "--json"])
    d = json.loads(res.output)
    assert len(d["skipped_layers"]) == 6 and d["router_scores"] is None and d["finish_reason"] in ("stop", "length")


def test_info_shows_the_ranking():
    res = CliRunner().invoke(main, ["info"])
    assert res.exit_code == 0
    assert "architecture   llama" in res.output and "blocks         30" in res.output
    assert "static ranking greedy_nll (default)" in res.output
