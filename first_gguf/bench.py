"""Decode/prefill speed per skip budget, measured in one run.

Method: configurations are interleaved (each round visits every budget, in a
rotated order), every measurement decodes a fixed number of tokens after a
full-depth prefill of a fixed prompt, and the report gives medians, spread
and ratios to skip_budget 0 from the same run. The ideal ratio comes from
the per-block cost measured in the same run: c = (t(0) - t(n-1)) / (n-1),
with t(k) the median decode time per token when k blocks are skipped, so
ideal(k) = t(0) / (t(0) - k c). Efficiency = measured ratio / ideal ratio.
With bypass adapters in the model, every budget is measured with them (the
speed a user gets) and without them (plain skipping), and the floor runs
without them: the ideal is that of plain block skipping, so the efficiency
includes the bypasses' cost. A decode-only LoRA (Model(decode_lora=...)) is
treated the same way: on in the measured configurations, off in the plain ones
and the floor. Router overhead is the prefill time with routers
scored vs not scored. Sampled decoding (llama.cpp's sampler chain at its chat
defaults, SAMPLED) runs beside greedy at budget 0 and at the largest budget, in
the same rounds; the report gives its time per token relative to greedy.
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Callable, Sequence

from .model import Model
from .sampling import CHAT_DEFAULTS

BENCH_TEXT = (
    "The history of computing is a story of layers: hardware that runs instructions, operating systems that "
    "share the hardware among programs, languages that let people write those programs, and libraries that "
    "save them from writing the same code twice. Each layer hides the details of the one below it. "
)


def cpu_busy_fraction(seconds: float = 1.0) -> float:
    """Fraction of all cores busy over ``seconds`` (this process is idle meanwhile). -1 if unknown."""
    def read():
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        return sum(vals), idle

    try:
        t0, i0 = read()
        time.sleep(seconds)
        t1, i1 = read()
    except OSError:
        return -1.0
    return 1.0 - (i1 - i0) / max(t1 - t0, 1)


def _prompt_tokens(model: Model, n: int) -> list[int]:
    toks = model.tokenize(BENCH_TEXT * (n // 40 + 2))
    return toks[:n]


# the sampled configuration: llama.cpp's chat defaults, a fixed seed
SAMPLED = {**CHAT_DEFAULTS, "seed": 0}


def _decode_time(model: Model, prompt: list[int], skip: list[int], n_tokens: int,
                 adapters: bool = True, sampled: bool = False) -> tuple[float, float]:
    """(seconds per decoded token, prefill tok/s) for one measurement; EOS ignored.

    Greedy (the argmax, as generate() at temperature 0) or, with ``sampled``, llama.cpp's sampler chain
    with SAMPLED. adapters: False measures plain skipping (bypasses and decode LoRA off)."""
    model.reset()
    sampler = model.make_sampler(**SAMPLED) if sampled else None
    try:
        with model.decoding(prompt, skip_layers=skip, adapters=adapters) as d:
            t0 = time.perf_counter()
            if sampler is None:
                tok = int(d.logits.argmax())
                for _ in range(n_tokens):
                    tok = int(d.step(tok).argmax())
            else:
                tok = d.sample(sampler)
                for _ in range(n_tokens):
                    d.step(tok)
                    tok = d.sample(sampler)
            dt = time.perf_counter() - t0
    finally:
        if sampler is not None:
            sampler.close()
    return dt / n_tokens, d.n_prefill_tokens / d.prefill_seconds


def _prefill_time(model: Model, prompt: list[int], routing: bool) -> float:
    model.reset()
    with model.decoding(prompt, routing=routing) as d:
        return d.prefill_seconds


def run_bench(model: Model, budgets: Sequence[float], *, skip_strategy: str = "static", repeats: int = 5,
              gen_tokens: int = 64, prompt_tokens: int = 128,
              progress: Callable[[str], None] = lambda s: None) -> dict:
    if not budgets:
        raise ValueError("no budgets given")
    for name, v, lo in (("repeats", repeats, 1), ("gen_tokens", gen_tokens, 1), ("prompt_tokens", prompt_tokens, 2)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}; got {v!r}")
    budgets = sorted(set(float(b) for b in budgets) | {0.0})
    prompt = _prompt_tokens(model, prompt_tokens)
    if len(prompt) + gen_tokens + 1 > model.n_ctx:
        raise ValueError(f"prompt_tokens + gen_tokens = {len(prompt) + gen_tokens + 1} exceed n_ctx={model.n_ctx}")

    # skip sets: same for every round; chosen by the strategy from the bench prompt
    sets: dict[float, list[int]] = {}
    for b in budgets:
        model.reset()
        with model.decoding(prompt, b, skip_strategy=skip_strategy) as d:
            sets[b] = d.skipped_layers
    n = model.n_layer
    # floor for the per-block cost: every block but block 0 skipped (blocks cost the same)
    floor_set = list(range(1, n))
    configs = [(f"{b:g}", sets[b], True, False) for b in budgets] + [("floor", floor_set, False, False)]
    # the adapters the measured configurations run with (the plain ones and the floor run without)
    n_bypasses = model.n_bypasses if model.bypass else 0
    decode_lora = str(model.decode_lora_path) if model.decode_lora_path and model.use_decode_lora else None
    if n_bypasses or decode_lora:
        configs += [(f"{b:g}/plain", sets[b], False, False) for b in budgets if sets[b]]
    # sampled decoding beside greedy: at 0 and at the largest budget
    configs += [(f"{b:g}/sampled", sets[b], True, True) for b in sorted({0.0, budgets[-1]})]

    busy = cpu_busy_fraction(1.0)
    warn = []
    if busy > 0.1:
        warn.append(f"machine busy before the run: {busy:.0%} of the CPUs in use by other processes")
    progress(f"bench: {len(configs)} configurations x {repeats} rounds, {gen_tokens} decode tokens, "
             f"{len(prompt)}-token prompt, {model.n_threads} thread(s)")

    # warm-up (page in weights, build graphs)
    for _, skip, bp, sm in configs:
        _decode_time(model, prompt, skip, min(8, gen_tokens), bp, sm)

    per_tok: dict[str, list[float]] = {name: [] for name, *_ in configs}
    prefill: dict[str, list[float]] = {name: [] for name, *_ in configs}
    router_on, router_off = [], []
    for r in range(repeats):
        order = configs[r % len(configs):] + configs[:r % len(configs)]
        for name, skip, bp, sm in order:
            t, pf = _decode_time(model, prompt, skip, gen_tokens, bp, sm)
            per_tok[name].append(t)
            prefill[name].append(pf)
        if model.n_routers:
            router_off.append(_prefill_time(model, prompt, False))
            router_on.append(_prefill_time(model, prompt, True))
        progress(f"  round {r + 1}/{repeats} done")
    busy_after = cpu_busy_fraction(0.5)
    if busy_after > 0.1:
        warn.append(f"machine busy after the run: {busy_after:.0%} of the CPUs in use by other processes")

    med = {k: statistics.median(v) for k, v in per_tok.items()}
    t0 = med["0"]
    c_block = (t0 - med["floor"]) / (n - 1)
    rows = []
    for b in budgets:
        name = f"{b:g}"
        k = len(sets[b])
        ratio = t0 / med[name]
        ideal = t0 / (t0 - k * c_block) if t0 - k * c_block > 0 else float("inf")
        rows.append({
            "skip_budget": b,
            "n_skipped": k,
            "skipped_layers": sets[b],
            "decode_tok_s": 1.0 / med[name],
            "decode_tok_s_min": 1.0 / max(per_tok[name]),
            "decode_tok_s_max": 1.0 / min(per_tok[name]),
            "decode_ratio": ratio,
            "ideal_ratio": ideal,
            "efficiency": ratio / ideal,
            "prefill_tok_s": statistics.median(prefill[name]),
        })
        if f"{name}/plain" in med:
            rows[-1]["plain_decode_ratio"] = t0 / med[f"{name}/plain"]
            rows[-1]["plain_efficiency"] = rows[-1]["plain_decode_ratio"] / ideal
        if f"{name}/sampled" in med:  # time per token sampled / greedy - 1, same skip set, same run
            rows[-1]["sampled_decode_tok_s"] = 1.0 / med[f"{name}/sampled"]
            rows[-1]["sampling_overhead"] = med[f"{name}/sampled"] / med[name] - 1.0
    result = {
        "model": str(model.path),
        "threads": model.n_threads,
        "repeats": repeats,
        "gen_tokens": gen_tokens,
        "prompt_tokens": len(prompt),
        "skip_strategy": skip_strategy,
        "n_bypasses": n_bypasses,
        "decode_lora": decode_lora,
        "per_block_ms": c_block * 1e3,
        "floor_ms": (med["floor"] - c_block) * 1e3,
        "rows": rows,
        "sampled": SAMPLED,
        "warnings": warn,
        "cpu_count": os.cpu_count(),
    }
    if router_on:
        on, off = statistics.median(router_on), statistics.median(router_off)
        result["router_prefill_overhead"] = on / off - 1.0
    return result


def _adapters(res: dict) -> str:
    parts = [f"{res['n_bypasses']} bypass adapters"] if res.get("n_bypasses") else []
    if res.get("decode_lora"):
        parts.append(f"decode LoRA {os.path.basename(res['decode_lora'])}")
    return " + ".join(parts)


def format_table(res: dict) -> str:
    lines = [
        f"model {res['model']}",
        f"{res['threads']} thread(s), {res['prompt_tokens']}-token prompt, {res['gen_tokens']} decode tokens, "
        f"median of {res['repeats']} interleaved rounds; per-block cost {res['per_block_ms']:.3f} ms, "
        f"floor {res['floor_ms']:.3f} ms"
        + (f"; {_adapters(res)}: speedup and efficiency with them, the ideal without" if _adapters(res) else ""),
        "",
        "| skip_budget | blocks skipped | decode tok/s (min-max) | speedup | ideal | efficiency | prefill tok/s |",
        "|---|---|---|---|---|---|---|",
    ]
    plain = bool(_adapters(res))
    if plain:
        lines[-2] += " speedup without adapters | efficiency without |"
        lines[-1] += "---|---|"
    for r in res["rows"]:
        lines.append(
            f"| {r['skip_budget']:g} | {r['n_skipped']} | {r['decode_tok_s']:.1f} "
            f"({r['decode_tok_s_min']:.1f}-{r['decode_tok_s_max']:.1f}) | {r['decode_ratio']:.3f}x | "
            f"{r['ideal_ratio']:.3f}x | {r['efficiency']:.1%} | {r['prefill_tok_s']:.1f} |"
            + (f" {r.get('plain_decode_ratio', 1.0):.3f}x | {r.get('plain_efficiency', 1.0):.1%} |" if plain else ""))
    sampled = [r for r in res["rows"] if "sampling_overhead" in r]
    if sampled:
        lines.append("")
        lines.append("sampled decoding (llama.cpp sampler chain, " + ", ".join(
            f"{k} {v:g}" for k, v in res.get("sampled", SAMPLED).items()) + ") vs greedy: " + "; ".join(
            f"skip_budget {r['skip_budget']:g}: {r['sampled_decode_tok_s']:.1f} tok/s, "
            f"{r['sampling_overhead']:+.1%} time per token" for r in sampled))
    if "router_prefill_overhead" in res:
        lines.append("")
        lines.append(f"router scoring overhead on prefill: {res['router_prefill_overhead']:+.2%}")
    for w in res["warnings"]:
        lines.append(f"WARNING: {w}")
    return "\n".join(lines)
