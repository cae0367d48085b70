"""Greedy answers to everyday chat prompts: full depth next to skipped decoding, as a Markdown page.

    .venv/bin/python scripts/side_by_side.py --budget 0.2 -o docs/results/side_by_side_0.2.md

Columns: full model; routers + bypass adapters (what `generate --skip-budget B` does); the same routers
without the adapters (plain skipping, `--no-bypass`); the static ranking + bypass adapters. With
`--decode-lora FILE`, also routers and static ranking + bypasses + that decode-only LoRA.

On top, a loop measure over PROMPTS + MORE_PROMPTS (24 prompts; the page shows the first 8 in full):
the share of a reply's word 4-grams that already occurred earlier in the same reply (0 = no repeated
phrase; a reply stuck in a loop approaches 1), averaged over prompts, and the share of replies with more
than 20% repeated 4-grams. None of these prompts is in any training set.

    .venv/bin/python scripts/side_by_side.py --per-block -o docs/results/loops_per_block.md

`--per-block`: the same loop measure with one block skipped at a time (each block that has a bypass
adapter, adapter on): which blocks the loops come from.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import first_gguf

PROMPTS = [
    "Explain why the sky is blue.",
    "Give me three tips for sleeping better.",
    "What is the capital of France, and what is it famous for?",
    "Write a short email asking my landlord to fix the heating.",
    "How do I boil an egg?",
    "What is the difference between a virus and a bacterium?",
    "Suggest a name for a small coffee shop.",
    "Summarize the plot of Romeo and Juliet in two sentences.",
]
MORE_PROMPTS = [  # only for the loop measure
    "How can I save money on groceries?",
    "Why do cats purr?",
    "Write a haiku about autumn.",
    "What should I pack for a weekend hiking trip?",
    "Explain what a computer virus is to a child.",
    "How do plants make their food?",
    "Give me a simple recipe for pancakes.",
    "What are the benefits of regular exercise?",
    "How do I write a good cover letter?",
    "Why is the ocean salty?",
    "Describe a typical day of a nurse.",
    "What is the difference between weather and climate?",
    "How do I start learning to play the guitar?",
    "Tell me a fun fact about octopuses.",
    "What causes earthquakes?",
    "How can I be more productive when working from home?",
]


def repeated_4grams(text: str) -> float:
    """Share of the word 4-grams of ``text`` that already occurred earlier in it (0 when < 2 of them)."""
    w = text.lower().split()
    grams = [tuple(w[i:i + 4]) for i in range(len(w) - 3)]
    if len(grams) < 2:
        return 0.0
    seen, rep = set(), 0
    for g in grams:
        rep += g in seen
        seen.add(g)
    return rep / len(grams)


def loop_row(name: str, texts: list[str]) -> str:
    """A Markdown table row: ``name``, mean repeated-4-gram share, replies above 20%."""
    r = [repeated_4grams(t) for t in texts]
    return f"| {name} | {sum(r) / len(r):.1%} | {sum(x > 0.2 for x in r)}/{len(r)} |"


def write_page(path: str, lines: list[str]) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GGUF (default: the embedded model)")
    ap.add_argument("--budget", type=float, default=0.2)
    ap.add_argument("--max-tokens", type=int, default=80)
    ap.add_argument("--per-block", action="store_true", help="loop measure per single skipped block instead")
    ap.add_argument("--decode-lora", default=None, help="decode-only LoRA adapter GGUF: adds columns with it")
    ap.add_argument("-o", "--output", required=True)
    args = ap.parse_args()

    m = first_gguf.load(args.model, n_ctx=2048, decode_lora=args.decode_lora)
    if args.per_block:
        return per_block(m, args)
    k = m.n_skip_for_budget(args.budget)
    router, static = dict(skip_budget=args.budget, skip_strategy="router"), dict(skip_budget=args.budget,
                                                                                  skip_strategy="static")
    # (name, generate arguments, bypass adapters on, decode LoRA on)
    configs = [("full model", dict(skip_budget=0.0), True, False)]
    if args.decode_lora:
        configs += [(f"router + bypass + LoRA ({k} blocks skipped)", router, True, True),
                    ("router + bypass", router, True, False)]
    else:
        configs += [(f"router + bypass ({k} blocks skipped)", router, True, False)]
    configs += [("router, no bypass", router, False, False)]
    if args.decode_lora:
        configs += [("static + bypass + LoRA", static, True, True)]
    configs += [("static + bypass", static, True, False)]
    replies = {}
    for prompt in PROMPTS + MORE_PROMPTS:
        for name, kw, bypass, lora in configs:
            m.bypass, m.use_decode_lora = bypass, lora
            replies[prompt, name] = m.chat([{"role": "user", "content": prompt}], max_tokens=args.max_tokens, **kw)
        m.bypass, m.use_decode_lora = True, True
    lines = [f"# Greedy answers at skip_budget {args.budget:g} ({k} of {m.n_layer} blocks skipped while decoding)", "",
             f"Model: `{Path(m.path).name}`"
             + (f", decode LoRA `{Path(args.decode_lora).name}`" if args.decode_lora else "")
             + f"; greedy, {args.max_tokens} tokens at most; generated by "
             f"`scripts/side_by_side.py`. Same prompt, same runtime; only the decode-time skipping differs.", "",
             f"Loops over {len(PROMPTS) + len(MORE_PROMPTS)} everyday prompts (the {len(PROMPTS)} below and "
             f"{len(MORE_PROMPTS)} more; none in any training set): mean share of a reply's word 4-grams that "
             f"repeat an earlier one in the same reply, and the share of replies above 20%.", "",
             "| configuration | repeated 4-grams (mean) | replies > 20% repeated |", "|---|---|---|"]
    for name, *_ in configs:
        lines.append(loop_row(name, [replies[p, name].text for p in PROMPTS + MORE_PROMPTS]))
    lines.append("")
    for prompt in PROMPTS:
        lines += [f"## {prompt}", ""]
        for name, *_ in configs:
            g = replies[prompt, name]
            blocks = f" (blocks {','.join(map(str, g.skipped_layers))})" if g.skipped_layers else ""
            text = " ".join(g.text.split()) or "(empty)"
            lines += [f"**{name}**{blocks}:", "", f"> {text}", ""]
    write_page(args.output, lines[:-1])


def per_block(m, args) -> None:
    prompts = PROMPTS + MORE_PROMPTS
    lora = f", decode LoRA `{Path(args.decode_lora).name}` on" if args.decode_lora else ""
    lines = [f"# Loops with one block skipped (greedy, {args.max_tokens} tokens, bypass adapter on{lora})", "",
             f"Model: `{Path(m.path).name}`; `scripts/side_by_side.py --per-block`. For each block with a bypass "
             f"adapter: the mean share of a reply's word 4-grams that repeat an earlier one in the same reply "
             f"over {len(prompts)} everyday prompts, and the replies above 20%.", "",
             "| skipped block | repeated 4-grams (mean) | replies > 20% repeated |", "|---|---|---|"]
    rows = [("none (full model)", [])] + [(str(b), [b]) for b in sorted(m.info.bypass_blocks)]
    for name, layers in rows:
        lines.append(loop_row(name, [m.chat([{"role": "user", "content": p}], 0.0, max_tokens=args.max_tokens,
                                            skip_layers=layers or None).text for p in prompts]))
        print(lines[-1], flush=True)
    write_page(args.output, lines)


if __name__ == "__main__":
    main()
