"""first-gguf command line. Each command mirrors a library function's keyword arguments."""
from __future__ import annotations

import contextlib
import json
import os
import sys

import click

from .cli_options import (UserError, check_output, decode_lora_option, fmt_summary, load_model, parse_budgets, parse_option,
                          pop_sampling, routers_option, sampling_options, threads_option, train_options)
from .sampling import CHAT_DEFAULTS


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="first-gguf")
def main():
    """Prompt-decided layer skipping (FiRST) for GGUF models on llama.cpp."""


@main.command()
@click.argument("prompt")
@click.option("--model", "model", type=click.Path(dir_okay=False), default=None,
              help="GGUF file (default: the embedded SmolLM2-135M-Instruct Q4_1).")
@click.option("--skip-budget", type=float, default=0.0, show_default=True,
              help="Fraction of blocks that may be skipped while decoding, in [0, 1).")
@click.option("--skip-strategy", default="auto", show_default=True,
              help="router, static, the name of a static ranking stored in the GGUF, or auto "
                   "(router if the GGUF has routers, else static).")
@click.option("--skip-layers", default=None, help="Explicit comma-separated block indices to skip.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=256, show_default=True)
@sampling_options({})
@click.option("--chat/--raw", "chat", default=True, show_default=True,
              help="Wrap PROMPT as a user message with the GGUF's chat template, or complete it raw.")
@click.option("--system", default=None, help="System message (with --chat).")
@click.option("--n-ctx", type=int, default=4096, show_default=True,
              help="Context length in tokens; 0: the model's training context.")
@threads_option(help="CPU threads (default: half the cores)")
@click.option("--seed", type=click.IntRange(-1, 0xFFFFFFFE), default=0, show_default=True,
              help="Sampling seed: the same seed gives the same text; -1: a random one (shown in the summary).")
@click.option("--logprobs", type=click.IntRange(0, 20), default=None,
              help="With --json: each token's log-probability and its N most likely alternatives.")
@click.option("--no-bypass", is_flag=True, help="Skipped blocks pass their input through even if the GGUF "
                                                 "has bypass adapters (for comparisons).")
@click.option("--json", "as_json", is_flag=True, help="Print the whole result as JSON instead of streaming.")
@decode_lora_option
@routers_option
def generate(prompt, model, skip_budget, skip_strategy, skip_layers, max_tokens, chat, system, n_ctx, threads, seed,
             logprobs, no_bypass, as_json, decode_lora, routers, **sampling):
    """Generate text for PROMPT, skipping blocks chosen from the prompt.

    The text streams to stdout; a one-line summary (skipped blocks,
    prefill/decode tok/s) goes to stderr.
    """
    if logprobs is not None and not as_json:
        raise UserError(f"--logprobs {logprobs} needs --json (the log-probabilities are part of the JSON result)")
    if system is not None and not chat:
        raise UserError("--system needs --chat: a --raw prompt is completed as it is, with no system message "
                         "(put the text into PROMPT instead)")
    layers = None
    if skip_layers is not None:
        try:
            layers = [int(x) for x in skip_layers.split(",") if x.strip()]
        except ValueError:
            raise UserError(f"--skip-layers must be comma-separated integers; got {skip_layers!r}") from None
    sampling = pop_sampling(sampling)
    if seed == -1:  # llama.cpp's "random"
        from .sampling import random_seed

        seed = random_seed()
    m = load_model(model, n_ctx, threads, seed, decode_lora, routers)
    m.bypass = not no_bypass
    kw = dict(max_tokens=max_tokens, skip_strategy=skip_strategy, skip_layers=layers, seed=seed, logprobs=logprobs,
              **sampling)
    try:
        if chat:
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}]
            stream = m.stream_chat(messages, skip_budget, **kw)
        else:
            stream = m.stream_generate(prompt, skip_budget, **kw)
        gen = None
        for chunk in stream:
            if not as_json and chunk.text:
                click.echo(chunk.text, nl=False)
                sys.stdout.flush()
            gen = chunk.generation or gen
    except (ValueError, TypeError) as e:
        raise UserError(str(e)) from None
    if as_json:
        click.echo(json.dumps(gen.to_dict(), indent=2))
    else:
        click.echo()
        sys.stdout.flush()
        click.echo(fmt_summary(gen), err=True)


