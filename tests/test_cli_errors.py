"""Bad input on the command line and in the terminal chat: one clear line, never a traceback, a crash or a
silent cut; nothing half-written."""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from first_gguf.cli import main

CLI = str(Path(sys.executable).with_name("first-gguf"))


def _cli(*args, timeout=120):
    """Run the installed CLI in a child process (a crash there cannot take the test run down)."""
    return subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "TERM": "dumb"})


def _error_line(output: str) -> str:
    """The one 'Error: ...' line; fails on a traceback or on more than one error line."""
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, output
    return lines[0]


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# ---------------------------------------------------------------- --threads (item 2)
@pytest.mark.parametrize("value", ["100000", "0"])
def test_threads_out_of_range_is_one_line_error(base_gguf, value):
    res = _cli("generate", "hi", "--model", base_gguf, "--max-tokens", "1", "--threads", value, timeout=60)
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    line = _error_line(res.stderr)
    assert "--threads" in line and value in line


@pytest.mark.parametrize("command", [["chat"], ["serve"], ["bench"], ["rank", "-o", "r.json"],
                                     ["eval", "-o", "out"], ["quantize", "a.gguf", "b.gguf", "--type", "Q4_0"],
                                     ["train", "--model", "m.gguf", "-o", "r.safetensors"]])
def test_every_threads_option_is_bounded(command):
    res = _invoke(*command, "--threads", 100000)
    assert res.exit_code == 2, res.output
    assert "--threads" in _error_line(res.output) and "100000" in res.output


# ---------------------------------------------------------------- serve (item 5)
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_port_out_of_range(base_gguf):
    res = _cli("serve", "--model", base_gguf, "--port", "99999", "--threads", "1", timeout=60)
    assert res.returncode == 2, res.stderr[-2000:]
    line = _error_line(res.stderr)
    assert "--port" in line and "99999" in line
    assert len(res.stderr.strip().splitlines()) <= 4  # click's usage lines and the error


def test_serve_port_in_use(base_gguf):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        res = _cli("serve", "--model", base_gguf, "--port", port, "--threads", "1", timeout=60)
    assert res.returncode == 1, res.stderr[-2000:]
    line = _error_line(res.stderr)
    assert f"127.0.0.1:{port}" in line and "in use" in line
    assert "serving" not in res.stderr


