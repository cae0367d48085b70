"""Bad input gives a clear error naming the value or file; never a crash or a silent fallback."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
from click.testing import CliRunner

import first_gguf
from first_gguf.cli import main
from first_gguf.convert.gguf_edit import _copy_kv, read_gguf, rewrite_gguf


def _with_router_tensors(base, out, tensors):
    return rewrite_gguf(base, out, add_tensors=tensors, force=True)


@pytest.fixture(scope="module")
def exaone_gguf(base_gguf, tmp_path_factory):
    """The default model relabelled as an 'exaone' GGUF (llama's tensors and keys): loads, but the skip patch
    does not cover it."""
    r = read_gguf(base_gguf)
    kv = {"exaone" + f.name[len("llama"):]: _copy_kv(f) for f in r.fields.values() if f.name.startswith("llama.")}
    out = tmp_path_factory.mktemp("arch") / "exaone.gguf"
    return rewrite_gguf(base_gguf, out, set_kv=kv, drop_kv=lambda k: k.startswith("llama."), arch="exaone")


def _unsupported(arch):
    """The error words for an unsupported architecture: it, and the list the C side keeps."""
    from first_gguf._lib import supported_architectures

    archs = supported_architectures()
    assert {"llama", "qwen2", "qwen3"} <= set(archs) and arch not in archs
    return re.escape(f"architecture '{arch}' is not covered by the layer-skip patch (supported: {', '.join(archs)})")


# ---------------------------------------------------------------- arguments
@pytest.mark.parametrize("budget,exc,words", [
    (-0.1, ValueError, "[0, 1)"), (1.0, ValueError, "[0, 1)"), (1.5, ValueError, "[0, 1)"),
    (math.nan, ValueError, "[0, 1)"), (math.inf, ValueError, "[0, 1)"),
    ("0.3", TypeError, "number"), (None, TypeError, "number"), (True, TypeError, "number"),
])
def test_bad_skip_budget(router_model, budget, exc, words):
    with pytest.raises(exc, match=r"skip_budget") as ei:
        router_model.generate("Hi", budget, max_tokens=2)
    assert words in str(ei.value)
    with pytest.raises(exc, match=r"skip_budget"):
        router_model.score("Hi", " there", budget)


@pytest.mark.parametrize("layers,exc,pattern", [
    ([30], ValueError, "index 30 out of range"),
    ([-1], ValueError, "index -1 out of range"),
    (list(range(30)), ValueError, "all 30 blocks"),
    ([1.0], TypeError, "integers"),
    ("1,2", TypeError, "list of block indices"),
    (5, TypeError, "list of block indices"),
])
def test_bad_skip_layers(router_model, layers, exc, pattern):
    with pytest.raises(exc, match=pattern):
        router_model.generate("Hi", skip_layers=layers, max_tokens=2)


def test_bad_strategy_and_generation_args(router_model):
    with pytest.raises(ValueError, match=r"unknown skip_strategy 'bogus'.*router.*static.*test_rank"):
        router_model.generate("Hi", 0.2, skip_strategy="bogus")
    with pytest.raises(ValueError, match="max_tokens"):
        router_model.generate("Hi", max_tokens=0)
    with pytest.raises(TypeError, match="max_tokens"):
        router_model.generate("Hi", max_tokens=2.5)
    with pytest.raises(ValueError, match="temperature"):
        router_model.generate("Hi", temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        router_model.generate("Hi", top_p=0)
    with pytest.raises(TypeError, match="stop"):
        router_model.generate("Hi", stop=[1])
    with pytest.raises(TypeError, match="messages"):
        router_model.chat("Hi")
    with pytest.raises(TypeError, match=r"messages\[0\]"):
        router_model.chat([{"role": "user"}])
    with pytest.raises(ValueError, match="context overflow|n_ctx"):
        router_model.generate("word " * 2100, max_tokens=2)
    # the model still works after every error
    assert router_model.generate("Hi", 0.2, max_tokens=2).tokens


def test_budget_needs_routers_or_ranking(base_model):
    with pytest.raises(ValueError, match=r"no router tensors.*skip_budget=0.3"):
        base_model.generate("Hi", 0.3)
    with pytest.raises(ValueError, match=r"no static ranking"):
        base_model.generate("Hi", 0.3, skip_strategy="static")
    # explicit layers and budget 0 need neither
    assert base_model.generate("Hi", 0.0, max_tokens=2).router_scores is None
    assert base_model.generate("Hi", skip_layers=[4], max_tokens=2).skipped_layers == [4]


def test_unsupported_architecture_refuses_skipping(exaone_gguf):
    m = first_gguf.load(exaone_gguf, n_ctx=256)
    try:
        assert not m.supports_skip and not m.info.supports_skip
        assert m.generate("Hello", 0.0, max_tokens=3).tokens
        with pytest.raises(ValueError, match=_unsupported("exaone")):
            m.generate("Hello", 0.2)
        with pytest.raises(ValueError, match=_unsupported("exaone")):
            m.generate("Hello", skip_layers=[3])
    finally:
        m.close()


def test_routers_on_unsupported_architecture_are_refused(exaone_gguf, tmp_path):
    out = _with_router_tensors(exaone_gguf, tmp_path / "q.gguf",
                               [("blk.0.router.weight", np.zeros((1, 576), np.float32))])
    with pytest.raises(ValueError, match=r"router tensors on architecture 'exaone'.*\(supported: llama, "):
        first_gguf.load(out)


def test_routers_on_unsupported_architecture_are_refused_by_llama_cpp(exaone_gguf, tmp_path):
    """Below the Python check, llama.cpp's loader itself names the tensor and the supported architectures."""
    from first_gguf._lib import supported_architectures
    from first_gguf.model import _LOG

    out = _with_router_tensors(exaone_gguf, tmp_path / "q.gguf",
                               [("blk.2.bypass.down.weight", np.zeros((4, 576), np.float32))])
    _LOG.lines.clear()
    params = first_gguf.model.llama_cpp.llama_model_default_params()
    model = first_gguf.model.llama_cpp.llama_model_load_from_file(str(out).encode(), params)
    assert not model
    log = "".join(_LOG.lines)
    assert "the file carries tensor 'blk.2.bypass.down.weight'" in log, log[-2000:]
    archs = ", ".join(supported_architectures())
    assert f"the model's architecture 'exaone' has no layer-skip support (supported: {archs})" in log, log[-2000:]


# ------------------------------------------------------------------- files
def test_missing_and_corrupt_files(tmp_path, base_gguf):
    with pytest.raises(ValueError, match=r"not found: .*nope.gguf"):
        first_gguf.load(tmp_path / "nope.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + b"\0" * 100)
    with pytest.raises(ValueError, match=r"not a GGUF file: .*bad.gguf.*b'GGML'"):
        first_gguf.load(bad)
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(base_gguf.read_bytes()[:4096])
    with pytest.raises(ValueError, match=r"trunc.gguf"):
        first_gguf.load(trunc)
    short = tmp_path / "short.gguf"
    short.write_bytes(base_gguf.read_bytes()[:-1000])  # header fine, tensor data cut
    with pytest.raises(ValueError, match=r"short.gguf"):
        first_gguf.load(short)
    with pytest.raises(ValueError, match="not a file"):
        first_gguf.load(tmp_path)
    with pytest.raises(TypeError, match="model must be a path"):
        first_gguf.load(123)


@pytest.mark.parametrize("tensors,pattern", [
    ([("blk.3.router.weight", np.zeros((1, 577), np.float32))],
     r"'blk.3.router.weight' has wrong shape; expected \[576, 1\], got \[577, 1\]"),
    ([("blk.3.router.weight", np.zeros((1, 576), np.float16))],
     r"'blk.3.router.weight' has wrong type; expected F32, got F16"),
    ([("blk.3.router.weight", np.full((1, 576), np.nan, np.float32))], r"'blk.3.router.weight' holds NaN"),
    ([("blk.3.router.bias", np.zeros((1,), np.float32))], r"'blk.3.router.bias' has no matching"),
    ([("blk.30.router.weight", np.zeros((1, 576), np.float32))], r"names block 30; the model has 30 blocks"),
    ([("blk.2.router.gate", np.zeros((1, 576), np.float32))], r"unknown router tensor 'blk.2.router.gate'"),
])
def test_malformed_router_tensors(base_gguf, tmp_path, tensors, pattern):
    out = _with_router_tensors(base_gguf, tmp_path / "m.gguf", tensors)
    with pytest.raises(ValueError, match=pattern) as ei:
        first_gguf.load(out)
    assert "m.gguf" in str(ei.value)


def test_llama_cpp_itself_rejects_a_wrong_router_type(base_gguf, tmp_path):
    """The C++ loader checks too (for users of the C API who skip first_gguf's validation)."""
    from llama_cpp import Llama

    from first_gguf.model import _LOG

    out = _with_router_tensors(base_gguf, tmp_path / "f16.gguf",
                               [("blk.3.router.weight", np.zeros((1, 576), np.float16))])
    _LOG.lines.clear()
    with pytest.raises(ValueError):
        Llama(model_path=str(out), verbose=False)
    assert any("blk.3.router.weight' has wrong type; expected f32, got f16" in line for line in _LOG.lines)
    out = _with_router_tensors(base_gguf, tmp_path / "shape.gguf",
                               [("blk.3.router.weight", np.zeros((1, 577), np.float32))])
    _LOG.lines.clear()
    with pytest.raises(ValueError):
        Llama(model_path=str(out), verbose=False)
    assert any("blk.3.router.weight" in line and "wrong shape" in line for line in _LOG.lines)


# --------------------------------------------------------------------- CLI
@pytest.mark.parametrize("args,pattern", [
    (["generate", "Hi", "--skip-budget", "2"], "skip_budget must be in [0, 1)"),
    (["generate", "Hi", "--model", "/nonexistent/x.gguf"], "not found: /nonexistent/x.gguf"),
    (["generate", "Hi", "--skip-layers", "a,b"], "--skip-layers must be comma-separated integers"),
    (["info", "/nonexistent/x.gguf"], "not found"),
])
def test_cli_user_errors_are_one_line(router_gguf, args, pattern):
    if "--model" not in args and args[0] == "generate":
        args = args + ["--model", str(router_gguf)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code != 0
    assert pattern in res.output
    assert "Traceback" not in res.output


def test_chat_on_a_model_without_a_chat_template_uses_the_raw_text(tiny1):
    """A GGUF without tokenizer.chat_template (the tiny model): chat() replies to the messages' text as a
    raw prompt, the same tokens prompt_tokens_for counts (the terminal chat and the server count with it),
    instead of failing after the prompt was counted."""
    msgs = [{"role": "user", "content": "the sum of"}]
    assert not tiny1.has_chat_template
    tokens, stops = tiny1.prompt_tokens_for(msgs)
    assert tokens == tiny1.tokenize("the sum of\n") and stops == []
    g = tiny1.chat(msgs, max_tokens=5)
    assert g.tokens == tiny1.generate("the sum of\n", max_tokens=5).tokens and g.n_prompt_tokens == len(tokens)


def test_out_of_range_token_ids_raise_instead_of_aborting(base_gguf):
    """detokenize / token_bytes / a research sampler with an id outside [0, n_vocab) raise ValueError naming it;
    llama.cpp itself throws std::out_of_range and aborts the process (exit 134), so this runs in a child."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import first_gguf
        m = first_gguf.load({str(base_gguf)!r}, n_ctx=64, n_threads=1)
        calls = [lambda: m.detokenize([10**9]), lambda: m.detokenize([5, -1]), lambda: m.token_bytes(-1),
                 lambda: m.token_bytes(m.n_vocab),
                 lambda: m.generate_tokens(m.tokenize("Hi"), max_tokens=2, sampler=lambda logits: -1)]
        for call in calls:
            try:
                call()
                print("no error")
            except ValueError as e:
                print("ValueError:", e)
        print(repr(m.detokenize([])), m.detokenize(m.tokenize("Hello", add_bos=False)))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, (res.returncode, res.stderr[-2000:])
    lines = res.stdout.splitlines()
    assert lines[:5] == [
        "ValueError: detokenize token 1000000000 is not a token id in [0, 49152)",
        "ValueError: detokenize token -1 is not a token id in [0, 49152)",
        "ValueError: token_bytes token -1 is not a token id in [0, 49152)",
        "ValueError: token_bytes token 49152 is not a token id in [0, 49152)",
        "ValueError: sampler returned -1; expected a token id in [0, 49152)",
    ], res.stdout
    assert lines[5] == "'' Hello"


def test_repeated_skip_layers_are_refused(router_model):
    """skip_layers=[3, 3] was accepted silently (as [3]): a repeated block is most likely a typo."""
    with pytest.raises(ValueError, match=r"skip_layers lists block 3 more than once; got \[3, 3\]"):
        router_model.generate("Hi", skip_layers=[3, 3], max_tokens=2)
    with pytest.raises(ValueError, match=r"skip_layers lists blocks 2, 5 more than once"):
        router_model.score("Hi", " there", skip_layers=[5, 2, 5, 2])
    res = CliRunner().invoke(main, ["generate", "Hi", "--model", str(router_model.path), "--skip-layers", "4,4",
                                    "--threads", "1", "--max-tokens", "2"])
    assert res.exit_code == 1 and "Error: skip_layers lists block 4 more than once" in res.output, res.output
    assert router_model.generate("Hi", skip_layers=[5, 2], max_tokens=2).skipped_layers == [2, 5]
