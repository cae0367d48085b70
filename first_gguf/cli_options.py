"""The first-gguf command line's shared parts: the user-error type every command maps its errors to, model
loading with one-line errors, the options several commands share (threads, routers, decode LoRA, sampling,
train's options generated from TrainConfig) and their parsing. cli.py declares the commands."""
from __future__ import annotations

import os

import click

from .sampling import NUMERIC_OPTIONS, OPTION_HELP, RANGES, SamplingParams, check_value


class UserError(click.ClickException):
    """One clear line, non-zero exit, no traceback."""


def load_model(model, n_ctx, threads, seed=0, decode_lora=None, routers=None, ctx_warning=True):
    """The model, or a one-line error; the warning for an n_ctx above the training context as one 'Warning:'
    line (``ctx_warning=False``: none, for commands whose context is not the user's choice)."""
    import warnings

    import first_gguf

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            m = first_gguf.load(model, n_ctx=n_ctx, n_threads=threads, seed=seed, decode_lora=decode_lora,
                                routers=routers)
        except (ValueError, TypeError, RuntimeError) as e:
            raise UserError(str(e)) from None
    for w in caught:
        if issubclass(w.category, UserWarning) and str(w.message).startswith("n_ctx "):
            if ctx_warning:
                click.echo(f"Warning: {w.message} (--n-ctx)", err=True)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    return m


MAX_THREADS = (os.cpu_count() or 1) * 4  # beyond this llama.cpp hangs or crashes


def threads_option(default: int | None = None, help: str | None = None):
    return click.option("--threads", type=click.IntRange(1, MAX_THREADS), default=default,
                        show_default=default is not None,
                        help=f"{help or 'CPU threads'} (1 to {MAX_THREADS}: 4x the logical cores).")


routers_option = click.option(
    "--routers", type=click.Path(dir_okay=False), default=None,
    help="first-gguf sidecar GGUF (routers, bypass adapters, static rankings) for the model, which stays "
         "untouched (first-gguf attach --sidecar writes one; the default model brings its own).")

decode_lora_option = click.option(
    "--decode-lora", type=click.Path(dir_okay=False), default=None,
    help="llama.cpp LoRA adapter GGUF applied only to tokens decoded with blocks skipped (first-gguf train "
         "--lora-rank writes one); never to the prompt or at skip budget 0.")


GREEDY = SamplingParams()  # generate's defaults: greedy, every other sampler off (chat: CHAT_DEFAULTS)


def sampling_options(defaults: dict):
    """Model.generate()'s sampling keywords as options (llama.cpp's and llama-cpp-python's names, generated
    from sampling.NUMERIC_OPTIONS, RANGES and OPTION_HELP); ``defaults`` overrides the greedy ones."""
    opts = [click.option("--" + name.replace("_", "-"), type=int if RANGES[name][4] else float,
                         default=defaults.get(name, getattr(GREEDY, name)), show_default=True,
                         help=OPTION_HELP[name]) for name in NUMERIC_OPTIONS]
    opts += [
        click.option("--logit-bias", "logit_bias", multiple=True, metavar="TOKEN=BIAS",
                     help="Add BIAS in [-100, 100] to the logit of token id TOKEN (also llama.cpp's TOKEN+BIAS / "
                          "TOKEN-BIAS); repeatable."),
        click.option("--grammar", default=None, help="GBNF grammar (with a 'root' rule) the text must follow."),
        click.option("--grammar-file", type=click.Path(dir_okay=False), default=None,
                     help="File holding the GBNF grammar."),
    ]

    return lambda f: _stack(opts, f)


def _stack(opts: list, f):
    """``f`` decorated with ``opts`` in the order given (the first is listed first in --help)."""
    for opt in reversed(opts):
        f = opt(f)
    return f


def parse_logit_bias(items) -> dict[int, float] | None:
    import re

    out = {}
    for item in items:
        m = re.fullmatch(r"\s*(\d+)\s*(?:=\s*([-+]?\S+)|([-+]\S+))\s*", item)
        try:
            out[int(m.group(1))] = float(m.group(2) or m.group(3))
        except (AttributeError, ValueError):
            raise UserError(f"--logit-bias must be TOKEN=BIAS (a token id and a number); got {item!r}") from None
    return out or None


