"""Training data: token ids exactly as the runtime produces them (``encode_examples``, ``encode_prompts``),
batches, the task sampler, the on-policy prompt pool and the task data of a config."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from .config import TrainConfig


@dataclass
class Sequence_:
    prompt: list[int]
    cont: list[int]
    task: str


def encode_examples(model_path: str, examples, max_prompt: int, max_cont: int, *,
                    keep_short: bool = False) -> list[Sequence_]:
    """Token ids exactly as the runtime produces them (llama.cpp's tokenizer and chat template)."""
    from .. import load

    out = []
    if str(model_path).endswith(".gguf"):
        with load(model_path, n_ctx=max_prompt + max_cont + 8) as m:
            for ex in examples:
                p, _ = m.prompt_tokens_for(list(ex.messages))
                c = m.tokenize(ex.target, add_bos=False)
                out.append(Sequence_(p[-max_prompt:], c[:max_cont], ex.task))
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_path)
        for ex in examples:
            if tok.chat_template:
                p = tok.apply_chat_template(list(ex.messages), add_generation_prompt=True, tokenize=True)
                p = p["input_ids"] if isinstance(p, dict) or hasattr(p, "keys") else p
            else:  # no chat template: the messages' text, as a raw completion prompt
                p = tok("\n".join(m["content"] for m in ex.messages) + "\n")["input_ids"]
            c = tok(ex.target, add_special_tokens=False)["input_ids"]
            out.append(Sequence_(list(p)[-max_prompt:], c[:max_cont], ex.task))
    return out if keep_short else [s for s in out if len(s.prompt) >= 1 and len(s.cont) >= 2]


def encode_prompts(model_path: str, messages: Sequence[tuple], max_tokens: int = 4096) -> list[list[int]]:
    """Prompt token ids (chat template applied, generation prompt added) exactly as encode_examples makes
    them; an empty list for a prompt longer than ``max_tokens``."""
    from ..datasets.tasks import Example

    seqs = encode_examples(model_path, [Example("p", tuple(m), "x x", str(i)) for i, m in enumerate(messages)],
                           max_tokens + 1, 2, keep_short=True)
    return [s.prompt if len(s.prompt) <= max_tokens else [] for s in seqs]


def _batch(seqs: Sequence[Sequence_], pad: int, device=None):
    """(ids [B, T] right-padded, n_prompt [B], length [B]) on ``device`` (default: the CPU)."""
    import torch

    T = max(len(s.prompt) + len(s.cont) for s in seqs)
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    n_prompt = torch.tensor([len(s.prompt) for s in seqs])
    length = torch.tensor([len(s.prompt) + len(s.cont) for s in seqs])
    for i, s in enumerate(seqs):
        ids[i, : len(s.prompt) + len(s.cont)] = torch.tensor(s.prompt + s.cont)
    return ids.to(device), n_prompt.to(device), length.to(device)


def task_sampler(tasks: Sequence[str], balance: bool):
    """draw(rng) -> an index into ``tasks``: uniform over items, or over task names, then items."""
    if not tasks:
        raise ValueError("no training sequences to draw from")
    if not balance:
        return lambda rng: rng.randrange(len(tasks))
    by_task: dict[str, list[int]] = {}
    for i, t in enumerate(tasks):
        by_task.setdefault(t, []).append(i)
    groups = [by_task[t] for t in sorted(by_task)]
    return lambda rng: (g := groups[rng.randrange(len(groups))])[rng.randrange(len(g))]


def onpolicy_prompt_pool(cfg: TrainConfig, sequences: list[Sequence_], examples=None) -> list[Sequence_]:
    """The prompts on-policy samples start from (``cfg.onpolicy_data``), as Sequence_s without continuation:
    ``tasks``: the training examples' prompts (``examples``, re-encoded whole; without them the training
    sequences' prompts as given); ``bigbench`` / ``linux`` / ``broad`` (both) / ``chat``: first_gguf.datasets.broad.
    Prompts longer than max_prompt_tokens are dropped (not cut: a cut chat prompt loses its header)."""
    srcs = {x.strip() for x in cfg.onpolicy_data.split(",") if x.strip()}
    out, seen = [], set()

    def add(p, source):
        if 1 <= len(p) <= cfg.max_prompt_tokens and tuple(p) not in seen:
            seen.add(tuple(p))
            out.append(Sequence_(list(p), [], source))

    if "tasks" in srcs:
        if examples is not None:
            for p in encode_prompts(cfg.model, [ex.messages for ex in examples], cfg.max_prompt_tokens):
                add(p, "tasks")
        else:
            for s in sequences:
                add(s.prompt, "tasks")
    broad = sorted({"bigbench", "linux"} & srcs | ({"bigbench", "linux"} if "broad" in srcs else set()))
    if broad:
        from ..datasets.broad import broad_prompts

        recs = broad_prompts(tuple(broad), seed=cfg.seed)
        toks = encode_prompts(cfg.model, [({"role": "user", "content": r["prompt"]},) for r in recs])
        for r, p in zip(recs, toks):
            add(p, r["source"])
    if "chat" in srcs:
        from ..datasets.broad import chat_prompts

        recs = chat_prompts()
        for r, p in zip(recs, encode_prompts(cfg.model, [({"role": "user", "content": r["prompt"]},) for r in recs])):
            add(p, "chat")
    if not out:
        raise ValueError(f"no on-policy prompts from {cfg.onpolicy_data!r} within {cfg.max_prompt_tokens} tokens")
    return out


def training_data(cfg: TrainConfig):
    """(sequences, examples): cfg.tasks' train splits (+ docs supplement, extra data), tokenized as the
    runtime does (needs the llama.cpp runtime for a GGUF: on the GPU machine, carry them pre-tokenized)."""
    from ..datasets.tasks import load_task, parse_tasks, split

    examples = []
    rs = random.Random(cfg.seed)
    for t in parse_tasks(cfg.tasks):
        tr = split(load_task(t), "train", seed=0)
        rs.shuffle(tr)
        examples += tr[: cfg.max_examples_per_task]
    if cfg.docs_supplement:
        from ..datasets.tasks import docs_supplement

        extra = docs_supplement()
        rs.shuffle(extra)
        examples += extra[: cfg.max_examples_per_task]
    if cfg.extra_data:
        from ..datasets.tasks import read_examples_jsonl

        examples += read_examples_jsonl(cfg.extra_data)
    return encode_examples(cfg.model, examples, cfg.max_prompt_tokens, cfg.max_continuation_tokens), examples