@main.command()
@click.argument("model", type=click.Path(dir_okay=False), required=False)
@click.option("--json", "as_json", is_flag=True)
@routers_option
def info(model, as_json, routers):
    """Print architecture, block count and first-gguf data of MODEL (default: the embedded model), or of
    MODEL with the sidecar --routers."""
    from .models import resolve
    from .gguf_info import read_info, read_with_sidecar

    try:
        model, routers = resolve(model, routers)
        inf = read_info(model) if routers is None else read_with_sidecar(model, routers)
    except ValueError as e:
        raise UserError(str(e)) from None
    if as_json:
        click.echo(json.dumps(inf.to_dict(), indent=2))
    else:
        click.echo("\n".join(inf.describe()))


@main.command()
@click.option("--model", type=click.Path(dir_okay=False), default=None)
@click.option("--budgets", default="0,0.1,0.2,0.33,0.5", show_default=True)
@click.option("--skip-strategy", default="auto", show_default=True,
              help="How blocks are chosen (speed depends only on how many).")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True,
              help="Interleaved rounds per budget.")
@click.option("--gen-tokens", type=click.IntRange(min=1), default=64, show_default=True,
              help="Decode steps per measurement.")
@click.option("--prompt-tokens", type=click.IntRange(min=2), default=128, show_default=True,
              help="Prompt length for prefill.")
@threads_option(1)
@click.option("--json", "as_json", is_flag=True)
@decode_lora_option
@routers_option
def bench(model, budgets, skip_strategy, repeats, gen_tokens, prompt_tokens, threads, as_json, decode_lora, routers):
    """Decode/prefill tok/s per skip budget, interleaved, medians and ratios from one run."""
    from .bench import format_table, run_bench

    values = parse_budgets(budgets)
    n_ctx = 4096
    if prompt_tokens + gen_tokens + 1 > n_ctx:
        raise UserError(f"--prompt-tokens {prompt_tokens} + --gen-tokens {gen_tokens} do not fit the bench's "
                         f"context of {n_ctx} tokens; expected a sum below {n_ctx}")
    m = load_model(model, n_ctx, threads, decode_lora=decode_lora, routers=routers, ctx_warning=False)
    try:
        result = run_bench(m, values, skip_strategy=skip_strategy, repeats=repeats, gen_tokens=gen_tokens,
                           prompt_tokens=prompt_tokens, progress=lambda s: click.echo(s, err=True))
    except (ValueError, TypeError) as e:
        raise UserError(str(e)) from None
    click.echo(json.dumps(result, indent=2) if as_json else format_table(result))


