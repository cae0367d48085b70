"""Terminal chat: streaming, multi-turn, with the skip budget adjustable between turns.

Commands: /budget F, /layers, /stats, /reset, /help, /quit. Ctrl-C stops the
current reply and keeps the conversation (with the partial reply); Ctrl-D
exits. Input goes through GNU readline when stdin is a terminal, so a long
paste arrives whole (a terminal in line mode keeps only 4,095 characters of a
line) and a multi-line paste is one message; lines between two \"\"\" lines are
one message too. When the conversation no longer fits the context, the oldest
turns are dropped with a notice; a reply may take at most half the context, so
the conversation always keeps the other half. Turns generated with skipping are
re-evaluated at full depth when the conversation continues (Model's KV
handling), so every turn sees exactly what the full model would.
"""
from __future__ import annotations

import math
import sys
from typing import Callable, TextIO

from .model import Generation, Model
from .sampling import CHAT_DEFAULTS, SamplingParams

HELP = """commands:
  /budget F   set the skip budget (fraction of blocks skipped while decoding, 0 <= F < 1)
  /layers     skipped blocks and router scores of the last reply
  /stats      prefill and decode speed of the last reply
  /reset      forget the conversation
  /help       this text
  /quit       leave (or Ctrl-D); Ctrl-C stops a reply and keeps the conversation
a message of several lines: paste it, or type \"\"\" alone on a line, the lines, and \"\"\" again"""

BLOCK = '"""'
TTY_LINE_MAX = 4095  # Linux's line-mode (canonical) terminal input keeps this many characters of a line
NOTICE_CHARS = 1000  # a message this long, or of several lines, is acknowledged with its size


