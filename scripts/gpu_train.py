#!/usr/bin/env python3
"""`first-gguf train` for a machine without the llama.cpp runtime, click or the task data (the GPU machine),
in two halves (docs/gpu_recipe.md):

prepare (here, with the runtime): tokenize what a training config needs, exactly as `first-gguf train` does
(the tasks' sequences when --batch-size > 0, the on-policy prompt pool, the model's end-of-generation tokens),
into one gzipped JSON file to carry:
    python scripts/gpu_train.py prepare --config gpu/op.json --model ~/.cache/first-gguf/models/M.gguf \
        -o runs/gpu/b/data.json.gz

train (there): the same training from that file; config keys as `first-gguf train --config` (TrainConfig
fields), the command line wins:
    python3 scripts/gpu_train.py train --config gpu/op.json --data runs/gpu/b/data.json.gz \
        --model /root/m/model.gguf -o $OUT/op.safetensors --resume-from gpu/op.ckpt.pt --time-budget 420
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check import bootstrap, read_json  # noqa: E402


def load_config(path, **over):
    from first_gguf.train.config import read_config_file  # the keys and checks of first-gguf train --config

    opts = read_config_file(path) if path else {}
    opts.update({k: v for k, v in over.items() if v is not None})
    opts.setdefault("output", "unused.safetensors")
    return opts


def prepare(args) -> None:
    from first_gguf.train import TrainConfig, eog_token_ids, load_frozen_model, onpolicy_prompt_pool, training_data
    from first_gguf.train.forward import _stop_ids

    cfg = TrainConfig(**load_config(args.config, model=args.model, output=str(Path(args.output).with_suffix(".x"))))
    needs_tasks = cfg.batch_size > 0 or (cfg.onpolicy_batch > 0 and "tasks" in cfg.onpolicy_data)
    sequences, examples = training_data(cfg) if needs_tasks else ([], None)
    pool = onpolicy_prompt_pool(cfg, sequences, examples) if cfg.onpolicy_batch else []
    stop = sorted(_stop_ids(load_frozen_model(cfg.model)) | eog_token_ids(cfg.model))
    data = {"model": Path(cfg.model).name,
            "sequences": [[s.prompt, s.cont, s.task] for s in sequences] if cfg.batch_size else [],
            "prompts": [[p.prompt, p.task] for p in pool], "stop_ids": stop}
    with gzip.open(args.output, "wt") as f:
        json.dump(data, f, separators=(",", ":"))
    print(f"wrote {args.output}: {len(data['sequences'])} sequences, {len(data['prompts'])} prompts, "
          f"stop ids {stop}, {Path(args.output).stat().st_size / 1e6:.1f} MB")


def train(args) -> dict:
    from first_gguf.train import Sequence_, TrainConfig, train as do_train

    over = dict(model=args.model, output=args.output, resume_from=args.resume_from, time_budget=args.time_budget,
                device=args.device, steps=args.steps, checkpoint_format=args.checkpoint_format,
                compile=True if args.compile else None, force=True)
    for kv in args.set:
        k, _, v = kv.partition("=")
        try:
            over[k] = json.loads(v)
        except ValueError:
            over[k] = v
    cfg = TrainConfig(**load_config(args.config, **over))
    data = read_json(args.data)
    seqs = [Sequence_(p, c, t) for p, c, t in data["sequences"]]
    pool = [Sequence_(p, [], t) for p, t in data["prompts"]]
    # on-policy alone: the prompts stand in for the sequences (static rankings, the router file's statistics)
    summary = do_train(cfg, sequences=seqs or [Sequence_(p.prompt, [], p.task) for p in pool],
                       onpolicy_prompts=pool or None, stop_ids=set(data["stop_ids"]), progress=False)
    print(json.dumps(summary), flush=True)
    return summary


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--config", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("-o", "--output", required=True)
    t = sub.add_parser("train")
    t.add_argument("--config", required=True)
    t.add_argument("--data", required=True)
    t.add_argument("--model", required=True)
    t.add_argument("-o", "--output", required=True)
    t.add_argument("--resume-from", default=None)
    t.add_argument("--time-budget", type=float, default=None)
    t.add_argument("--device", default=None)
    t.add_argument("--steps", type=int, default=None)
    t.add_argument("--checkpoint-format", default=None)
    t.add_argument("--compile", action="store_true")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (value as JSON, else a string), e.g. --set onpolicy_batch=1024")
    t.add_argument("--no-runtime", action="store_true", help="act as if the llama.cpp runtime were missing")
    args = ap.parse_args(argv)
    bootstrap(getattr(args, "no_runtime", False))
    return prepare(args) if args.cmd == "prepare" else train(args)


if __name__ == "__main__":
    main()