def test_serve_announces_only_a_bound_port(base_gguf):
    port = _free_port()
    proc = subprocess.Popen([CLI, "serve", "--model", str(base_gguf), "--port", str(port), "--threads", "1"],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            line = proc.stderr.readline()
            assert line, "serve exited before announcing the port"
            if "serving" in line:
                break
        assert f"http://127.0.0.1:{port}/v1" in line
        socket.create_connection(("127.0.0.1", port), timeout=1).close()  # refused if announced too early
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


# ---------------------------------------------------------------- quantize (item 6)
def test_quantize_into_missing_folder(base_gguf, tmp_path):
    missing = tmp_path / "missing" / "dir"
    res = _invoke("quantize", base_gguf, missing / "q.gguf", "--type", "Q4_0")
    assert res.exit_code == 1, res.output
    assert str(missing) in _error_line(res.output)
    assert not (tmp_path / "missing").exists()


def test_requantize_says_why_and_how(base_gguf, tmp_path):
    out = tmp_path / "q.gguf"
    res = _invoke("quantize", base_gguf, out, "--type", "Q4_0", "--threads", 1)
    assert res.exit_code == 1, res.output
    line = _error_line(res.output)
    assert "requantizing from type q4_1 is disabled" in line and "--allow-requantize" in line
    assert "code 1" not in line
    assert list(tmp_path.iterdir()) == []  # no partial output, no temporary file


# ---------------------------------------------------------------- convert (item 7)
def _corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    if how == "truncated":
        path.write_bytes(data[:-100])
    elif how == "short":
        path.write_bytes(data[:5])
    elif how == "header_length":
        path.write_bytes((len(data) * 2).to_bytes(8, "little") + data[8:])
    elif how == "header_json":
        path.write_bytes(data[:8] + b"{not json" + data[8 + 9:])
    elif how == "offsets":
        header = json.loads(data[8:8 + n])
        name = next(k for k in header if k != "__metadata__")
        header[name]["data_offsets"] = [0, 10 ** 9]
        h = json.dumps(header).encode()
        h += b" " * (-len(h) % 8)
        path.write_bytes(len(h).to_bytes(8, "little") + h + data[8 + n:])


@pytest.mark.parametrize("how", ["truncated", "short", "header_length", "header_json", "offsets"])
def test_convert_refuses_a_corrupt_safetensors_file(tiny, tmp_path, capfd, how):
    src, _ = tiny
    ckpt = tmp_path / "ckpt"
    shutil.copytree(src, ckpt)
    weights = ckpt / "model.safetensors"
    _corrupt(weights, how)
    res = _invoke("convert", ckpt, "-o", tmp_path / "out.gguf", "--outtype", "f32")
    err = capfd.readouterr().err  # the upstream converter writes to the real stderr
    assert res.exit_code == 1, res.output
    line = _error_line(res.output)
    assert str(weights) in line, line
    assert "Traceback" not in err  # the upstream converter never ran
    assert not (tmp_path / "out.gguf").exists()


def test_convert_refuses_a_missing_shard(tiny, tmp_path):
    src, _ = tiny
    ckpt = tmp_path / "ckpt"
    shutil.copytree(src, ckpt)
    (ckpt / "model.safetensors").rename(ckpt / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    res = _invoke("convert", ckpt, "-o", tmp_path / "out.gguf", "--outtype", "f32")
    assert res.exit_code == 1, res.output
    assert "model-00002-of-00002.safetensors" in _error_line(res.output)


# ---------------------------------------------------------------- attach --ranking (item 9)
@pytest.mark.parametrize("content, field, why", [
    ({"name": "r", "ranking": [1.7, 0.2]}, "ranking", "integers"),
    ({"name": "r", "ranking": ["a"]}, "ranking", "integers"),
    ({"name": "r", "ranking": [True, 2]}, "ranking", "integers"),
    ({"name": "r", "ranking": 3}, "ranking", "integers"),
    ({"ranking": [1, 0]}, "name", "missing"),
    ({"name": 5, "ranking": [1, 0]}, "name", "got 5"),
    (["a"], "name", "JSON object"),
])
def test_attach_ranking_errors_name_the_file_and_the_field(base_gguf, tmp_path, content, field, why):
    r = tmp_path / "r.json"
    r.write_text(json.dumps(content))
    out = tmp_path / "out.gguf"
    res = _invoke("attach", base_gguf, "--ranking", r, "-o", out)
    assert res.exit_code == 1, res.output
    line = _error_line(res.output)
    assert str(r) in line and f"'{field}'" in line and why in line, line
    assert not out.exists()


def test_convert_ranking_errors_name_the_file_and_the_field(tiny, tmp_path):
    src, _ = tiny
    r = tmp_path / "r.json"
    r.write_text(json.dumps({"name": "r", "ranking": [1.7, 0.2]}))
    res = _invoke("convert", src, "--ranking", r, "-o", tmp_path / "out.gguf")
    assert res.exit_code == 1, res.output
    assert str(r) in _error_line(res.output) and "'ranking'" in res.output


def test_safetensors_check_accepts_a_sound_file(tiny):
    from first_gguf.convert.hf import check_safetensors

    check_safetensors(tiny[0] / "model.safetensors")


def test_attach_api_refuses_fractional_blocks(base_gguf, tmp_path):
    from first_gguf.convert.attach import attach
    from first_gguf.convert.gguf_edit import GGUFEditError

    with pytest.raises(GGUFEditError, match=r"1\.7"):
        attach(base_gguf, tmp_path / "out.gguf", rankings={"r": {"ranking": [1.7, 0.2]}})
    assert not (tmp_path / "out.gguf").exists()


# ---------------------------------------------------------------- bench values (item 10)
@pytest.mark.parametrize("args, shown", [
    (["--repeats", "-3"], "-3"),
    (["--gen-tokens", "0"], "--gen-tokens"),
    (["--prompt-tokens", "1"], "--prompt-tokens"),
    (["--gen-tokens", "5000"], "5000"),
    (["--budgets", ","], "--budgets"),
    (["--budgets", "0.1,1.5"], "1.5"),
])
def test_bench_errors_show_the_value(base_gguf, args, shown):
    res = _invoke("bench", "--model", base_gguf, "--threads", 1, "--repeats", 1, *args)
    assert res.exit_code in (1, 2), res.output
    line = _error_line(res.output)
    assert shown in line, line


# ---------------------------------------------------------------- chat (items 4, 8, 10)
class _FakeModel:
    path = Path("fake.gguf")
    n_layer, n_ctx = 30, 4096

    def n_skip_for_budget(self, budget):
        return 0


class _FakeSession:
    """What run() needs of a ChatSession; records the messages."""

    def __init__(self):
        self.model, self.skip_budget, self.max_tokens, self.max_tokens_asked = _FakeModel(), 0.0, 512, 512
        self.texts, self.commands, self.printed = [], [], []
        self.sampling = {}

    def _print(self, text="", end="\n"):
        self.printed.append(text)

    def command(self, line):
        self.commands.append(line)
        return line.strip() != "/quit"

    def turn(self, text):
        self.texts.append(text)


def _reader(lines):
    it = iter(lines)

    def read(prompt):
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None
    return read


def test_chat_triple_quote_block_is_one_message():
    from first_gguf.chat import run

    s = _FakeSession()
    run(s, _reader(['"""', "first line", "", "/not a command", '"""', '"""one line"""', '"""a', 'b"""', "x"]))
    assert s.texts == ["first line\n\n/not a command", "one line", "a\nb", "x"]
    assert s.commands == []


def test_chat_long_and_multiline_messages_are_acknowledged():
    from first_gguf.chat import run

    s = _FakeSession()
    run(s, _reader(["abc " * 7500, '"""', "a", "b", '"""']))
    assert s.texts == ["abc " * 7500, "a\nb"]
    assert "[message: 30000 characters, 1 line]" in s.printed
    assert "[message: 3 characters, 2 lines]" in s.printed


def _spawn_chat(base_gguf, *args):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(CLI, ["chat", "--model", str(base_gguf), "--threads", "1", *args], encoding="utf-8",
                          timeout=120, dimensions=(50, 200), env={**os.environ, "TERM": "xterm"})
    child.expect("/help for commands")
    child.expect("> ")
    return child


def test_chat_long_paste_arrives_whole(base_gguf):
    pexpect = pytest.importorskip("pexpect")
    child = _spawn_chat(base_gguf, "--n-ctx", "1024", "--max-tokens", "8")
    child.send("abc " * 7500 + "\r")  # 30,000 characters on one line: a terminal in line mode keeps 4,095
    child.expect(r"\[message: (\d+) characters")
    assert child.match.group(1) == "30000"
    child.expect(r"\[error\] the message alone has (\d+) tokens")
    assert int(child.match.group(1)) > 7000
    child.expect("> ")
    child.send("\x1b[200~Name a colour.\nJust one word.\x1b[201~\r")  # a bracketed (terminal) paste of two lines
    child.expect(r"\[message: 29 characters, 2 lines\]")
    child.expect("> ")
    child.sendline("/quit")
    child.expect(pexpect.EOF)


def test_chat_max_tokens_beyond_the_context_is_clamped_at_start(base_model):
    from first_gguf.chat import ChatSession, run

    out = io.StringIO()
    s = ChatSession(base_model, max_tokens=5000, out=out)  # base_model has n_ctx 2048
    assert s.max_tokens == 1024
    s.messages = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello! " * 50},
                  {"role": "user", "content": "Name a colour."}]
    s._fit_context()
    assert len(s.messages) == 3  # the history is kept
    run(s, _reader([]))
    assert "--max-tokens 5000 is more than half of n_ctx 2048" in out.getvalue()


def test_chat_budget_not_a_number(base_model):
    from first_gguf.chat import ChatSession

    out = io.StringIO()
    s = ChatSession(base_model, out=out)
    s.command("/budget abc")
    assert out.getvalue().strip() == "[error] /budget needs a number F with 0 <= F < 1; got 'abc'"
    assert s.skip_budget == 0.0


# ---------------------------------------------------------------- sampling options of generate and chat
def _generate_json(base_gguf, *args):
    res = _invoke("generate", "Name a colour.", "--model", base_gguf, "--threads", 1, "--max-tokens", 6, "--json",
                  *args)
    assert res.exit_code == 0, res.output
    return json.loads(res.output[res.output.index("{"):])


def test_generate_sampling_options_reach_the_sampler(base_gguf):
    a = _generate_json(base_gguf, "--temperature", 1, "--top-k", 50, "--seed", 3)
    b = _generate_json(base_gguf, "--temperature", 1, "--top-k", 50, "--seed", 3)
    assert a["tokens"] == b["tokens"] and a["seed"] == 3
    forced = _generate_json(base_gguf, "--logit-bias", "28=100", "--logprobs", 2)
    assert forced["tokens"] == [28] * 6
    assert len(forced["logprobs"]) == 6 and len(forced["logprobs"][0]["top"]) == 2
    yes_no = _generate_json(base_gguf, "--grammar", 'root ::= "yes" | "no"')
    assert yes_no["text"] in ("yes", "no")


def test_generate_default_is_greedy(base_gguf):
    assert _generate_json(base_gguf)["tokens"] == _generate_json(base_gguf, "--top-k", 1, "--temperature", 1)["tokens"]


@pytest.mark.parametrize("args, shown", [
    (["--top-p", "1.5"], "--top-p"), (["--temperature", "-1"], "--temperature"), (["--min-p", "2"], "--min-p"),
    (["--logit-bias", "5:3"], "5:3"), (["--grammar-file", "/no/such.gbnf"], "/no/such.gbnf"),
])
@pytest.mark.parametrize("command", [["generate", "hi"], ["chat"]])
def test_bad_sampling_options_fail_before_loading(base_gguf, command, args, shown):
    res = _invoke(*command, "--model", base_gguf, *args)
    assert res.exit_code == 1, res.output
    assert shown in _error_line(res.output)


def test_chat_samples_with_llama_cpp_defaults(base_gguf, monkeypatch):
    sessions = []
    monkeypatch.setattr("first_gguf.chat.run", sessions.append)
    assert _invoke("chat", "--model", base_gguf, "--threads", 1).exit_code == 0
    assert _invoke("chat", "--model", base_gguf, "--threads", 1, "--temperature", 0, "--repeat-penalty", 1.1,
                   "--seed", 7).exit_code == 0
    default, greedy = (s.sampling for s in sessions)
    assert {k: default[k] for k in ("temperature", "top_k", "top_p", "min_p")} == \
        {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05}
    assert greedy["temperature"] == 0 and greedy["repeat_penalty"] == 1.1
    assert sessions[1].model.seed == 7


def test_chat_without_readline_refuses_a_line_at_the_terminal_limit(monkeypatch):
    from first_gguf import chat

    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdin", Tty())
    monkeypatch.setitem(sys.modules, "readline", None)  # import readline -> ImportError
    typed = ["x" * chat.TTY_LINE_MAX, "short", "y" * chat.TTY_LINE_MAX]
    monkeypatch.setattr("builtins.input", _reader(typed))
    read = chat.terminal_input()
    with pytest.raises(chat.LineCut, match="4095 characters"):
        read("> ")
    assert read("> ") == "short"
    s = _FakeSession()
    chat.run(s, read)  # the third line, then EOF
    assert s.texts == [] and any("[error] the line has 4095 characters" in p for p in s.printed)


@pytest.mark.parametrize("command", [["generate", "hi"], ["chat"]])
def test_max_tokens_below_one_fails_before_loading(command):
    res = _invoke(*command, "--model", "/no/such/model.gguf", "--max-tokens", 0)  # a load would fail otherwise
    assert res.exit_code == 2, res.output
    line = _error_line(res.output)
    assert "--max-tokens" in line and "0" in line


def test_chat_refuses_a_bad_grammar_at_start(base_gguf, monkeypatch):
    """GBNF is parsed only when a sampler chain is built: chat builds one at start, not at the first message."""
    sessions = []
    monkeypatch.setattr("first_gguf.chat.run", sessions.append)
    res = _invoke("chat", "--model", base_gguf, "--threads", 1, "--grammar", "root ::= (")
    assert res.exit_code == 1 and sessions == [], res.output
    assert "grammar is not valid GBNF" in _error_line(res.output)
    assert _invoke("chat", "--model", base_gguf, "--threads", 1, "--grammar", 'root ::= "yes"').exit_code == 0
    assert sessions[0].sampling["grammar"] == 'root ::= "yes"'


def test_chat_states_the_session_seed_when_sampling(base_model):
    """A sampled session can be replayed: the start line gives the seed --seed takes (not when greedy)."""
    from first_gguf.chat import ChatSession, run

    for sampling, shown in (({}, True), ({"temperature": 0.0}, False)):
        out = io.StringIO()
        run(ChatSession(base_model, out=out, **sampling), _reader([]))
        assert (f"blocks), seed {base_model.seed}. /help" in out.getvalue()) == shown, out.getvalue()


# ---------------------------------------------------------------- rank: the output path checked before computing
def test_rank_checks_its_output_before_loading_or_computing(tmp_path, monkeypatch):
    """An output that cannot be written is refused before the model loads (rank computes for minutes)."""
    from first_gguf import cli

    def no_load(*a, **k):
        raise AssertionError("rank loaded the model before checking its output")

    monkeypatch.setattr(cli, "load_model", no_load)
    missing = tmp_path / "nonexistent-dir"
    res = _invoke("rank", "--model", tmp_path / "m.gguf", "-o", missing / "r.json", "--threads", 1)
    assert res.exit_code == 1, res.output
    assert f"output folder does not exist: {missing}" in _error_line(res.output)
    res = _invoke("rank", "--model", tmp_path / "m.gguf", "-o", tmp_path, "--threads", 1)
    assert res.exit_code != 0 and str(tmp_path) in _error_line(res.output)
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        res = _invoke("rank", "--model", tmp_path / "m.gguf", "-o", locked / "r.json", "--threads", 1)
        assert res.exit_code == 1 and f"not writable: {locked}" in _error_line(res.output)


def test_rank_write_failure_keeps_the_result(tiny_gguf_model, tmp_path, monkeypatch):
    """A folder that goes away while rank computes: the ranking goes to stdout, the error says so."""
    from first_gguf import cli, ranking

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    real = ranking.compute_static_ranking

    def compute_then_remove(*a, **k):
        res = real(*a, **{**k, "n_examples": 2, "max_set": 1, "n_candidates": 1})
        out_dir.rmdir()
        return res

    monkeypatch.setattr(ranking, "compute_static_ranking", compute_then_remove)
    res = _invoke("rank", "--model", tiny_gguf_model.path, "-o", out_dir / "r.json", "--threads", 1)
    assert res.exit_code == 1, res.output
    assert "printed to stdout" in _error_line(res.output)
    printed = json.loads(res.stdout[:res.stdout.rindex("}") + 1])
    assert sorted(printed["ranking"]) == list(range(tiny_gguf_model.n_layer))


def test_rank_reports_progress_within_each_phase(tiny_gguf_model):
    from first_gguf.ranking import compute_static_ranking

    lines = []
    compute_static_ranking(tiny_gguf_model, n_examples=2, max_set=1, n_candidates=2, progress=lines.append,
                           progress_every=0.0)
    n = tiny_gguf_model.n_layer
    assert lines[0].startswith("rank: building 2 calibration examples")
    assert any(line.startswith("rank: measuring the cost of each of the 4 blocks") for line in lines)
    # within the single-block phase: a line per (example, block) pair but the last, when every=0
    assert [line.rsplit(" (", 1)[0] for line in lines if "single-block costs (examples x sets):" in line] == \
        [f"rank: single-block costs (examples x sets): {i}/{2 * n}" for i in range(1, 2 * n)]
    assert any(line.startswith("rank: step 1 (examples x sets): 1/4") for line in lines)


# ---------------------------------------------------------------- a sidecar given as a model
def test_strip_and_quantize_refuse_a_sidecar(base_gguf, tmp_path):
    """strip wrote a useless 305-byte file and quantize said "key not found in model: llama.context_length":
    both now say the file is a sidecar, not a model, and write nothing."""
    import numpy as np

    from first_gguf.convert.attach import write_sidecar
    from first_gguf.gguf_info import read_info

    info = read_info(base_gguf)
    rng = np.random.default_rng(0)
    side = write_sidecar(base_gguf, tmp_path / "side.gguf",
                         routers={il: (rng.standard_normal(info.n_embd).astype(np.float32), 0.0) for il in range(3)})
    for args in (["strip", side, "-o", tmp_path / "x.gguf"],
                 ["quantize", side, tmp_path / "q.gguf", "--type", "Q4_0", "--threads", 1]):
        res = _invoke(*args)
        assert res.exit_code == 1, res.output
        line = _error_line(res.output)
        assert f"{side} is a first-gguf sidecar" in line and "not a model" in line, line
        assert "context_length" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["side.gguf"]


def test_generate_seed_minus_one_is_random_and_shown(base_gguf):
    """--seed -1 (llama.cpp's "random") is accepted; the seed drawn is reported, so the text can be replayed."""
    args = ["generate", "Name a fruit.", "--model", base_gguf, "--temperature", 1, "--max-tokens", 4,
            "--threads", 1]
    res = _invoke(*args, "--seed", -1, "--json")
    assert res.exit_code == 0, res.output
    seed = json.loads(res.stdout)["seed"]
    assert isinstance(seed, int) and 0 <= seed <= 0xFFFFFFFE
    again = _invoke(*args, "--seed", seed, "--json")
    assert json.loads(again.stdout)["tokens"] == json.loads(res.stdout)["tokens"]
    res = _invoke(*args, "--seed", -1)
    assert res.exit_code == 0 and " | seed " in res.stderr, res.output


@pytest.mark.parametrize("args,shown", [
    (["--logprobs", 3], "--logprobs 3 needs --json"),
    (["--raw", "--system", "Be brief."], "--system needs --chat"),
])
def test_generate_refuses_options_it_would_ignore(args, shown):
    """--logprobs without --json and --system with --raw were silently ignored; refused before loading."""
    res = _invoke("generate", "hi", "--model", "/no/such/model.gguf", *args)  # a load would fail otherwise
    assert res.exit_code == 1, res.output
    assert shown in _error_line(res.output)


# ---------------------------------------------------------------- grammar errors, repeated skip_layers, n_ctx above training
@pytest.mark.parametrize("grammar,why", [
    ("root ::= (", "expecting ')' at the end of the grammar"),
    ('root ::= "a" ) x', "expecting newline or end at ') x'"),
    ('root ::= "a" | foo', "Undefined rule identifier 'foo'"),
])
def test_bad_grammar_is_one_line_naming_the_fault(base_gguf, grammar, why):
    """llama.cpp prints its GBNF parse error (three lines) straight to stderr; the CLI shows only its one Error line,
    which now carries llama.cpp's reason."""
    res = _cli("generate", "hi", "--model", base_gguf, "--threads", 1, "--max-tokens", 2, "--grammar", grammar)
    assert res.returncode == 1, res.stderr
    assert res.stderr.strip().splitlines() == [f"Error: grammar is not valid GBNF (with a 'root' rule): {why}"], \
        res.stderr


def test_grammar_errors_leave_stderr_alone_in_the_api(base_model, capfd):
    capfd.readouterr()
    with pytest.raises(ValueError, match=r"not valid GBNF \(with a 'root' rule\): expecting '\)' at the end"):
        base_model.generate("hi", grammar="root ::= (", max_tokens=2)
    assert capfd.readouterr().err == ""
    assert base_model.generate("hi", grammar='root ::= "yes"', max_tokens=2).text == "yes"
    assert capfd.readouterr().err == ""


def test_n_ctx_above_training_context_warns_and_zero_means_training_context(tiny_gguf_model):
    """The tiny model was trained on 1024 tokens: n_ctx 2048 warns (API: UserWarning; CLI: one Warning line);
    n_ctx=0 is llama-cpp-python's "the model's training context"."""
    import warnings

    import first_gguf

    path = tiny_gguf_model.path
    with pytest.warns(UserWarning, match=r"n_ctx 2048 is above the context tiny.gguf was trained on \(1024 tokens\)"):
        first_gguf.load(path, n_ctx=2048, n_threads=1).close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with first_gguf.load(path, n_ctx=0, n_threads=1) as m:
            assert m.n_ctx == m.n_ctx_train == 1024
        first_gguf.load(path, n_ctx=1024, n_threads=1).close()
    with pytest.raises(ValueError, match=r"n_ctx must be 0 \(the model's training context\) or >= 16; got 8"):
        first_gguf.load(path, n_ctx=8, n_threads=1)
    res = _invoke("generate", "hi", "--model", path, "--threads", 1, "--max-tokens", 2, "--raw", "--n-ctx", 2048)
    assert res.exit_code == 0, res.output
    warned = [line for line in res.stderr.splitlines() if line.startswith("Warning:")]
    assert len(warned) == 1 and "above the context tiny.gguf was trained on (1024 tokens)" in warned[0], res.stderr
    assert "UserWarning" not in res.stderr


def test_train_checks_its_inputs_before_loading_the_model(base_gguf, tmp_path, monkeypatch):
    """A truncated GGUF, an unreadable --init-routers file and an unknown --data name are refused in one line
    before the model is loaded (transformers' GGUF reader, minutes and a 53-line traceback) or any task data
    is downloaded."""
    from first_gguf.train import loop as train_loop

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(train_loop, "load_frozen_model", no_load)
    truncated = tmp_path / "truncated.gguf"
    with open(base_gguf, "rb") as f:
        truncated.write_bytes(f.read(1 << 16))
    bad_routers = tmp_path / "r.safetensors"
    bad_routers.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    out = str(tmp_path / "o.safetensors")
    cases = [
        (["--model", str(truncated)], [str(truncated), "not a readable GGUF"]),
        (["--model", str(base_gguf), "--init-routers", str(bad_routers)], [str(bad_routers)]),
        (["--model", str(base_gguf), "--data", "nope"], ["unknown task 'nope'"]),
        (["--model", str(tmp_path / "missing.gguf")], ["model not found", "missing.gguf"]),
    ]
    for args, wants in cases:
        res = CliRunner().invoke(main, ["train", *args, "-o", out, "--steps", "1"])
        assert res.exit_code != 0, res.output
        assert "Traceback" not in res.output and "was loaded before" not in str(res.exception or "")
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error:"), res.output
        assert all(w in lines[0] for w in wants), res.output