@main.command()
@click.option("--model", type=click.Path(dir_okay=False), default=None,
              help="GGUF file (default: the embedded model's upstream GGUF).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True, help="Ranking JSON to write.")
@click.option("--n-examples", type=int, default=24, show_default=True)
@click.option("--max-set", type=int, default=15, show_default=True,
              help="Length of the greedy ranking (blocks after it are ranked by single-block cost).")
@click.option("--n-candidates", type=int, default=10, show_default=True,
              help="Blocks tried per greedy step (the cheapest by single-block cost).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the calibration sample.")
@click.option("--criterion", type=click.Choice(["nll", "onpolicy"]), default="nll", show_default=True,
              help="nll: extra NLL of reference text (teacher-forced); onpolicy: KL(skipped || full) on the skipped "
                   "model's own temperature-1 samples of broad prompts (uses the GGUF's bypass adapters).")
@click.option("--onpolicy-tokens", type=int, default=32, show_default=True, help="Sampled tokens per prompt.")
@threads_option()
@click.option("--force", is_flag=True, help="Overwrite OUTPUT.")
@routers_option
def rank(model, output, n_examples, max_set, n_candidates, seed, criterion, onpolicy_tokens, threads, force, routers):
    """Compute a static skip ranking by greedy loss calibration on local text."""
    from pathlib import Path

    from .ranking import compute_static_ranking

    out = Path(output)
    check_output(out, force)  # before minutes of computing
    if model is None:
        from .models import base_gguf_path

        model = base_gguf_path()
    m = load_model(model, 4096, threads, routers=routers, ctx_warning=False)
    try:
        result = compute_static_ranking(m, n_examples=n_examples, max_set=max_set, n_candidates=n_candidates, seed=seed,
                                        criterion=criterion, onpolicy_tokens=onpolicy_tokens,
                                        progress=lambda s: click.echo(s, err=True))
    except (ValueError, TypeError) as e:
        raise UserError(str(e)) from None
    text = json.dumps(result, indent=2) + "\n"
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        tmp.write_text(text)
        tmp.replace(out)
    except OSError as e:  # the folder went away or filled up while computing: the result is not lost
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        click.echo(text, nl=False)
        raise UserError(f"cannot write {out}: {e.strerror or e}; the ranking was printed to stdout instead") \
            from None
    click.echo(f"wrote {out}: {result['ranking']}", err=True)


@main.command()
@click.option("--model", default=None,
              help="GGUF file or known model name (default: the embedded model's upstream GGUF).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True,
              help="Router file (.safetensors) to write: routers, bypass adapters, the single_kl ranking.")
@click.option("--work", type=click.Path(file_okay=False), required=True,
              help="Folder for the cached stages (replies, moments, costs); a rerun resumes from it.")
@click.option("--n-prompts", type=int, default=192, show_default=True, help="Calibration replies for the bypasses.")
@click.option("--n-cost", type=int, default=48, show_default=True,
              help="Replies (of those) on which every candidate block's cost is measured (routers, ranking).")
@click.option("--max-tokens", type=int, default=64, show_default=True, help="Tokens per calibration reply.")
@click.option("--temperature", type=float, default=0.7, show_default=True)
@click.option("--rank", "rank_", type=int, default=64, show_default=True, help="Bypass rank.")
@click.option("--ridge", type=float, default=1e-3, show_default=True,
              help="Bypass ridge penalty, relative to the mean input energy.")
@click.option("--candidates", default="1-", show_default=True,
              help="Blocks that may be skipped: 'a-b,c' ('1-': every block but the first and the last).")
@click.option("--sources", default="chat", show_default=True,
              help="Calibration prompt sources, comma-separated: chat, translation, summarization, qa, mc, docs "
                   "(the tasks' train splits), bigbench, linux; taken in turn.")
@click.option("--seed", type=int, default=0, show_default=True)
@threads_option()
@click.option("--force", is_flag=True, help="Overwrite OUTPUT.")
def fit(model, output, work, n_prompts, n_cost, max_tokens, temperature, rank_, ridge, candidates, sources, seed,
        threads, force):
    """Fit routers, bypass adapters and a static ranking in closed form, without training.

    Bypasses: least squares on the runtime's block inputs and outputs over the full model's replies to
    calibration prompts (--sources); ranking and routers: every candidate block's cost, skipped alone, on
    --n-cost of those replies (see first_gguf/fit.py)."""
    from .models import resolve
    from .fit import FitConfig, run_fit

    cfg = FitConfig(n_prompts=n_prompts, n_cost=n_cost, max_tokens=max_tokens, temperature=temperature, rank=rank_,
                    ridge=ridge, candidates=candidates, seed=seed, threads=threads, sources=sources)
    try:
        cfg.check()
        path, _ = resolve(model)
        if not os.path.isfile(path):
            raise ValueError(f"model file not found: {path}")
        report = run_fit(path, work, output, cfg, force=force)
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        raise UserError(str(e)) from None
    click.echo(f"wrote {output}: ranking single_kl {report['ranking']}", err=True)


def _convert_errors(fn):
    """Run fn, turning converter errors into one-line CLI errors."""
    from .convert.gguf_edit import GGUFEditError
    from .convert.router_file import RouterFileError

    try:
        return fn()
    except (GGUFEditError, RouterFileError, ValueError) as e:
        raise UserError(str(e)) from None
    except OSError as e:  # e.g. an output folder that is not there
        raise UserError(f"{e.strerror or e}: {e.filename}" if e.filename else str(e)) from None


@main.command()
@click.argument("base", type=click.Path(dir_okay=False))
@click.argument("routers", type=click.Path(dir_okay=False), required=False)
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True)
@click.option("--ranking", "rankings", multiple=True, type=click.Path(dir_okay=False),
              help="Static ranking JSON (from first-gguf rank) to store; repeatable, the first is the default. "
                   "It replaces a ranking of the same name inside ROUTERS.")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT and accept a fingerprint mismatch.")
