"""The terminal chat, driven through a pseudo-terminal."""
from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

pexpect = pytest.importorskip("pexpect")

CLI = str(Path(sys.executable).with_name("first-gguf"))


def _spawn(router_gguf, *args):
    # Ctrl-C must reach the chat as KeyboardInterrupt even when this suite runs as a background job of a
    # non-interactive shell (CI), whose children start with SIGINT ignored (Python then keeps it ignored)
    # one thread: llama.cpp's worker threads spin while they wait, so two of them on a machine whose cores are
    # busy (a training run beside the suite) slowed a 400-token reply past the 180 s timeout
    child = pexpect.spawn(CLI, ["chat", "--model", str(router_gguf), "--threads", "1", *args], encoding="utf-8",
                          timeout=120, dimensions=(50, 200),
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    child.expect("/help for commands")
    child.expect("> ")
    return child


def test_two_turns_budget_and_layers(router_gguf):
    child = _spawn(router_gguf, "--max-tokens", "12")
    child.sendline("Name a colour.")
    child.expect("> ")
    child.sendline("/budget 0.2")
    child.expect(r"skip budget 0.2: 6 of 30 blocks")
    child.expect("> ")
    child.sendline("And an animal?")
    child.expect("> ")
    child.sendline("/layers")
    child.expect(r"skipped blocks \(router\): (\d+(, )?){6}\]")
    child.expect(r"router keep-scores: 0:")
    child.expect("> ")
    child.sendline("/stats")
    child.expect(r"reply \d+ tok at [\d.]+ tok/s")
    child.expect("> ")
    child.sendline("/budget 1.5")
    child.expect(r"\[error\] skip_budget must be in \[0, 1\)")
    child.expect("> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_stops_a_reply_and_context_overflow_drops_old_turns(router_gguf):
    child = _spawn(router_gguf, "--max-tokens", "400", "--n-ctx", "512", "--temperature", "0.8")
    child.sendline("Write a very long story about a dragon and a knight.")
    child.expect(r"knight\.\r\n")  # the echoed input
    child.expect(r"\w+ \w+ \w+")  # the reply is streaming
    child.sendintr()
    child.expect(r"\[stopped\]")
    child.expect("> ")
    for i in range(3):
        child.sendline("Tell me more about it, with many details. " * 4)
        idx = child.expect([r"context full: dropped the oldest turn", "> "], timeout=180)
        if idx == 0:
            break
    else:
        pytest.fail("the context never filled")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
