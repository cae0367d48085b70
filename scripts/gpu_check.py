#!/usr/bin/env python3
"""Speed and sanity check of on-policy training on a device: a short `first_gguf.train.train` run
per model x batch size (x eager / compiled decode), printing samples per second and writing a JSON report.

Models: a tiny random Llama (always) and, with --model, a real GGUF (the default model on the GPU machine).
Prompts for the real model: --prompts (pre-tokenized, scripts/gpu_train.py prepare) or random token ids
(speed only). Every sample runs to --tokens tokens (no stop tokens), so samples/s counts full samples.
samples/s is the steady rate: on-policy prompts per step / the median step time after the first step (the
first one pays CUDA start-up and compilation).

On the GPU machine (no llama.cpp runtime, no network; see docs/gpu_recipe.md):
    python3 scripts/gpu_check.py --device cuda --model /root/m/model.gguf --batches 256,1024 --compile \
        --report $OUT/gpu_check.json
On the CPU (dry run, what the tests run):
    python scripts/gpu_check.py --device cpu --tiny-only --steps 2 --batches 4 --tokens 6 --threads 1
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bootstrap(no_runtime: bool = False) -> None:
    """Make ``first_gguf.train`` importable from this checkout. Without the llama.cpp runtime (the GPU machine:
    no compiled library; or --no-runtime, which simulates it), the package's __init__ (which loads the runtime)
    is bypassed: first_gguf and first_gguf.convert become plain namespaces over the checkout's folders."""
    if no_runtime:
        sys.modules["llama_cpp"] = None  # import llama_cpp raises ImportError, as on a machine without it
    sys.path.insert(0, str(ROOT))
    try:
        import first_gguf  # noqa: F401
        return
    except ImportError:
        pass
    for k in [k for k in sys.modules if k == "first_gguf" or k.startswith("first_gguf.")]:
        del sys.modules[k]
    for name, path in (("first_gguf", ROOT / "first_gguf"), ("first_gguf.convert", ROOT / "convert")):
        m = types.ModuleType(name)
        m.__path__ = [str(path)]
        sys.modules[name] = m
    sys.modules["first_gguf"].convert = sys.modules["first_gguf.convert"]


def read_json(path):
    p = Path(path)
    with (gzip.open(p, "rt") if p.suffix == ".gz" else open(p)) as f:
        return json.load(f)


def tiny_model(folder: Path, n_layer=4, n_embd=64, vocab=400) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=n_embd, intermediate_size=2 * n_embd, num_hidden_layers=n_layer,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, initializer_range=0.2)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    return folder


