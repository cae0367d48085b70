"""Shared fixtures.

The real default model (SmolLM2-135M-Instruct Q4_1, 93 MB) is downloaded and
verified by the setup command and cached; tests that need a GGUF with routers
or malformed data build it from that file in a temporary folder.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
STOCK_PYTHON = ROOT / "build" / "stock-venv" / "bin" / "python"


@pytest.fixture(scope="session")
def base_gguf() -> Path:
    from first_gguf.models import base_gguf_path

    return base_gguf_path()


@pytest.fixture(scope="session")
def router_weights(base_gguf):
    """Seeded random routers for every block, scaled so scores spread over (0, 1)."""
    from first_gguf.gguf_info import read_info

    info = read_info(base_gguf)
    rng = np.random.default_rng(1234)
    return {il: (rng.standard_normal(info.n_embd).astype(np.float32) * 0.2, float(rng.standard_normal()))
            for il in range(info.n_layer)}


@pytest.fixture(scope="session")
def router_gguf(tmp_path_factory, base_gguf, router_weights) -> Path:
    from first_gguf.convert.attach import attach

    out = tmp_path_factory.mktemp("routers") / "smollm2-routers.gguf"
    return attach(base_gguf, out, routers=router_weights,
                  rankings={"test_rank": {"ranking": list(range(29, -1, -1)), "method": "test"}})


@pytest.fixture(scope="session")
def base_model(base_gguf):
    import first_gguf

    m = first_gguf.load(base_gguf, n_ctx=2048, n_threads=2)
    yield m
    m.close()


@pytest.fixture(scope="session")
def router_model(router_gguf):
    import first_gguf

    m = first_gguf.load(router_gguf, n_ctx=2048, n_threads=2)
    yield m
    m.close()


@pytest.fixture(scope="session")
def stock_python() -> Path:
    if not STOCK_PYTHON.exists():
        pytest.fail(f"stock reference interpreter missing: {STOCK_PYTHON}; run scripts/build_stock_reference.sh "
                    f"(the README's test command does)")
    return STOCK_PYTHON


# ------------------------------------------------------------- tiny random Llama
N_LAYER, N_EMBD, VOCAB = 4, 64, 400


def _spm_model(path):
    import inspect
    import io

    import sentencepiece as spm

    text = [" ".join((inspect.getdoc(f) or "").split()) for f in (json.dumps, json.loads, inspect.getdoc,
                                                                   np.mean, np.sum, sorted, print, open)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text * 20), model_writer=buf, vocab_size=VOCAB,
                                   model_type="bpe", character_coverage=1.0, byte_fallback=True,
                                   hard_vocab_limit=False, minloglevel=2)
    path.write_bytes(buf.getvalue())


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny random Llama checkpoint (transformers) with a sentencepiece tokenizer, built here."""
    pytest.importorskip("torch")
    import sentencepiece as spm
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("tiny-llama")
    _spm_model(d / "tokenizer.model")
    sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    cfg = LlamaConfig(vocab_size=sp.get_piece_size(), hidden_size=N_EMBD, intermediate_size=128,
                      num_hidden_layers=N_LAYER, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, rms_norm_eps=1e-5, rope_theta=10000.0,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, initializer_range=0.2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(d, safe_serialization=True)
    return d, model


@pytest.fixture(scope="session")
def tiny_routers(tiny, tmp_path_factory):
    from first_gguf.convert.router_file import RouterFile, fingerprint_from_arrays, save_router_file

    d, model = tiny
    rng = np.random.default_rng(7)
    w = {b: rng.standard_normal(N_EMBD).astype(np.float32) for b in range(N_LAYER)}
    bias = {b: float(rng.standard_normal()) for b in range(N_LAYER)}
    fp = fingerprint_from_arrays("llama", N_LAYER, N_EMBD, model.config.vocab_size,
                                 model.model.norm.weight.detach().numpy())
    p = tmp_path_factory.mktemp("rf") / "tiny.routers.safetensors"
    return save_router_file(p, RouterFile(N_LAYER, N_EMBD, w, bias, fp)), w, bias


@pytest.fixture(scope="session")
def tiny_gguf_model(tiny, tiny_routers, tmp_path_factory):
    from click.testing import CliRunner

    import first_gguf
    from first_gguf.cli import main

    d, _ = tiny
    out = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    res = CliRunner().invoke(main, ["convert", str(d), "--routers", str(tiny_routers[0]), "--outtype", "f32",
                                    "-o", str(out)])
    assert res.exit_code == 0, res.output
    m = first_gguf.load(out, n_ctx=1024, n_threads=2)
    yield m
    m.close()


@pytest.fixture(scope="session")
def tiny1(tiny_gguf_model):
    """The same tiny model (routers, no chat template) on one thread: llama.cpp's threads spin, so two of
    them on a machine whose other core is busy make a test many times slower."""
    import first_gguf

    m = first_gguf.load(tiny_gguf_model.path, n_ctx=1024, n_threads=1)
    yield m
    m.close()


# ------------------------------------------------------------- the fast loop
# `./test.sh -m "not slow"` leaves out the tests below; the full suite (`./test.sh`, what CI runs) runs them
# all. Chosen from `pytest --durations` on the 2-core development machine: each took 8 s or more there
# (setup included), and together they were most of the suite's time. Every module keeps fast tests. A name
# is a node id prefix: a file, or a test with all of its parameters.
SLOW_TESTS = {
    "rewrites copies of the 93 MB default GGUF (attach, strip, quantize, sidecars) several times": [
        "tests/test_convert.py",
        "tests/test_sidecar.py::test_cli_attach_sidecar_and_routers_option",
        "tests/test_sidecar.py::test_convert_writes_either_form",
        "tests/test_sidecar.py::test_mismatched_sidecars_refused",
        "tests/test_sidecar.py::test_sidecar_equals_attached_file",
        "tests/test_sidecar.py::test_sidecar_header",
        "tests/test_sidecar.py::test_train_writes_a_sidecar",
        "tests/test_cli_errors.py::test_strip_and_quantize_refuse_a_sidecar",
        "tests/test_errors.py::test_malformed_router_tensors",
        "tests/test_errors.py::test_llama_cpp_itself_rejects_a_wrong_router_type",
        "tests/test_errors.py::test_routers_on_unsupported_architecture_are_refused",
        "tests/test_errors.py::test_unsupported_architecture_refuses_skipping",
        "tests/test_llama_dropin.py::test_unsupported_architecture_refuses_skipping",
        "tests/test_decode_lora.py::test_routers_from_checkpoint_writes_the_checkpoints_decode_lora",
    ],
    "runs stock llama-cpp-python in a subprocess beside the patched build": [
        "tests/test_reference_stock.py",
        "tests/test_sidecar.py::test_stock_llama_cpp_loads_the_base",
        "tests/test_sidecar.py::test_runtime_checks_without_python",
        "tests/test_llama_dropin.py::test_budget0_equals_stock",
        "tests/test_llama_dropin.py::test_response_shapes_are_llama_cpp_pythons",
    ],
    "fetches, verifies or runs the named models (Qwen2.5-Coder-1.5B 1.1 GB, Gemma 3 270M, the main command)": [
        "tests/test_models.py::test_qwen_coder_1_5b_by_name",
        "tests/test_models.py::test_gemma3_270m_by_name_with_its_shipped_routers",
        "tests/test_models.py::test_main_command_streams_and_summarises",
        "tests/test_models.py::test_default_model_is_verified_and_carries_routers_and_rankings",
        "tests/test_models.py::test_info_shows_the_ranking",
    ],
    "a whole command end to end (fit on the default model, eval, 2-process DDP training)": [
        "tests/test_fit.py::test_fit_on_the_default_model_end_to_end_and_resumes",
        "tests/test_fit.py::test_refine_bypasses_fits_on_skipped_states_and_resumes",
        "tests/test_fit.py::test_continuation_layer_inputs_are_what_decoding_sees",
        "tests/test_train_device.py::test_two_gloo_processes_onpolicy_with_time_budget",
        "tests/test_eval.py::test_eval_end_to_end_on_tiny_model",
        "tests/test_train.py::test_ddp_two_cpu_processes",
        "tests/test_cli_errors.py::test_train_checks_its_inputs_before_loading_the_model",
        "tests/test_cli_errors.py::test_rank_reports_progress_within_each_phase",
        "tests/test_rank_bench.py::test_rank_onpolicy_criterion_costs_are_onpolicy_kl",
    ],
    "many decodes on the real model (sampling statistics over seeds, a numpy forward, continued conversations)": [
        "tests/test_sampling.py::test_sampled_first_token_follows_top_k_softmax",
        "tests/test_sampling.py::test_fewer_blocks_than_the_budget_asks_warns_once_and_is_reported",
        "tests/test_sampling.py::test_seed_reproduces_whatever_ran_before",
        "tests/test_sampling.py::test_min_p_drops_unlikely_tokens",
        "tests/test_masked_decode_numpy.py::test_masked_decode_matches_numpy",
        "tests/test_kv_and_reuse.py::test_conversation_after_skipped_turn_equals_fresh_full_depth",
        "tests/test_kv_and_reuse.py::test_stale_cells_would_change_the_result",
        "tests/test_kv_and_reuse.py::test_graph_reuse_follows_the_mask",
        "tests/test_router_scores.py::test_prefix_cache_keeps_router_aggregation_exact",
        "tests/test_errors.py::test_repeated_skip_layers_are_refused",
        "tests/test_archs.py::test_greedy_tokens_match_transformers",
        "tests/test_decode_lora.py::test_full_depth_never_sees_the_decode_lora",
    ],
    "a live server under many requests (soak, concurrency, interleaved seeds) or a headless browser": [
        "tests/test_server.py::test_bounded_soak_keeps_memory_flat",
        "tests/test_server.py::test_streams_back_to_back_never_leak_the_queue",
        "tests/test_server.py::test_seed_gives_the_same_reply_across_interleaved_requests",
        "tests/test_server.py::test_concurrent_requests_equal_sequential",
        "tests/test_server.py::test_bad_requests_get_4xx_and_the_server_keeps_serving",
        "tests/test_server.py::test_max_completion_tokens_usage_and_include_usage",
        "tests/test_server.py::test_errors_name_the_servers_own_ranges_and_seed_minus_one_is_random",
        "tests/test_server.py::test_penalties_bias_and_extensions_change_the_reply",
        "tests/test_server.py::test_streaming_chat_and_completion",
        "tests/test_server.py::test_response_format_returns_json_that_parses",
        "tests/test_server.py::test_chat_completion_with_skip_budget",
        "tests/test_server.py::test_text_parts_and_null_assistant_content",
        "tests/test_server.py::test_logit_bias_is_honoured",
        "tests/test_server.py::test_logprobs_chat_and_completion",
        "tests/test_server.py::test_client_hanging_up_mid_stream_frees_the_server",
        "tests/test_server.py::test_client_timing_out_on_a_non_streaming_request_frees_the_server",
    ],
    "terminal sessions through a pseudo-terminal, one model load per command": [
        "tests/test_chat.py",
        "tests/test_cli_errors.py::test_bad_grammar_is_one_line_naming_the_fault",
        "tests/test_cli_errors.py::test_generate_sampling_options_reach_the_sampler",
        "tests/test_cli_errors.py::test_generate_seed_minus_one_is_random_and_shown",
    ],
    "builds a wheel and installs it into fresh virtual environments": [
        "tests/test_wheel.py::test_fresh_venv_any_directory_any_import_order",
        "tests/test_wheel.py::test_one_platform_wheel_with_the_patched_library",
        "tests/test_wheel.py::test_cli_entry_point_in_fresh_venv",
        "tests/test_wheel.py::test_dev_install_any_import_order",
    ],
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        for reason, prefixes in SLOW_TESTS.items():
            if any(item.nodeid == p or item.nodeid.startswith((p + "::", p + "[")) for p in prefixes):
                item.add_marker(pytest.mark.slow(reason=reason))
                break