@click.option("--sidecar", is_flag=True,
              help="Write OUTPUT as a sidecar GGUF holding only the first-gguf data, for BASE left untouched "
                   "(load with --routers OUTPUT); other llama.cpp tools keep opening BASE.")
def attach(base, routers, output, rankings, force, sidecar):
    """Add routers (a router .safetensors file, with its bypass adapters if any) and/or static rankings to a GGUF.

    Every other tensor and key is copied bit-identically, whatever the quant type. With --sidecar the data
    goes to a small file of its own instead, as llama.cpp's LoRA adapters do.
    """
    from .convert.attach import attach as do_attach
    from .convert.attach import attach_data, write_sidecar

    def run():
        data = attach_data(routers, rankings)
        data.check_base(base, force=force)
        for name in data.overridden:
            click.echo(f"static ranking {name!r}: {data.ranking_sources[name]} replaces the router file's", err=True)
        if sidecar:
            return write_sidecar(base, output, **data.kwargs(), force=force)
        return do_attach(base, output, **data.kwargs(), force=force, progress=True)

    out = _convert_errors(run)
    click.echo(f"wrote {out}", err=True)


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True)
@click.option("--force", is_flag=True, help="Overwrite OUTPUT.")
def strip(model, output, force):
    """Remove every first-gguf tensor and key (the result loads in stock llama.cpp)."""
    from .convert.attach import strip as do_strip

    out = _convert_errors(lambda: do_strip(model, output, force=force, progress=True))
    click.echo(f"wrote {out}", err=True)


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("output", type=click.Path(dir_okay=False))
@click.option("--type", "qtype", required=True, help="Q4_0, Q4_K_M, Q5_K_M, Q6_K, Q8_0, ...")
@threads_option()
@click.option("--allow-requantize", is_flag=True, help="Allow re-quantizing already quantized tensors.")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT.")
def quantize(model, output, qtype, threads, allow_requantize, force):
    """Quantize MODEL with llama.cpp's quantizer; router tensors stay F32."""
    from .convert.quantize import quantize as do_quantize

    out = _convert_errors(lambda: do_quantize(model, output, qtype, force=force, n_threads=threads,
                                                     allow_requantize=allow_requantize, progress=True))
    click.echo(f"wrote {out}", err=True)