def random_prompts(n, vocab, rng, lo=20, hi=160):
    return [[1] + [rng.randrange(10, vocab) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


def run_one(T, name, model_path, prompts, args, batch, compile_, out_dir):
    import torch

    from first_gguf.train import Sequence_, TrainConfig

    pool = [Sequence_(p, [], "p") for p in prompts]
    rng = random.Random(0)
    seqs = [Sequence_(p, [rng.randrange(10, 300) for _ in range(8)], "t") for p in prompts[:64]]
    out = Path(out_dir) / f"{name}-b{batch}{'-compile' if compile_ else ''}.safetensors"
    cfg = TrainConfig(model=str(model_path), output=str(out), steps=args.steps, batch_size=0, onpolicy_batch=batch,
                      onpolicy_tokens=args.tokens, bypass_rank=args.bypass_rank, budget_min=0.1, budget_max=0.3,
                      bf16=not args.no_bf16, device=args.device, compile=compile_, checkpoint_every=10 ** 6,
                      n_static_examples=8, lr=1e-4, bypass_lr=1e-3, force=True, threads=args.threads,
                      max_prompt_tokens=4096, time_budget=args.time_budget)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t = time.time()
    s = T.train(cfg, sequences=seqs, onpolicy_prompts=pool, stop_ids=set(), progress=False)
    wall = time.time() - t
    history = T.checkpoint_meta(T.read_checkpoint(T.checkpoint_path(out)))["history"]
    secs = [h["sec"] for h in history]
    steady = statistics.median(secs[1:]) if len(secs) > 1 else secs[0]
    rec = {"model": name, "device": s["device"], "batch": batch, "tokens": args.tokens, "steps": s["steps"],
           "bf16": not args.no_bf16, "compile": compile_, "first_step_s": round(secs[0], 3),
           "step_s": round(steady, 3), "samples_per_s": round(batch / steady, 1),
           "tokens_per_s": round(batch * args.tokens / steady, 1), "wall_s": round(wall, 1),
           "okl": [h.get("okl") for h in history],
           "peak_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if torch.cuda.is_available() else None}
    print(f"{name:6s} B={batch:5d} T={args.tokens} {rec['device']:7s} {'bf16' if rec['bf16'] else 'fp32'} "
          f"{'compile' if compile_ else 'eager  '}: {rec['samples_per_s']:9.1f} samples/s "
          f"({rec['step_s']:.3f} s/step, first {rec['first_step_s']:.1f} s, peak {rec['peak_gib']} GiB), "
          f"okl {rec['okl'][0]} -> {rec['okl'][-1]}", flush=True)
    return rec


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--model", default=None, help="a GGUF (the real model); omitted: the tiny model only")
    ap.add_argument("--prompts", default=None, help="JSON(.gz) from `gpu_train.py prepare` (its 'prompts')")
    ap.add_argument("--tiny-only", action="store_true")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batches", default="256,1024", help="on-policy prompts per step, comma-separated")
    ap.add_argument("--tiny-batches", default=None, help="for the tiny model (default: --batches)")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--bypass-rank", type=int, default=16)
    ap.add_argument("--compile", action="store_true", help="also measure with the compiled decode step (CUDA)")
    ap.add_argument("--no-bf16", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--time-budget", type=float, default=None, help="per run, seconds")
    ap.add_argument("--no-runtime", action="store_true", help="act as if the llama.cpp runtime were missing")
    ap.add_argument("--report", default=None, help="JSON report path")
    args = ap.parse_args(argv)
    bootstrap(args.no_runtime)
    import torch

    import first_gguf.train as T

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = T.resolve_device(args.device)
    print(f"torch {torch.__version__}, device {dev}"
          + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""), flush=True)
    batches = [int(b) for b in args.batches.split(",")]
    tiny_batches = [int(b) for b in (args.tiny_batches or args.batches).split(",")]
    variants = [False] + ([True] if args.compile and dev.type == "cuda" else [])
    runs = []
    rep = {"torch": torch.__version__, "device": str(dev), "runs": runs,
           "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None}

    def one(*a):  # a failing run (out of memory, a compile error) is reported and the others still run
        try:
            runs.append(run_one(T, *a))
        except Exception as e:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            runs.append({"model": a[0], "batch": a[4], "compile": a[5], "error": f"{type(e).__name__}: {e}"[:2000]})
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if args.report:  # written after every run: a run cut off by the time limit keeps the ones before
            Path(args.report).write_text(json.dumps(rep, indent=1))

    with tempfile.TemporaryDirectory() as tmp:
        tiny = tiny_model(Path(tmp) / "tiny")
        rng = random.Random(1)
        for b in tiny_batches:
            for c in variants:
                one("tiny", tiny, random_prompts(max(b, 64), 400, rng, 8, 40), args, b, c, tmp)
        if args.model and not args.tiny_only:
            if args.prompts:
                data = read_json(args.prompts)
                prompts = [p for p, *_ in data["prompts"]]
            else:
                from transformers import AutoConfig

                p = Path(args.model)
                vocab = AutoConfig.from_pretrained(str(p.parent), gguf_file=p.name).vocab_size
                prompts = random_prompts(4096, vocab, rng)
            for b in batches:
                for c in variants:
                    one("model", args.model, prompts, args, b, c, tmp)
    return rep


if __name__ == "__main__":
    main()
