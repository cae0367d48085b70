"""The training configuration: TrainConfig and its validation, the preflight checks of the inputs, the learning
rate schedules, and the torch device a run trains on."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

from ..datasets.tasks import TASKS
from .checkpoint import CHECKPOINT_FORMATS
from .outputs import lora_path

if TYPE_CHECKING:
    import torch


LR_SCHEDULES = ("constant", "cosine")


DEVICE_RE = re.compile(r"auto|cpu|cuda(:\d+)?")
ONPOLICY_DATA = ("tasks", "bigbench", "linux", "broad", "chat")  # on-policy prompt sources; broad = bigbench,linux


def lr_factor(schedule: str, step: int, steps: int, final: float) -> float:
    """Multiplier of every group's initial learning rate at ``step`` (0-based) of ``steps``."""
    if schedule == "constant" or steps <= 1:
        return 1.0
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * step / (steps - 1)))


def _opt(default=None, help: str = "", *, factory=None, **cli):
    """A TrainConfig field with what its command-line option needs (``first-gguf train``'s options are
    generated from these, first_gguf.cli.train_options): ``help``, and optionally ``flag`` (the option's
    name when not --field-name), ``type`` (int/float/str, "path" (a file), "path_or_dir", "threads"; default:
    the default's type), ``choices``,
    ``is_flag``, ``flag_value``, ``required`` (on the command line unless a --config file gives it)."""
    meta = {"help": help, **cli}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Everything a training run takes. Each field is an option of ``first-gguf train`` (``--field-name``,
    with the exceptions noted in its ``flag``) and a key of a ``--config`` JSON file (recipes/ holds the
    runs behind the shipped router files)."""

    model: str = _opt(None, "GGUF file, Hugging Face checkpoint directory, or a known model's name "
                            "(first-gguf info lists them).", type="path_or_dir", required=True)
    output: str = _opt(None, "Router .safetensors file.", flag="-o/--output", type="path", required=True)
    tasks: list[str] = _opt(help="Comma-separated tasks (train splits).", factory=lambda: list(TASKS), flag="--data")
    steps: int = _opt(2000)
    batch_size: int = _opt(4)
    max_prompt_tokens: int = _opt(192)
    max_continuation_tokens: int = _opt(64)
    lr: float = _opt(5e-3)
    budget_min: float = _opt(0.05)
    budget_max: float = _opt(0.5)
    temperature: float = _opt(0.5, "Soft-gate temperature.")
    reg_lambda: float = _opt(0.01)
    lora_rank: int = _opt(0, "Train a decode-only LoRA too, active only on tokens decoded with blocks skipped; "
                             "written to <output stem>.lora.gguf for --decode-lora (0: off).")
    lora_lr: float = _opt(2e-4)
    bypass_rank: int = _opt(0, "Train a low-rank bypass per block, used in place of a skipped block (0: off; 16 "
                               "is the default model's).")
    bypass_lr: float = _opt(2e-3)
    static_mix: float = _opt(0.0, "Fraction of sequences trained under the --static-ranking set instead of the "
                                  "routed one.")
    static_ranking: list[int] | None = _opt(None, "JSON file with a 'ranking' list of blocks (e.g. the output of "
                                                  "`first-gguf rank`); in a --config file the file's name or the "
                                                  "list itself.", type="path")
    init_routers: str | None = _opt(None, "Start from this router file's routers (and bypasses of the same rank).",
                                    type="path")
    seed: int = _opt(0)
    bf16: bool = _opt(True, "fp32 instead of bf16 autocast.", flag="--no-bf16", flag_value=False)
    threads: int | None = _opt(None, "CPU threads.", type="threads")
    checkpoint_every: int = _opt(100)
    resume: bool = _opt(False, "Continue from OUTPUT's .ckpt.pt checkpoint.")
    max_examples_per_task: int = _opt(4000)
    balance_tasks: bool = _opt(False, "Draw each training sequence from a uniformly chosen task (default: "
                                      "uniformly over sequences).")
    docs_supplement: bool = _opt(False, "Add training-only docstrings from other modules to the docs task (see "
                                        "tasks.docs_supplement).")
    lr_schedule: str = _opt("constant", "cosine: every learning rate decays to --lr-final times its start over "
                                        "--steps.", choices=LR_SCHEDULES)
    lr_final: float = _opt(0.1)
    extra_data: str | None = _opt(None, "JSON Lines file of more training examples: {\"messages\": [...], "
                                        "\"target\": ..., \"task\": ...} per line (e.g. research/self_replies.py's "
                                        "output).", type="path")
    n_static_examples: int = _opt(64, "Training sequences the static rankings stored in OUTPUT are measured on.")
    force: bool = _opt(False, "Overwrite OUTPUT.")
    onpolicy_batch: int = _opt(0, "On-policy distillation: prompts per step whose continuation the current student "
                                  "samples and the full model scores (0: off; --batch-size 0 trains on them alone).")
    onpolicy_tokens: int = _opt(48, "Tokens sampled per prompt.")
    onpolicy_temperature: float = _opt(1.0, "Sampling temperature of the student (0: greedy).")
    onpolicy_beta: float = _opt(0.0, "Divergence on the samples: (1-beta) KL(student||full) + beta KL(full||student).")
    onpolicy_data: str = _opt("tasks,broad", "Prompt sources of the samples: tasks (the --data train prompts), "
                                             "bigbench, linux, broad (both), chat (everyday chat requests).")
    set_noise: float = _opt(0.0, "Fraction of the routed (non --static-mix) sequences whose set is moved by 1-3 "
                                 "swaps to nearby-ranked blocks.")
    device: str = _opt("auto", "auto (CUDA when available, else CPU), cpu, cuda or cuda:N. Under torchrun: "
                               "cuda:LOCAL_RANK and NCCL on CUDA, gloo on the CPU.")
    time_budget: float | None = _opt(None, "Seconds (from start, model loading included): stop before a step that "
                                           "would end later, writing the checkpoint and the outputs; --resume / "
                                           "--resume-from continues.", type=float)
    checkpoint_format: str = _opt("full", "full: fp32 parameters + optimizer state; compact: fp16 parameters + "
                                          "Adam moments in bf16; params: fp16 parameters only (the optimizer "
                                          "restarts on resume).", choices=CHECKPOINT_FORMATS)
    resume_from: str | None = _opt(None, "Continue from this checkpoint file (any path; e.g. one brought back from "
                                         "the GPU machine). New checkpoints go to OUTPUT's .ckpt.pt.", type="path")
    compile: bool = _opt(False, "torch.compile the decoder layers (opt-in; see docs/gpu_recipe.md).")

    def validate(self) -> None:
        def bad(msg):
            raise ValueError(f"invalid training config: {msg}")

        for key in ("model", "output"):
            if not getattr(self, key):
                bad(f"{key} is required (--{key} or '{key}' in a --config file)")

        if self.steps < 1:
            bad(f"steps must be >= 1; got {self.steps}")
        if self.onpolicy_batch < 0:
            bad(f"onpolicy_batch must be >= 0; got {self.onpolicy_batch}")
        if self.batch_size < 0 or (self.batch_size == 0 and self.onpolicy_batch == 0):
            bad(f"batch_size must be >= 1 (or 0 with onpolicy_batch > 0); got {self.batch_size}")
        if self.onpolicy_tokens < 2:
            bad(f"onpolicy_tokens must be >= 2 (the first sampled token is never changed by skipping); got "
                f"{self.onpolicy_tokens}")
        if not 0 <= self.onpolicy_temperature <= 10 or math.isnan(self.onpolicy_temperature):
            bad(f"onpolicy_temperature must be in [0, 10] (0: greedy); got {self.onpolicy_temperature}")
        if not 0 <= self.onpolicy_beta <= 1:
            bad(f"onpolicy_beta (weight of the forward KL) must be in [0, 1]; got {self.onpolicy_beta}")
        srcs = [x.strip() for x in self.onpolicy_data.split(",") if x.strip()]
        if not srcs or any(x not in ONPOLICY_DATA for x in srcs):
            bad(f"onpolicy_data must be a comma-separated subset of {ONPOLICY_DATA}; got {self.onpolicy_data!r}")
        if not 0 <= self.set_noise <= 1:
            bad(f"set_noise must be in [0, 1]; got {self.set_noise}")
        if not 0 <= self.budget_min <= self.budget_max < 1:
            bad(f"need 0 <= budget_min <= budget_max < 1; got {self.budget_min}, {self.budget_max}")
        if self.lr <= 0 or not math.isfinite(self.lr):
            bad(f"lr must be > 0; got {self.lr}")
        if self.temperature <= 0:
            bad(f"temperature must be > 0; got {self.temperature}")
        if self.reg_lambda < 0:
            bad(f"reg_lambda must be >= 0; got {self.reg_lambda}")
        if self.lora_rank < 0:
            bad(f"lora_rank must be >= 0; got {self.lora_rank}")
        if self.bypass_rank < 0:
            bad(f"bypass_rank must be >= 0; got {self.bypass_rank}")
        if self.bypass_lr <= 0 or not math.isfinite(self.bypass_lr):
            bad(f"bypass_lr must be > 0; got {self.bypass_lr}")
        if not 0 <= self.static_mix <= 1:
            bad(f"static_mix must be in [0, 1]; got {self.static_mix}")
        if self.static_mix > 0 and not self.static_ranking:
            bad("static_mix > 0 needs a static ranking (--static-ranking)")
        if self.lr_schedule not in LR_SCHEDULES:
            bad(f"lr_schedule must be one of {LR_SCHEDULES}; got {self.lr_schedule!r}")
        if not 0 <= self.lr_final <= 1:
            bad(f"lr_final (a fraction of the initial learning rates) must be in [0, 1]; got {self.lr_final}")
        if self.docs_supplement and "docs" not in self.tasks:
            bad("docs_supplement adds training data to the docs task, which is not among the tasks")
        if self.extra_data and not Path(self.extra_data).is_file():
            bad(f"extra_data file not found: {self.extra_data}")
        if self.max_prompt_tokens < 2 or self.max_continuation_tokens < 2:
            bad("max_prompt_tokens and max_continuation_tokens must be >= 2")
        if not DEVICE_RE.fullmatch(str(self.device)):
            bad(f"device must be auto, cpu, cuda or cuda:N; got {self.device!r}")
        if self.time_budget is not None and not (self.time_budget > 0 and math.isfinite(self.time_budget)):
            bad(f"time_budget must be a number of seconds > 0; got {self.time_budget}")
        if self.checkpoint_format not in CHECKPOINT_FORMATS:
            bad(f"checkpoint_format must be one of {CHECKPOINT_FORMATS}; got {self.checkpoint_format!r}")
        if self.checkpoint_every < 1:
            bad(f"checkpoint_every must be >= 1; got {self.checkpoint_every}")
        if self.resume_from and not Path(self.resume_from).is_file():
            bad(f"resume_from checkpoint not found: {self.resume_from}")
        out = Path(self.output)
        for f in [out] + ([lora_path(out)] if self.lora_rank > 0 else []):
            if f.exists() and not self.force and not self.resume and not self.resume_from:
                bad(f"output file exists: {f}; pass --force to overwrite or --resume to continue")
        if not out.parent.is_dir():
            bad(f"output folder does not exist: {out.parent}")


def read_config_file(path: str | Path) -> dict:
    """The options a ``--config`` JSON file gives: an object whose keys are TrainConfig fields. ``tasks`` may
    be a list or a comma-separated string; ``static_ranking`` the list of blocks or the name of a ranking
    file (read and checked here). Relative file names are taken as given (from the working directory), as on
    the command line. Raises ValueError naming the file and the key."""
    import json

    try:
        opts = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read config {path}: {e}") from None
    if not isinstance(opts, dict):
        raise ValueError(f"config {path} must hold a JSON object; got {type(opts).__name__}")
    known = [f.name for f in fields(TrainConfig)]
    unknown = sorted(set(opts) - set(known))
    if unknown:
        raise ValueError(f"config {path}: unknown keys {unknown}; expected some of {known}")
    if isinstance(opts.get("tasks"), str):
        opts["tasks"] = split_tasks(opts["tasks"])
    if isinstance(opts.get("static_ranking"), str):
        opts["static_ranking"] = read_static_ranking(opts["static_ranking"])
    return opts


def split_tasks(spec: str) -> list[str]:
    return [t.strip() for t in str(spec).split(",") if t.strip()]


def read_static_ranking(path: str | Path) -> list[int]:
    """The block order of a ranking file (``first-gguf rank``'s output, a shipped .static-ranking.json)."""
    from ..convert.ranking_file import read_ranking_file

    return read_ranking_file(path, need_name=False)["ranking"]


def preflight(cfg: "TrainConfig", needs_tasks: bool = True) -> None:
    """Check the inputs that are cheap to check before anything costly (loading and dequantizing the model,
    downloading 358 MB of task data): a GGUF that its reader cannot parse (truncated, not a GGUF), an
    ``--init-routers`` file that does not load, task names. Raises ValueError naming the file or value."""
    p = Path(cfg.model)
    if p.is_file() and p.suffix == ".gguf":
        import gguf

        try:
            gguf.GGUFReader(str(p))
        except Exception as e:  # noqa: BLE001 - any reader failure means the file is not a usable GGUF
            raise ValueError(f"model {p} is not a readable GGUF file (truncated or corrupt?): "
                             f"{type(e).__name__}: {e}") from None
    elif not (p.is_dir() and (p / "config.json").exists()):
        raise ValueError(f"model not found or not understood: {p}; expected a GGUF file or a Hugging Face "
                         f"checkpoint directory with config.json")
    if cfg.init_routers:
        from ..convert.router_file import load_router_file

        load_router_file(cfg.init_routers)  # RouterFileError (a ValueError) names the file
    if needs_tasks:
        from ..datasets.tasks import parse_tasks

        parse_tasks(cfg.tasks)


def resolve_device(spec: str = "auto", local_rank: int | None = None) -> "torch.device":
    """The torch device of ``spec``: "auto" (CUDA when available, else the CPU), "cpu", "cuda" or "cuda:N".
    Under torchrun (``local_rank`` given) "auto" / "cuda" mean cuda:LOCAL_RANK. A ValueError naming the value
    for anything else, and when CUDA is asked for but not available (or N is not a device here)."""
    import torch

    spec = str(spec)
    if not DEVICE_RE.fullmatch(spec):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N; got {spec!r}")
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"device {spec!r}: CUDA is not available here (torch {torch.__version__}, "
                         f"{'a CPU-only build' if torch.version.cuda is None else 'no CUDA device found'}); "
                         f"use --device cpu or auto")
    n = torch.cuda.device_count()
    idx = int(spec.split(":")[1]) if ":" in spec else (local_rank or 0)
    if idx >= n:
        raise ValueError(f"device {spec!r}: no CUDA device {idx} (this machine has {n})")
    return torch.device("cuda", idx)
