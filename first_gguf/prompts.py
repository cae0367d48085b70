"""A request's prompt side, checked and built: check_messages (OpenAI-style message dicts, as Model.chat takes
them), chat_template_tokens (messages rendered with a GGUF's chat template as llama-cpp-python renders them,
tokenized, with the template's stop strings) and check_stop (the stop strings a generation ends at)."""
from __future__ import annotations

from typing import Sequence


def check_messages(messages) -> None:
    """Raise TypeError unless ``messages`` is a non-empty list of dicts with str 'role' and 'content'."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise TypeError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise TypeError(f"messages[{i}] must be a dict with str 'role' and 'content'; got {m!r}")


def chat_template_tokens(llama, template: str, messages: Sequence[dict]) -> tuple[list[int], list[str]]:
    """Tokens of ``messages`` rendered with the Jinja chat ``template`` by ``llama`` (a llama_cpp.Llama: its
    BOS / EOS pieces and tokenizer), plus the template's stop strings."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    eos = llama.detokenize([llama.token_eos()], special=True).decode("utf-8", errors="replace")
    bos = llama.detokenize([llama.token_bos()], special=True).decode("utf-8", errors="replace")
    fmt = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos,
                              add_generation_prompt=True, stop_token_ids=[llama.token_eos()])
    res = fmt(messages=list(messages))
    tokens = llama.tokenize(res.prompt.encode("utf-8"), add_bos=not res.added_special, special=True)
    stops = res.stop if isinstance(res.stop, list) else ([res.stop] if res.stop else [])
    return tokens, [s for s in stops if s]


def check_stop(stop) -> list[str]:
    """``stop`` (None, a str or a list of str) as a list; the error shows the value given."""
    if stop is None:
        return []
    if isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, Sequence) and not isinstance(stop, bytes) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise TypeError(f"stop must be a str or a list of str; got {stop!r:.200}")
    if any(s == "" for s in stops):
        raise ValueError(f"stop strings must not be empty; got {stop!r:.200}")
    return stops