@main.command()
@click.argument("model_dir", type=click.Path(file_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True)
@click.option("--outtype", type=click.Choice(["f32", "f16", "bf16", "q8_0"]), default="f16", show_default=True)
@click.option("--routers", type=click.Path(dir_okay=False), default=None, help="Router .safetensors file to add.")
@click.option("--ranking", "rankings", multiple=True, type=click.Path(dir_okay=False),
              help="Static ranking JSON to store; repeatable, the first is the default. It replaces a ranking "
                   "of the same name inside --routers.")
@click.option("--lora", type=click.Path(file_okay=False), default=None,
              help="PEFT LoRA adapter merged into the weights before conversion.")
@click.option("--sidecar", type=click.Path(dir_okay=False), default=None,
              help="Write the routers and rankings to this sidecar GGUF and OUTPUT without them (the form every "
                   "llama.cpp tool opens; load with --routers SIDECAR).")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT and accept a fingerprint mismatch.")
@click.option("--pre-tokenizer", "pre_tokenizer", default=None, metavar="NAME",
              help="llama.cpp name of the BPE pre-tokenizer (e.g. qwen2, llama3, gpt2), for a tokenizer that "
                   "convert_hf_to_gguf.py does not recognise.")
@click.option("--pre-tokenizer-from", "pre_tokenizer_from", type=click.Path(dir_okay=False), default=None,
              metavar="GGUF", help="Take the BPE pre-tokenizer from this GGUF of the same tokenizer.")
def convert(model_dir, output, outtype, routers, rankings, lora, sidecar, force, pre_tokenizer, pre_tokenizer_from):
    """Convert a Hugging Face checkpoint to GGUF (upstream convert_hf_to_gguf.py) with routers."""
    from .convert.hf import convert_hf, pre_tokenizer_from_gguf

    def run():
        pre = pre_tokenizer
        if pre_tokenizer_from is not None:
            if pre is not None:
                raise ValueError("give --pre-tokenizer or --pre-tokenizer-from, not both")
            pre = pre_tokenizer_from_gguf(pre_tokenizer_from)
        return convert_hf(model_dir, output, outtype=outtype, routers=routers, rankings=rankings,
                          lora=lora, sidecar=sidecar, force=force, progress=True, pre_tokenizer=pre)

    out = _convert_errors(run)
    click.echo(f"wrote {out}", err=True)


@main.group(name="routers")
def routers_group():
    """Router files (.safetensors): the shipped form of one, or one from a training checkpoint."""


@routers_group.command(name="ship")
@click.argument("src", metavar="ROUTERS", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True, help="The shipped router file.")
@click.option("--blocks", default=None, metavar="N,N,...",
              help="Keep only these blocks' adapters (comma-separated); a skipped block without an adapter passes "
                   "its input through (plain skipping).")
@click.option("--rank", "rank_", type=click.IntRange(min=1), default=None,
              help="Keep the first RANK components of every adapter (for first-gguf fit's reduced-rank bypasses, "
                   "ordered by explained variance: exactly the rank-RANK fit).")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT.")
def routers_ship(src, output, blocks, rank_, force):
    """The shipped form of a router file: bypass adapters as float16, identity adapters (never trained) dropped.

    Dropping an adapter whose up matrix is zero is exact; routers, rankings, fingerprint and provenance are
    copied unchanged (convert/ship.py)."""
    from .convert.ship import parse_blocks, ship_router_file

    def run():
        keep = parse_blocks(blocks) if blocks is not None else None
        return ship_router_file(src, output, blocks=keep, rank=rank_, force=force)

    res = _convert_errors(run)
    click.echo(f"wrote {res.path}: {len(res.kept)} adapters as float16; dropped (identity or not in --blocks): "
               f"{res.dropped}", err=True)


@routers_group.command(name="from-checkpoint")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--like", required=True, type=click.Path(dir_okay=False),
              help="A router file for the same model (e.g. the one the run started from): its fingerprint and "
                   "static rankings are copied.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True, help="The router file to write.")
@click.option("--lora-out", type=click.Path(dir_okay=False), default=None,
              help="Also write the checkpoint's decode-only LoRA (a --lora-rank run's) as a llama.cpp adapter GGUF.")
@click.option("--model", type=click.Path(dir_okay=False), default=None,
              help="The base GGUF the run trained on (architecture, head counts); needed with --lora-out.")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT (and --lora-out).")
def routers_from_checkpoint(checkpoint, like, output, lora_out, model, force):
    """A router file from a training checkpoint (OUTPUT.ckpt.pt), to measure a run while it trains.

    The rankings copied from --like describe its routers, not the checkpoint's: measure such a file with the
    router strategy or a ranking of its own (attach --ranking). See first_gguf/train/from_checkpoint.py."""
    def run():
        try:
            import torch  # noqa: F401  (checkpoints are torch files)

            from .train.from_checkpoint import router_file_from_checkpoint
        except ImportError as e:
            raise ValueError(f"routers from-checkpoint needs torch (pip install 'first-gguf[train]'): {e}") from None
        return router_file_from_checkpoint(checkpoint, like, output, lora_out=lora_out, model=model, force=force)

    res = _convert_errors(run)
    click.echo(f"wrote {res.path}: step {res.step}, {res.n_bypasses} bypasses", err=True)
    if res.lora is not None:
        click.echo(f"wrote {res.lora}: decode-only LoRA of rank {res.lora_rank}", err=True)


@main.command()
@train_options
def train(config_file, **kw):
    """Train FiRST routers (and optionally LoRA) on a frozen model by distillation."""
    from .models import resolve
    from .train import TrainConfig, train as do_train
    from .train.config import read_config_file, read_static_ranking, split_tasks

    try:
        opts = read_config_file(config_file) if config_file else {}
        given = {k: v for k, v in kw.items() if v is not None}  # left out on the command line: None
        if "tasks" in given:
            given["tasks"] = split_tasks(given["tasks"])
        if "static_ranking" in given:
            given["static_ranking"] = read_static_ranking(given["static_ranking"])
        opts.update(given)
        for key in ("model", "output"):
            if opts.get(key) is None:
                raise ValueError(f"missing --{key} (or '{key}' in a --config file)")
        cfg = TrainConfig(**opts)
        cfg.validate()  # the cheap checks (output exists, ...) before fetching a known model
        cfg.model = str(resolve(cfg.model)[0])  # a known model's name: its cached GGUF (fetched once)
        summary = do_train(cfg)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as e:
        raise UserError(str(e)) from None
    click.echo(f"wrote {cfg.output}: {json.dumps(summary)}", err=True)


@main.command(name="eval")
@click.option("--model", type=click.Path(dir_okay=False), default=None, help="GGUF (default: the embedded model).")
@click.option("--tasks", default="summarization,qa,mc,translation", show_default=True,
              help="In-distribution tasks (their test split); empty with --heldout for held-out sources only.")
@click.option("--heldout", default="", show_default=True,
              help="Held-out sources evaluated next to the tasks: news, de, yesno, everyday, coding (no training set "
                   "draws from them).")
@click.option("--measures", default="nll", show_default=True,
              help="nll (teacher-forced extra NLL, greedy agreement, task metric), onpolicy (KL on the skipped "
                   "model's temperature-1 samples), repetition (repeated token 4-grams, runs of one token).")
@click.option("--budgets", default="0,0.1,0.2,0.3", show_default=True)
@click.option("--strategies", default="router,static,block_influence,random,last", show_default=True,
              help="full, router, static, random, last, or names of stored static rankings.")
@click.option("--n-examples", type=int, default=20, show_default=True, help="Test examples per task.")
@click.option("--n-heldout", type=int, default=None, help="Examples per held-out source (default: --n-examples).")
@click.option("--gen-tokens", type=int, default=48, show_default=True)
@click.option("--onpolicy-tokens", type=int, default=48, show_default=True,
              help="Most tokens per sampled reply (--measures onpolicy).")
@click.option("--greedy-tokens", type=int, default=96, show_default=True,
              help="Most tokens per greedy reply (--measures repetition).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the on-policy samplers.")
@click.option("--split", "split_name", type=click.Choice(["dev", "test"]), default="test", show_default=True)
@click.option("--random-seeds", type=int, default=3, show_default=True)
@click.option("--no-bench", is_flag=True, help="Skip the speed measurement.")
@click.option("--no-bypass", is_flag=True, help="Evaluate plain skipping even if the GGUF has bypass adapters.")
@threads_option(1)
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Results folder (resumable).")
@decode_lora_option
@routers_option
def eval_cmd(model, tasks, heldout, measures, budgets, strategies, n_examples, n_heldout, gen_tokens,
             onpolicy_tokens, greedy_tokens, seed, split_name, random_seeds, no_bench, no_bypass, threads, output,
             decode_lora, routers):
    """Quality per task/source, strategy and budget (extra NLL, agreement, task metric; on-policy KL and
    repetition with --measures), speed, plots; then a table of the means per group."""
    from .evaluate import EvalConfig, evaluate, measures_table, parse_measures, summary_table
    from .datasets.heldout import parse_heldout

    bs = parse_budgets(budgets)
    # before loading the model, so a typo fails at once
    heldout = parse_option("--heldout", parse_heldout, heldout)
    measures = parse_option("--measures", parse_measures, measures)
    from .models import MODELS

    if model is not None and model not in MODELS and not os.path.isfile(model):
        raise UserError(f"model not found: {model}; expected a GGUF file or one of the known models "
                         f"{', '.join(sorted(MODELS))}")
    m = load_model(model, 4096, threads, decode_lora=decode_lora, routers=routers, ctx_warning=False)
    m.bypass = not no_bypass
    cfg = EvalConfig(tasks=[t for t in tasks.split(",") if t.strip()], budgets=bs,
                     strategies=[s for s in strategies.split(",") if s.strip()], n_examples=n_examples,
                     gen_tokens=gen_tokens, split=split_name, random_seeds=random_seeds, bench=not no_bench,
                     heldout=heldout, measures=measures, n_heldout=n_heldout, onpolicy_tokens=onpolicy_tokens,
                     greedy_tokens=greedy_tokens, seed=seed)
    try:
        res = evaluate(m, cfg, output, progress=lambda s: click.echo(s, err=True))
    except (ValueError, TypeError) as e:
        raise UserError(str(e)) from None
    click.echo(summary_table(res))
    click.echo("")
    click.echo(measures_table(res))


@main.command()
@click.argument("runs", nargs=-1, required=True, metavar="LABEL=FOLDER...")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="Markdown file (default: stdout).")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT.")
def compare(runs, output, force):
    """Side-by-side Markdown tables of several `first-gguf eval` results folders (e.g. two router files):
    means per budget, strategy and group, and the per-prompt paired difference with the first folder.

    Folders measured with other settings (measures, token counts, seed, split: their run.json) are refused."""
    from .evaluate import compare_measures, parse_labelled

    if output is not None:
        check_output(output, force)
    try:
        text = compare_measures(dict(parse_labelled(s) for s in runs))
    except ValueError as e:
        raise UserError(str(e)) from None
    if output is None:
        click.echo(text, nl=False)
    else:
        with open(output, "w") as f:
            f.write(text)
        click.echo(f"wrote {output}", err=True)