class ChatSession:
    """A conversation with ``model``: turn() streams a reply to ``out``, command() runs a /command.

    ``sampling``: Model.generate()'s sampling keywords (temperature, top_k, top_p, min_p, typical_p,
    repeat_penalty, presence_penalty, frequency_penalty, seed, logit_bias, grammar); unset ones take
    llama.cpp's chat defaults (CHAT_DEFAULTS). A reply takes at most half of n_ctx (``max_tokens`` is
    capped there; ``max_tokens_asked`` keeps the value given)."""

    def __init__(self, model: Model, *, skip_budget: float = 0.0, skip_strategy: str = "auto",
                 system: str | None = None, max_tokens: int = 512, out: TextIO = sys.stdout, **sampling):
        self.model = model
        model.check_skip(skip_budget, skip_strategy, None)  # fail early on a bad budget/strategy
        self.sampling = {**CHAT_DEFAULTS, **sampling}
        SamplingParams.check(model.n_vocab, **self.sampling)  # ... and on a bad sampling option
        if self.sampling.get("grammar") is not None:  # GBNF is parsed when a chain is built: build one now
            model.make_sampler(**{**self.sampling, "temperature": 0.0}).close()  # (temperature 0 draws no seed)
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1; got {max_tokens!r}")
        self.skip_budget = skip_budget
        self.skip_strategy = skip_strategy
        self.system = system
        self.max_tokens_asked = max_tokens
        # a reply may take at most half the context: a larger reserve would push the whole history out every turn
        self.max_tokens = min(max_tokens, model.n_ctx // 2)
        self.out = out
        self.messages: list[dict] = []
        self.last: Generation | None = None

    def _print(self, text: str = "", end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    def _conversation(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def _fit_context(self) -> None:
        """Drop the oldest turns until the prompt plus a reply fits n_ctx."""
        while True:
            tokens, _ = self.model.prompt_tokens_for(self._conversation())
            if len(tokens) + self.max_tokens <= self.model.n_ctx or len(self.messages) <= 1:
                if len(tokens) >= self.model.n_ctx:
                    raise ValueError(f"the message alone has {len(tokens)} tokens; n_ctx is {self.model.n_ctx}")
                return
            drop = 2 if len(self.messages) > 2 and self.messages[1]["role"] == "assistant" else 1
            del self.messages[:drop]
            self._print(f"[context full: dropped the oldest turn ({self.model.n_ctx} tokens)]")

    def command(self, line: str) -> bool:
        """Handle a /command; returns False to quit."""
        cmd, _, arg = line.strip().partition(" ")
        if cmd in ("/quit", "/exit"):
            return False
        if cmd == "/help":
            self._print(HELP)
        elif cmd == "/budget":
            try:
                value = float(arg)
            except ValueError:
                self._print(f"[error] /budget needs a number F with 0 <= F < 1; got {arg!r}" if arg.strip()
                            else "[error] usage: /budget F with 0 <= F < 1")
                return True
            try:
                self.model.check_skip(value, self.skip_strategy, None)
            except (ValueError, TypeError) as e:
                self._print(f"[error] {e}")
            else:
                self.skip_budget = value
                k = self.model.n_skip_for_budget(value)
                self._print(f"[skip budget {value:g}: {k} of {self.model.n_layer} blocks skipped while decoding]")
        elif cmd == "/layers":
            if self.last is None:
                self._print("[no reply yet]")
            else:
                g = self.last
                self._print(f"[skipped blocks ({g.skip_strategy}): {', '.join(map(str, g.skipped_layers)) or 'none'}]")
                if g.router_scores is not None:
                    self._print("[router keep-scores: " + " ".join(
                        f"{il}:{'-' if math.isnan(s) else f'{s:.3f}'}" for il, s in enumerate(g.router_scores)) + "]")
        elif cmd == "/stats":
            if self.last is None:
                self._print("[no reply yet]")
            else:
                g = self.last
                self._print(f"[prompt {g.n_prompt_tokens} tok ({g.n_prefill_tokens} evaluated) at "
                            f"{g.prefill_tokens_per_s:.1f} tok/s; reply {len(g.tokens)} tok at "
                            f"{g.decode_tokens_per_s:.1f} tok/s; {g.finish_reason}]")
        elif cmd == "/reset":
            self.messages.clear()
            self.model.reset()
            self.last = None
            self._print("[conversation reset]")
        else:
            self._print(f"[unknown command {cmd!r}; /help lists them]")
        return True

    def turn(self, text: str) -> Generation | None:
        self.messages.append({"role": "user", "content": text})
        reply, gen, stream = "", None, None
        try:
            try:
                self._fit_context()
            except ValueError as e:
                self.messages.pop()
                self._print(f"[error] {e}")
                return None
            stream = self.model.stream_chat(self._conversation(), self.skip_budget, max_tokens=self.max_tokens,
                                            skip_strategy=self.skip_strategy, **self.sampling)
            for chunk in stream:
                if chunk.text:
                    reply += chunk.text
                    self._print(chunk.text, end="")
                gen = chunk.generation or gen
        except KeyboardInterrupt:
            if stream is not None:
                stream.close()  # runs the generator's cleanup: mask cleared, skipped cells dropped
            self._print(" [stopped]")
        else:
            self._print()
        self.messages.append({"role": "assistant", "content": gen.text if gen else reply})
        self.last = gen or self.last
        return gen


class LineCut(ValueError):
    """A terminal line reached the line-mode limit, so its end was probably lost."""


def terminal_input() -> Callable[[str], str]:
    """input(), through GNU readline when stdin is a terminal.

    readline reads key by key, so a line is not cut at the terminal's line-mode
    limit, and its bracketed paste keeps a multi-line paste as one message. Where
    readline is missing, a line as long as that limit is refused (LineCut).
    """
    if not sys.stdin.isatty():
        return input
    try:
        import readline  # noqa: F401  (importing it is what makes input() use it)
    except ImportError:
        def read(prompt: str) -> str:
            line = input(prompt)
            if len(line) >= TTY_LINE_MAX:
                raise LineCut(f"the line has {len(line)} characters, the terminal's limit, so its end was probably "
                              f"cut; nothing was sent. Send long text as several lines in a {BLOCK} block")
            return line
        return read
    return input


def read_block(first: str, read: Callable[[str], str]) -> str:
    """The message of a \"\"\" block whose opening line is ``first``: its lines joined by newlines, up to a
    line ending in \"\"\" (text beside either \"\"\" belongs to the message)."""
    first = first.lstrip()[len(BLOCK):]
    if first.rstrip().endswith(BLOCK):
        return first.rstrip()[:-len(BLOCK)]
    lines = [first] if first.strip() else []
    while True:
        line = read("... ")
        if line.rstrip().endswith(BLOCK):
            last = line.rstrip()[:-len(BLOCK)]
            return "\n".join(lines + ([last] if last.strip() else []))
        lines.append(line)


def run(session: ChatSession, read: Callable[[str], str] | None = None) -> None:
    read = read or terminal_input()
    # the session's replies draw their seeds from the model's generator: its seed (--seed) replays the session
    seed = f", seed {session.model.seed}" if session.sampling.get("temperature", 0) > 0 else ""
    session._print(f"first-gguf chat: {session.model.path.name}, skip budget {session.skip_budget:g} "
                   f"({session.model.n_skip_for_budget(session.skip_budget)} of {session.model.n_layer} blocks)"
                   f"{seed}. /help for commands, Ctrl-D to leave.")
    if session.max_tokens < session.max_tokens_asked:
        session._print(f"[--max-tokens {session.max_tokens_asked} is more than half of n_ctx {session.model.n_ctx}: "
                       f"replies stop at {session.max_tokens} tokens so the conversation keeps the other half; "
                       f"raise --n-ctx for longer replies]")
    while True:
        try:
            text = line = read("> ")
            if line.lstrip().startswith(BLOCK):
                text = read_block(line, read)
        except EOFError:
            session._print()
            return
        except KeyboardInterrupt:
            session._print()
            continue
        except LineCut as e:
            session._print(f"[error] {e}")
            continue
        if not text.strip():
            continue
        if text is line and line.startswith("/") and "\n" not in line:  # a pasted block is a message
            if not session.command(line):
                return
            continue
        n_lines = text.count("\n") + 1
        if n_lines > 1 or len(text) >= NOTICE_CHARS:
            session._print(f"[message: {len(text)} characters, {n_lines} line{'s' if n_lines > 1 else ''}]")
        session.turn(text)