def pop_sampling(kw: dict) -> dict:
    """Pop the sampling options from a command's keyword arguments; checked, as Model's keywords, before any
    model loads (messages name the option, its value and its range)."""
    out = {name: kw.pop(name) for name in NUMERIC_OPTIONS}
    for name, v in out.items():
        try:
            check_value(name, v)
        except (TypeError, ValueError) as e:
            raise UserError(f"--{name.replace('_', '-')}: {e}") from None
    out["logit_bias"] = parse_logit_bias(kw.pop("logit_bias"))
    grammar, grammar_file = kw.pop("grammar"), kw.pop("grammar_file")
    if grammar is not None and grammar_file is not None:
        raise UserError("give --grammar or --grammar-file, not both")
    if grammar_file is not None:
        try:
            grammar = open(grammar_file, encoding="utf-8").read()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read --grammar-file {grammar_file}: {getattr(e, 'strerror', None) or e}") \
                from None
    out["grammar"] = grammar
    return out


def check_output(out, force: bool) -> None:
    """An output file a command can write when it is done: not there (or --force), in a writable folder."""
    from pathlib import Path

    out = Path(out)
    if out.is_dir():
        raise UserError(f"output {out} is a folder; expected a file path")
    if out.exists() and not force:
        raise UserError(f"output file exists: {out}; pass --force to overwrite")
    parent = out.parent
    if not parent.is_dir():
        raise UserError(f"output folder does not exist: {parent} (for {out})")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"output folder is not writable: {parent} (for {out})")


def fmt_summary(gen) -> str:
    skipped = (f"skipped {len(gen.skipped_layers)} blocks ({gen.skip_strategy}"
               f"{', bypass adapters' if gen.bypassed_layers else ''}{', decode LoRA' if gen.decode_lora else ''}): "
               f"{','.join(map(str, gen.skipped_layers))}" if gen.skipped_layers else "skipped no blocks")
    return (f"[first-gguf] {skipped} | "
            f"prompt {gen.n_prompt_tokens} tok, prefill {gen.prefill_tokens_per_s:.1f} tok/s | "
            f"{len(gen.tokens)} tok generated, decode {gen.decode_tokens_per_s:.1f} tok/s | {gen.finish_reason}"
            + (f" | seed {gen.seed}" if gen.seed is not None else ""))


def parse_budgets(text: str) -> list[float]:
    """--budgets: comma-separated skip budgets, each in [0, 1)."""
    try:
        values = [float(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise UserError(f"--budgets must be comma-separated numbers; got {text!r}") from None
    if not values:
        raise UserError(f"--budgets must list at least one number; got {text!r}")
    bad = [b for b in values if not 0 <= b < 1]
    if bad:
        raise UserError(f"--budgets: {', '.join(f'{b:g}' for b in bad)} not in [0, 1); got {text!r}")
    return values


def parse_option(option: str, parse, value):
    try:
        return parse(value)
    except ValueError as e:
        raise UserError(f"{option}: {e}") from None


_PATH_TYPES = {"path": click.Path(dir_okay=False), "path_or_dir": click.Path()}


def train_options(f):
    """``first-gguf train``'s options, one per TrainConfig field, generated from the fields' metadata (name,
    type, default, help: first_gguf/train/config.py), so the two cannot drift. Defaults are shown but not set
    here: an option left out leaves the field to the --config file, then to TrainConfig's default."""
    import dataclasses

    from .train.config import TrainConfig

    opts = []
    for fd in dataclasses.fields(TrainConfig):
        meta = dict(fd.metadata)
        default = fd.default_factory() if fd.default_factory is not dataclasses.MISSING else fd.default
        if meta.get("type") == "threads":
            opts.append(threads_option(help=meta["help"]))
            continue
        decls = meta.get("flag", "--" + fd.name.replace("_", "-")).split("/")
        kw = {"help": meta.get("help") or None, "default": None}  # None: left out (the config or the default)
        if "flag_value" in meta:
            kw["flag_value"] = meta["flag_value"]
        elif isinstance(default, bool):
            kw["is_flag"] = True
        else:
            typ = meta.get("type", type(default) if default is not None else str)
            kw["type"] = (click.Choice(meta["choices"]) if "choices" in meta else str if isinstance(default, list)
                          else _PATH_TYPES.get(typ, typ))
            if meta.get("required"):
                kw["help"] += " Required (here or in --config)."
            elif default is not None:
                kw["help"] = f"{kw['help'] or ''}  [default: {','.join(default) if isinstance(default, list) else default}]"
        opts.append(click.option(*decls, fd.name, **kw))
    opts.append(click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
                             help="JSON file with any of these options as TrainConfig keys (recipes/ holds the "
                                  "runs behind the shipped router files); command-line options win."))
    return _stack(opts, f)