@main.command()
@click.option("--model", type=click.Path(dir_okay=False), default=None)
@click.option("--skip-budget", type=float, default=0.0, show_default=True)
@click.option("--skip-strategy", default="auto", show_default=True)
@click.option("--system", default=None, help="System message.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=512, show_default=True,
              help="Most tokens per reply (at most half of --n-ctx, so the conversation keeps the other half).")
@sampling_options(CHAT_DEFAULTS)
@click.option("--seed", type=click.IntRange(-1, 0xFFFFFFFE), default=None,
              help="Seed of the session's replies: the same seed and messages give the same replies "
                   "(default or -1: a random one, shown at the start).")
@click.option("--n-ctx", type=int, default=4096, show_default=True,
              help="Context length in tokens; 0: the model's training context.")
@threads_option()
@decode_lora_option
@routers_option
def chat(model, skip_budget, skip_strategy, system, max_tokens, seed, n_ctx, threads, decode_lora, routers,
         **sampling):
    """Chat in the terminal (streaming, multi-turn; /help lists the commands).

    Sampling defaults to llama.cpp's chat defaults; --temperature 0 is greedy."""
    from .chat import ChatSession, run

    sampling = pop_sampling(sampling)
    if seed is None or seed == -1:  # a random session seed, shown at the start
        from .sampling import random_seed

        seed = random_seed()
    m = load_model(model, n_ctx, threads, seed=seed, decode_lora=decode_lora, routers=routers)
    try:
        session = ChatSession(m, skip_budget=skip_budget, skip_strategy=skip_strategy, system=system,
                              max_tokens=max_tokens, **sampling)
    except (ValueError, TypeError) as e:
        raise UserError(str(e)) from None
    run(session)


@main.command()
@click.option("--model", type=click.Path(dir_okay=False), default=None)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--api-key", default=None, help="Require 'Authorization: Bearer KEY'.")
@click.option("--n-ctx", type=int, default=4096, show_default=True,
              help="Context length in tokens; 0: the model's training context.")
@threads_option()
@decode_lora_option
@routers_option
def serve(model, host, port, api_key, n_ctx, threads, decode_lora, routers):
    """OpenAI-compatible server (/v1/models, /v1/completions, /v1/chat/completions) with skip_budget."""
    from .server import announce_when_listening, check_can_bind, serve as do_serve

    try:
        check_can_bind(host, port)  # before the model loads: a port in use is a one-line error at once
    except OSError as e:
        raise UserError(str(e)) from None
    m = load_model(model, n_ctx, threads, decode_lora=decode_lora, routers=routers)
    announce_when_listening(host, port, f"[first-gguf] serving {m.path.name} on http://{host}:{port}/v1")
    do_serve(m, host=host, port=port, api_key=api_key)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
