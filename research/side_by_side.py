"""Greedy answers to everyday chat prompts: full depth next to skipped decoding, as a Markdown page.

    .venv/bin/python research/side_by_side.py --budget 0.2 -o docs/results/side_by_side_0.2.md

Columns: full model; routers + bypass adapters (what `generate --skip-budget B` does); the same routers
without the adapters (plain skipping, `--no-bypass`); the static ranking + bypass adapters. With
`--decode-lora FILE`, also routers and static ranking + bypasses + that decode-only LoRA.

On top, a loop measure over the first `--n-prompts` everyday prompts of the held-out source `everyday`
(`first_gguf.datasets.heldout.EVERYDAY_PROMPTS`, 24 by default: the prompts of the earlier pages; the page shows the
first 8 in full), the same as `first-gguf eval --measures repetition` (`first_gguf.measures`): the share of
a reply's token 4-grams that repeat an earlier one in the same reply (0 = no repeated phrase; a reply stuck
in a loop approaches 1), averaged over prompts, and the share of replies with more than 20%; the longest
run of one token (mean) and the share of replies with a run of 8 or more ("Basoooooo...", which word
4-grams miss); the word-level 4-gram share as an extra column. None of these prompts is in any training set.

    .venv/bin/python research/side_by_side.py --per-block -o docs/results/loops_per_block.md

`--per-block`: the same loop measures with one block skipped at a time (each block that has a bypass
adapter, adapter on): which blocks the loops come from.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import first_gguf
from first_gguf.datasets.heldout import EVERYDAY_PROMPTS
from first_gguf.measures import LONG_RUN, LOOP_SHARE, repetition_stats

PROMPTS = list(EVERYDAY_PROMPTS[:8])  # shown in full on the page
LOOP_DEFINITION = (f"the mean share of a reply's token 4-grams that repeat an earlier one in the same reply and the "
                   f"replies above {LOOP_SHARE:.0%}; the mean longest run of one token and the replies with a run "
                   f"of {LONG_RUN} or more; the word-level 4-gram share (blind to runs inside a word) last.")


def loop_header(first: str) -> list[str]:
    """The Markdown header of a loop table whose first column is ``first``."""
    return [f"| {first} | repeated token 4-grams (mean) | replies > {LOOP_SHARE:.0%} repeated | longest run of one "
            f"token (mean) | replies with a run >= {LONG_RUN} | repeated word 4-grams (mean) |",
            "|---|---|---|---|---|---|"]


def loop_row(name: str, gens: list) -> str:
    """A Markdown table row of ``name``'s replies (Generations): token-level repetition, word level last."""
    r = repetition_stats([g.tokens for g in gens], [g.text for g in gens])
    n = r.n
    return (f"| {name} | {r.token_4gram:.1%} | {round(r.looping * n)}/{n} | {r.longest_run:.1f} | "
            f"{round(r.long_runs * n)}/{n} | {r.word_4gram:.1%} |")


def write_page(path: str, lines: list[str]) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GGUF (default: the embedded model)")
    ap.add_argument("--budget", type=float, default=0.2)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--n-prompts", type=int, default=24,
                    help=f"everyday prompts in the loop measure (at most {len(EVERYDAY_PROMPTS)})")
    ap.add_argument("--per-block", action="store_true", help="loop measure per single skipped block instead")
    ap.add_argument("--decode-lora", default=None, help="decode-only LoRA adapter GGUF: adds columns with it")
    ap.add_argument("-o", "--output", required=True)
    args = ap.parse_args()
    if not len(PROMPTS) <= args.n_prompts <= len(EVERYDAY_PROMPTS):
        ap.error(f"--n-prompts must be in [{len(PROMPTS)}, {len(EVERYDAY_PROMPTS)}]; got {args.n_prompts}")

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
    prompts = EVERYDAY_PROMPTS[:args.n_prompts]
    replies = {}
    for prompt in prompts:
        for name, kw, bypass, lora in configs:
            m.bypass, m.use_decode_lora = bypass, lora
            replies[prompt, name] = m.chat([{"role": "user", "content": prompt}], max_tokens=args.max_tokens, **kw)
        m.bypass, m.use_decode_lora = True, True
    lines = [f"# Greedy answers at skip_budget {args.budget:g} ({k} of {m.n_layer} blocks skipped while decoding)", "",
             f"Model: `{Path(m.path).name}`"
             + (f", decode LoRA `{Path(args.decode_lora).name}`" if args.decode_lora else "")
             + f"; greedy, {args.max_tokens} tokens at most; generated by "
             f"`research/side_by_side.py`. Same prompt, same runtime; only the decode-time skipping differs.", "",
             f"Loops over {len(prompts)} everyday prompts (the {len(PROMPTS)} below and {len(prompts) - len(PROMPTS)} "
             f"more; none in any training set): {LOOP_DEFINITION}", "", *loop_header("configuration")]
    for name, *_ in configs:
        lines.append(loop_row(name, [replies[p, name] for p in prompts]))
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
    prompts = EVERYDAY_PROMPTS[:args.n_prompts]
    lora = f", decode LoRA `{Path(args.decode_lora).name}` on" if args.decode_lora else ""
    lines = [f"# Loops with one block skipped (greedy, {args.max_tokens} tokens, bypass adapter on{lora})", "",
             f"Model: `{Path(m.path).name}`; `research/side_by_side.py --per-block`. For each block with a bypass "
             f"adapter, over {len(prompts)} everyday prompts: {LOOP_DEFINITION}", "",
             *loop_header("skipped block")]
    rows = [("none (full model)", [])] + [(str(b), [b]) for b in sorted(m.info.bypass_blocks)]
    for name, layers in rows:
        lines.append(loop_row(name, [m.chat([{"role": "user", "content": p}], 0.0, max_tokens=args.max_tokens,
                                            skip_layers=layers or None) for p in prompts]))
        print(lines[-1], flush=True)
    write_page(args.output, lines)


if __name__ == "__main__":
    main()
