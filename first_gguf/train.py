"""Router training (+ optional LoRA): the "finetuning" in FiRST.

Run ``first-gguf train ...`` or, for several processes (DDP, gloo on CPU),
``torchrun --nproc-per-node 2 -m first_gguf.train ...`` /
``accelerate launch -m first_gguf.train ...`` with the same options.

What is trained, and how it matches inference exactly
-----------------------------------------------------
The base causal LM is frozen. One router per block, with the runtime's
definition (cpp/first.h): keep-score s = mean over prompt tokens of
sigmoid(w . RMSNorm_attn(h_in) + b), where h_in is the block input of the
full-depth prompt pass. For every training sequence (prompt + continuation):

1. Teacher pass (no grad): the full model over prompt + continuation. It gives
   the prompt's block inputs (identical in the student, since the prompt always
   runs at full depth), hence the router scores, and the teacher's next-token
   distributions.
2. A budget k is drawn per sequence, uniformly over [budget_min, budget_max] *
   n_layer, so the ranking is trained for every skip_budget. The k blocks with
   the lowest scores are skipped (hard, exactly what the runtime does): set S.
3. Student passes: prompt positions run every block; continuation positions
   skip the blocks of the set. One pass with S, one with a swap S' (one block a
   of S kept, one kept block b skipped instead, both drawn at random).
4. Distillation cost of a set = KL(teacher || student) averaged over the
   continuation tokens that skipping can change (all but the first, which comes
   from the full-depth prompt). No labels are needed.
5. Router loss (learning to rank by local swaps): |d| * softplus(-sign(d) *
   (s_a - s_b) / T) with d = KL(S) - KL(S'): when skipping b instead of a helps,
   a's keep-score is pushed above b's, weighted by how much it helped; T =
   temperature * std of the sequence's scores. Plus lambda * (mean_l s_l - 0.5)^2,
   which keeps the scores centred in the sigmoid's responsive range (lambda 0.01,
   the coefficient reported for FiRST). The passes need no backpropagation
   through the frozen model, so a step costs three forward passes.

   Why not a straight-through gate: its gradient for a skipped block is the
   derivative at "block fully off", which on these models often does not say
   that the block is needed (measured: it kept choosing the most harmful block
   of a tiny model); the swap comparison measures the actual set cost.

Bypass adapters (``bypass_rank > 0``, issue 7): a skipped block is replaced by
h + U D rmsnorm(h) instead of h (RMSNorm without weight, the model's eps; D:
rank x n_embd, U: n_embd x rank, U initialised to zero so training starts from
plain skipping). The bypasses are trained jointly with the routers by the same
distillation: the KL of the routed set (bypasses active on the skipped blocks)
is backpropagated into every bypass of that set, and the swap comparison of the
router loss is made with bypasses active, so the routers learn which blocks are
cheap *given* their bypass. Every sequence draws its own budget over
[budget_min, budget_max], so the bypasses see the sets the routers choose over
the whole budget range; with ``static_mix > 0`` that fraction of sequences uses
the top-k of a static ranking instead (so "static + bypass" is a fair baseline
for the same adapters). The full-depth model is untouched: a block that runs
never sees its bypass.

With ``lora_rank > 0`` a decode-only LoRA (DecodeLora: q,k,v,o,gate,up,down of
every block, alpha = 2 * rank) is trained jointly: it acts only on continuation
positions of the skipped passes (the runtime attaches it to the llama.cpp
context only while a skip mask is set), so the prompt, the teacher and the
full-depth model are untouched and the router scores stay those of the frozen
model. The KL of the routed set is backpropagated into it. It is written as a
llama.cpp LoRA adapter GGUF beside the router file (``<stem>.lora.gguf``), for
``Model(..., decode_lora=...)`` / ``--decode-lora``.

When ``--model`` is a GGUF without first-gguf data, the same routers, bypasses and rankings are also
written as a sidecar GGUF beside the router file (``<stem>.sidecar.gguf``), for
``first_gguf.load(model, routers=...)`` / ``--routers``.

Static baselines computed here and stored in the router file: ``router_mean``
(mean router score over the training data, lowest first: FiRST without
adaptivity) and ``block_influence`` (ShortGPT: 1 - cos(h_in, h_out) averaged
over tokens, lowest first).
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import math
import os
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch


LR_SCHEDULES = ("constant", "cosine")
# full: fp32 parameters + the optimizer's fp32 state (as before); compact: fp16 parameters + the Adam moments in
# bf16 (a third of full; resumes the optimizer too); params: fp16 parameters only (the optimizer restarts)
CHECKPOINT_FORMATS = ("full", "compact", "params")
DEVICE_RE = re.compile(r"auto|cpu|cuda(:\d+)?")
ONPOLICY_DATA = ("tasks", "bigbench", "linux", "broad", "chat")  # on-policy prompt sources; broad = bigbench,linux


def lr_factor(schedule: str, step: int, steps: int, final: float) -> float:
    """Multiplier of every group's initial learning rate at ``step`` (0-based) of ``steps``."""
    if schedule == "constant" or steps <= 1:
        return 1.0
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * step / (steps - 1)))


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


@dataclass
class TrainConfig:
    model: str
    output: str
    tasks: list[str] = field(default_factory=lambda: ["summarization", "qa", "mc", "translation", "docs"])
    steps: int = 2000
    batch_size: int = 4
    max_prompt_tokens: int = 192
    max_continuation_tokens: int = 64
    lr: float = 5e-3
    budget_min: float = 0.05
    budget_max: float = 0.5
    temperature: float = 0.5
    reg_lambda: float = 0.01
    lora_rank: int = 0
    lora_lr: float = 2e-4
    bypass_rank: int = 0
    bypass_lr: float = 2e-3
    static_mix: float = 0.0
    static_ranking: list[int] | None = None
    init_routers: str | None = None
    seed: int = 0
    bf16: bool = True
    threads: int | None = None
    checkpoint_every: int = 100
    resume: bool = False
    max_examples_per_task: int = 4000
    balance_tasks: bool = False
    docs_supplement: bool = False
    lr_schedule: str = "constant"
    lr_final: float = 0.1
    extra_data: str | None = None
    n_static_examples: int = 64
    force: bool = False
    onpolicy_batch: int = 0
    onpolicy_tokens: int = 48
    onpolicy_temperature: float = 1.0
    onpolicy_beta: float = 0.0
    onpolicy_data: str = "tasks,broad"
    set_noise: float = 0.0
    device: str = "auto"
    time_budget: float | None = None
    checkpoint_format: str = "full"
    resume_from: str | None = None
    compile: bool = False

    def validate(self) -> None:
        def bad(msg):
            raise ValueError(f"invalid training config: {msg}")

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
        from .convert.router_file import load_router_file

        load_router_file(cfg.init_routers)  # RouterFileError (a ValueError) names the file
    if needs_tasks:
        from .tasks import parse_tasks

        parse_tasks(cfg.tasks)


# ------------------------------------------------------------------ device
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


def _device(model) -> "torch.device":
    return next(model.parameters()).device


def _autocast(device, enabled: bool):
    """bf16 autocast for the blocks on ``device`` (a torch.device or a tensor's device)."""
    import torch

    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=enabled)


# ------------------------------------------------------------------ model
def load_frozen_model(path: str):
    """A frozen causal LM from a Hugging Face directory or a GGUF file (dequantized by transformers)."""
    import torch
    from transformers import AutoModelForCausalLM

    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, torch_dtype=torch.float32)
        model.hf_quantizer = None
    elif p.is_dir() and (p / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(str(p), torch_dtype=torch.float32)
    else:
        raise ValueError(f"model not found or not understood: {p}; expected a GGUF file or a Hugging Face "
                         f"checkpoint directory with config.json")
    gguf_architecture(model.config, source=p)  # refuses a family the layer-skip patch does not cover
    model.eval()
    for q in model.parameters():
        q.requires_grad_(False)
    return model


# Hugging Face model_type -> llama.cpp architecture (GGUF general.architecture); which of these the runtime
# supports is asked from the patched library (_lib.supported_architectures), not kept here
HF_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3"}
# architectures whose RMSNorms multiply by 1 + weight (the converter stores 1 + weight in the GGUF)
NORM_PLUS_ONE = frozenset({"gemma3"})
# architectures whose llama.cpp builder has sliding-window blocks (config.layer_types "sliding_attention")
SLIDING_WINDOW_ARCHS = frozenset({"gemma3"})


def gguf_architecture(config, source="model") -> str:
    """The llama.cpp architecture of a transformers config; a ValueError naming the family and the supported
    ones when the layer-skip runtime does not cover it."""
    try:
        from . import _lib

        supported = _lib.supported_architectures()
    except ImportError:  # training needs only torch: without the runtime (e.g. the GPU machine), the families
        supported = tuple(sorted(set(HF_MODEL_TYPES.values())))  # it covered when this was written
    arch = HF_MODEL_TYPES.get(config.model_type)
    if arch is None or arch not in supported:
        known = sorted(t for t, a in HF_MODEL_TYPES.items() if a in supported)
        raise ValueError(f"{source}: model type {config.model_type!r} is not supported for router training; "
                         f"supported model types: {', '.join(known)} (llama.cpp architectures "
                         f"{', '.join(supported)})")
    return arch


def gguf_norm_weight(model, norm) -> "np.ndarray":
    """What an RMSNorm multiplies by, as the GGUF stores it (Gemma: 1 + weight), float32."""
    w = norm.weight.detach().float().cpu().numpy()
    return (1.0 + w).astype(np.float32) if gguf_architecture(model.config) in NORM_PLUS_ONE else w


def _params_to(obj, device):
    """Move an adapter object's parameters to ``device`` in place (the same Parameter objects: hooks and
    optimizer groups that hold them stay valid). Initialised on the CPU first, so every device starts from
    the same values for a seed."""
    for q in obj.parameters():
        q.data = q.data.to(device)
    return obj


class Routers:
    """Router parameters (fp32) and the runtime's router definition, in torch."""

    def __init__(self, n_layer: int, n_embd: int, seed: int = 0):
        import torch

        g = torch.Generator().manual_seed(seed)
        self.weight = torch.nn.Parameter(torch.randn(n_layer, n_embd, generator=g) * 0.02)
        self.bias = torch.nn.Parameter(torch.zeros(n_layer))

    def parameters(self):
        return [self.weight, self.bias]

    def to(self, device):
        return _params_to(self, device)

    def scores(self, normed: "torch.Tensor", prompt_mask: "torch.Tensor") -> "torch.Tensor":
        """normed [L, B, T, E] (attn-normed block inputs), prompt_mask [B, T] -> keep-scores [B, L]."""
        import torch

        logit = torch.einsum("lbte,le->lbt", normed.float(), self.weight) + self.bias[:, None, None]
        s = torch.sigmoid(logit) * prompt_mask[None].float()
        return (s.sum(-1) / prompt_mask.float().sum(-1)[None].clamp(min=1)).transpose(0, 1)


class Bypasses:
    """Per-block low-rank bypass h + U D rmsnorm(h) (fp32); the runtime's definition (constants.BYPASS_DEFINITION)."""

    def __init__(self, n_layer: int, n_embd: int, rank: int, eps: float, seed: int = 0):
        import torch

        g = torch.Generator().manual_seed(seed + 1)
        self.rank, self.eps = rank, eps
        self.down = torch.nn.Parameter(torch.randn(n_layer, rank, n_embd, generator=g) / math.sqrt(n_embd))
        self.up = torch.nn.Parameter(torch.zeros(n_layer, n_embd, rank))

    def parameters(self):
        return [self.down, self.up]

    def to(self, device):
        return _params_to(self, device)

    def delta(self, h: "torch.Tensor", il: int) -> "torch.Tensor":
        import torch

        x = h.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x @ self.down[il].t()) @ self.up[il].t()


LORA_TARGETS = {  # Hugging Face module -> GGUF tensor (blk.N.<name>.weight)
    "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
    "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
}


class DecodeLora:
    """A LoRA active only on positions that skip blocks (continuation tokens of a skipped pass), fp32.

    W x + (alpha / r) B A x on the linear layers of LORA_TARGETS in every block, where the mask set by
    ``active()`` is on; elsewhere (the prompt, the teacher pass, statics) the frozen model is untouched.
    That is the runtime's rule: the adapter is attached to the llama.cpp context only while a skip mask
    is set, i.e. for decoded / scored tokens after a full-depth prefill, never for the prompt.
    """

    def __init__(self, model, rank: int, seed: int = 0):
        import torch

        g = torch.Generator().manual_seed(seed + 2)
        self.rank, self.alpha = rank, float(2 * rank)
        self.scale = self.alpha / rank
        self.mask = None
        self.a: dict[tuple[int, str], torch.nn.Parameter] = {}
        self.b: dict[tuple[int, str], torch.nn.Parameter] = {}
        self._hooks = []
        core = _layers(model)
        for il, layer in enumerate(core.layers[: core.config.num_hidden_layers]):
            for name, mod in layer.named_modules():
                short = name.rsplit(".", 1)[-1]
                if short not in LORA_TARGETS or not isinstance(mod, torch.nn.Linear):
                    continue
                a = torch.nn.Parameter(torch.randn(rank, mod.in_features, generator=g) / math.sqrt(mod.in_features))
                b = torch.nn.Parameter(torch.zeros(mod.out_features, rank))
                self.a[il, short], self.b[il, short] = a, b
                self._hooks.append(mod.register_forward_hook(self._hook(a, b)))
        if not self.a:
            raise ValueError(f"decode-only LoRA: no linear layers named {sorted(LORA_TARGETS)} in the model")

    def _hook(self, a, b):
        def hook(mod, inp, out):
            if self.mask is None:
                return out
            d = (inp[0].float() @ a.t()) @ b.t() * self.scale
            return out + (self.mask * d).to(out.dtype)
        return hook

    @contextlib.contextmanager
    def active(self, mask):
        """mask [B, T, 1] (1: the position runs with the adapter)."""
        self.mask = mask.float()
        try:
            yield
        finally:
            self.mask = None

    def parameters(self):
        return [p for k in self.a for p in (self.a[k], self.b[k])]

    def to(self, device):
        return _params_to(self, device)

    def state_dict(self) -> dict:
        return {f"{il}.{n}.{ab}": t.detach().clone() for (il, n) in self.a
                for ab, t in (("a", self.a[il, n]), ("b", self.b[il, n]))}

    def load_state_dict(self, state: dict) -> None:
        import torch

        for (il, n) in self.a:
            self.a[il, n].data.copy_(state[f"{il}.{n}.a"].to(self.a[il, n].device, torch.float32))
            self.b[il, n].data.copy_(state[f"{il}.{n}.b"].to(self.b[il, n].device, torch.float32))

    def save_gguf(self, path, model, provenance: dict | None = None) -> None:
        """Write a llama.cpp LoRA adapter (general.type "adapter"), loadable by llama_adapter_lora_init."""
        from .convert.lora_gguf import write_lora_gguf

        cfg = _layers(model).config
        pairs = {(il, LORA_TARGETS[n]): (self.a[il, n].detach().float().cpu().numpy(),
                                         self.b[il, n].detach().float().cpu().numpy())
                 for (il, n) in self.a}
        write_lora_gguf(path, pairs, alpha=self.alpha, n_head=cfg.num_attention_heads,
                        n_head_kv=cfg.num_key_value_heads, arch=gguf_architecture(cfg), provenance=provenance)


def _layers(model):
    return model.model


def _layer_windows(model) -> list[int | None]:
    """Per block: its attention window (Gemma 3's sliding-window blocks), or None for full attention. The
    same rule as llama.cpp's SWA mask: position q sees k when q - k < window. Only for the architectures
    whose llama.cpp builder has sliding-window blocks (SLIDING_WINDOW_ARCHS): llama.cpp's qwen2 attends
    to every position even where a config sets use_sliding_window, and training follows the runtime."""
    cfg = _layers(model).config
    if gguf_architecture(cfg) not in SLIDING_WINDOW_ARCHS:
        return [None] * cfg.num_hidden_layers
    return [cfg.sliding_window if t == "sliding_attention" else None for t in _layer_types(cfg)]


def _layer_types(cfg) -> list[str]:
    """Per block: its attention type from the config (``layer_types``; full attention where a config has none)."""
    L = cfg.num_hidden_layers
    return list((getattr(cfg, "layer_types", None) or ["full_attention"] * L)[:L])


def _block_rope(model, h, pos) -> list:
    """Per block: its rotary (cos, sin) tables for positions ``pos``; one table per attention type where the
    family has several rope bases (Gemma 3: local 1e4, global 1e6), else one table for every block."""
    core = _layers(model)
    L = core.config.num_hidden_layers
    if "layer_type" not in inspect.signature(core.rotary_emb.forward).parameters:
        return [core.rotary_emb(h, position_ids=pos)] * L
    types = _layer_types(core.config)
    tables = {t: core.rotary_emb(h, pos, t) for t in set(types)}
    return [tables[t] for t in types]


def _head(model, x):
    """Output logits of final-normed hidden states, with the final logit soft-capping where the config has one
    (as transformers and llama.cpp apply it)."""
    import torch

    head = model.get_output_embeddings()
    with torch.autocast(x.device.type, enabled=False):  # fp32 logits: bf16 rounds log-probs by up to ~0.06
        logits = head(x.to(torch.promote_types(head.weight.dtype, torch.float32)))
    cap = getattr(_layers(model).config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def _cont_positions(n_prompt, T):
    """[B, T, 1]: True at continuation positions (those that skip blocks; the prompt runs at full depth)."""
    import torch

    return (torch.arange(T, device=n_prompt.device)[None, :] >= n_prompt[:, None])[..., None]


def gated_forward(model, ids, n_prompt, gates=None, *, capture=False, bypass: Bypasses | None = None):
    """Forward with per-sequence block gates on continuation positions.

    ids [B, T]; n_prompt [B]; gates [B, L] (None: full depth). Positions t >= n_prompt[b]
    pass block l as h + g (block(h) - h) (+ (1 - g) U D rmsnorm(h) with bypasses); prompt positions run every
    block.
    Returns (final hidden states after the output norm [B, T, E], list of block inputs if capture).
    """
    import torch
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    core = _layers(model)
    h = core.embed_tokens(ids)
    pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
    kw = dict(config=core.config, inputs_embeds=h, attention_mask=None, past_key_values=None, position_ids=pos)
    windows = _layer_windows(model)
    full = create_causal_mask(**kw)
    sliding = create_sliding_window_causal_mask(**kw) if any(w is not None for w in windows) else None
    pe = _block_rope(model, h, pos)
    cont = _cont_positions(n_prompt, ids.shape[1])
    inputs = []
    for il, layer in enumerate(core.layers[: core.config.num_hidden_layers]):
        if capture:
            inputs.append(h)
        out = layer(h, attention_mask=full if windows[il] is None else sliding, position_embeddings=pe[il],
                    position_ids=pos)
        if isinstance(out, tuple):
            out = out[0]
        if gates is not None:
            g = gates[:, il][:, None, None].to(out.dtype)
            skipped = h if bypass is None else h + (1 - g) * bypass.delta(h, il).to(h.dtype)
            out = torch.where(cont, skipped + g * (out - h), out)
        h = out
    if capture:
        inputs.append(h)  # final pre-norm state (output of the last block)
    return core.norm(h), inputs


def attn_normed(model, inputs):
    """RMSNorm_attn of every block input: the routers' input, [L, B, T, E]."""
    import torch

    core = _layers(model)
    return torch.stack([core.layers[il].input_layernorm(inputs[il].float())
                        for il in range(core.config.num_hidden_layers)])


def choose_gates(scores, k, temperature: float):
    """Hard skip of the k lowest scores per row (straight-through soft gates). scores [B, L], k [B]."""
    import torch

    B, L = scores.shape
    order = torch.argsort(scores.detach(), dim=1)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(L, device=scores.device).expand(B, L))
    hard = (rank >= k[:, None]).float()
    srt = torch.gather(scores.detach(), 1, order)
    lo = torch.gather(srt, 1, (k - 1).clamp(min=0)[:, None])
    hi = torch.gather(srt, 1, k.clamp(max=L - 1)[:, None])
    tau = (lo + hi) / 2
    temp = temperature * (scores.detach().std(dim=1, keepdim=True) + 1e-4)
    soft = torch.sigmoid((scores - tau) / temp)
    return hard + (soft - soft.detach()), hard  # forward value exactly the hard gate


# ------------------------------------------------------------------- data
@dataclass
class Sequence_:
    prompt: list[int]
    cont: list[int]
    task: str


def encode_examples(model_path: str, examples, max_prompt: int, max_cont: int, *,
                    keep_short: bool = False) -> list[Sequence_]:
    """Token ids exactly as the runtime produces them (llama.cpp's tokenizer and chat template)."""
    from . import load

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
    from .tasks import Example

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


def _kl_positions(n_prompt, length, T):
    """Positions whose prediction skipping can change: continuation positions except the last."""
    import torch

    t = torch.arange(T, device=n_prompt.device)[None, :]
    return (t >= n_prompt[:, None]) & (t < (length - 1)[:, None])


def _seq_kl(t_logp, s_logp, pos):
    """Per-sequence mean KL(teacher || student) over the positions ``pos`` [B, T]."""
    import torch

    kl_tok = (t_logp.exp() * (t_logp - s_logp)).sum(-1)  # [N] over selected positions
    owner = pos.nonzero()[:, 0]
    out = torch.zeros(pos.shape[0], device=kl_tok.device).index_add_(0, owner, kl_tok.float())
    return out / pos.sum(1).clamp(min=1)


def draw_sets(scores, cfg: "TrainConfig", rng: random.Random):
    """The skip sets of a batch from the router keep-scores [B, L].

    Per sequence: k drawn over [budget_min, budget_max] * L; the k lowest scores are skipped (the
    routed set). With probability ``static_mix`` the static ranking's top k instead; with probability
    ``set_noise`` the routed set is moved "around the routers' choice": 1-3 of its blocks are swapped for
    kept blocks among the next lowest scores, so adapters do not learn one fixed set. Then one swap per
    sequence for the ranking loss: a routed block a kept, a kept block b skipped instead.
    Returns (hard [B, L] 1 = keep, alt [B, L], a_idx [B], b_idx [B]) on the scores' device (drawn on the CPU:
    the per-row draws would be a device round trip each).
    """
    import torch

    dev = scores.device
    scores = scores.detach().float().cpu()
    B, L = scores.shape
    k_lo, k_hi = max(1, int(cfg.budget_min * L)), max(1, int(cfg.budget_max * L))
    k = torch.tensor([rng.randint(k_lo, k_hi) for _ in range(B)])
    _, hard = choose_gates(scores, k, cfg.temperature)
    order = torch.argsort(scores.detach(), dim=1).tolist()
    for i in range(B):
        if cfg.static_mix > 0 and rng.random() < cfg.static_mix:  # the static ranking's set (same k)
            hard[i] = 1.0
            hard[i, cfg.static_ranking[: int(k[i])]] = 0.0
        elif cfg.set_noise > 0 and rng.random() < cfg.set_noise and int(k[i]) < L - 1:
            ki = int(k[i])
            near = order[i][ki: min(L, 3 * ki + 2)]  # the kept blocks the routers rank next
            for _ in range(rng.randint(1, min(3, ki, len(near)))):
                out_blk = rng.choice((hard[i] == 0).nonzero()[:, 0].tolist())
                cand = [b for b in near if hard[i, b] == 1]
                if not cand:
                    break
                in_blk = rng.choice(cand)
                hard[i, out_blk], hard[i, in_blk] = 1.0, 0.0
    alt = hard.clone()
    a_idx, b_idx = torch.zeros(B, dtype=torch.long), torch.zeros(B, dtype=torch.long)
    for i in range(B):
        skipped = (hard[i] == 0).nonzero()[:, 0].tolist()
        kept = (hard[i] == 1).nonzero()[:, 0].tolist()
        a, b = rng.choice(skipped), rng.choice(kept)
        alt[i, a], alt[i, b] = 1.0, 0.0
        a_idx[i], b_idx[i] = a, b
    return hard.to(dev), alt.to(dev), a_idx.to(dev), b_idx.to(dev)


def rank_loss_of(scores, diff, a_idx, b_idx, cfg: "TrainConfig"):
    """Ranking loss for the swaps (diff = cost(routed) - cost(swap) > 0: skipping b instead of a is
    better, so a's keep-score should be above b's), and the centring regulariser."""
    import torch

    sa, sb = scores.gather(1, a_idx[:, None])[:, 0], scores.gather(1, b_idx[:, None])[:, 0]
    temp = cfg.temperature * (scores.detach().std(dim=1) + 1e-4)
    margin = torch.sign(diff) * (sa - sb) / temp
    rank_loss = (diff.abs() * torch.nn.functional.softplus(-margin)).mean()
    reg = ((scores.mean(1) - 0.5) ** 2).mean()
    return rank_loss, reg


def step_loss(model, routers: Routers, seqs, cfg: TrainConfig, rng: random.Random, *, pad: int,
              lora: DecodeLora | None = None, bypass: Bypasses | None = None):
    """One training step's loss for a batch of sequences (see the module docstring)."""
    import torch

    dev = _device(model)
    ids, n_prompt, length = _batch(seqs, pad, dev)
    B, T = ids.shape
    L = _layers(model).config.num_hidden_layers
    ac = _autocast(dev, cfg.bf16)

    def head(x):
        return _head(model, x)

    pos = _kl_positions(n_prompt, length, T)
    with torch.no_grad(), ac:  # the LoRA is off outside lora.active(): the teacher is the frozen model
        hid, inputs = gated_forward(model, ids, n_prompt, capture=True)
        t_logp = torch.log_softmax(head(hid[pos]).float(), -1)
        prompt_mask = torch.arange(T, device=dev)[None, :] < n_prompt[:, None]
        normed = attn_normed(model, inputs[:L])
    scores = routers.scores(normed, prompt_mask)

    hard, alt, a_idx, b_idx = draw_sets(scores, cfg, rng)

    trained = lora is not None or bypass is not None
    cont = _cont_positions(n_prompt, T)

    def student():  # the decode LoRA, if any, on the continuation positions of a skipped pass
        return lora.active(cont) if lora is not None else contextlib.nullcontext()

    grad_ctx = torch.enable_grad() if trained else torch.no_grad()
    with grad_ctx, ac, student():
        hid_s, _ = gated_forward(model, ids, n_prompt, hard, bypass=bypass)
        kl_routed = _seq_kl(t_logp, torch.log_softmax(head(hid_s[pos]).float(), -1), pos)
    with torch.no_grad(), ac, student():
        hid_a, _ = gated_forward(model, ids, n_prompt, alt, bypass=bypass)
        kl_alt = _seq_kl(t_logp, torch.log_softmax(head(hid_a[pos]).float(), -1), pos)

    rank_loss, reg = rank_loss_of(scores, kl_routed.detach() - kl_alt, a_idx, b_idx, cfg)
    loss = rank_loss + cfg.reg_lambda * reg
    if trained:
        loss = loss + kl_routed.mean()
    return loss, {"kl": float(kl_routed.detach().mean()), "kl_swap": float(kl_alt.mean()), "reg": float(reg.detach()),
                  "skip": float(1 - hard.mean())}


# ------------------------------------------------------------ on-policy
def _cache_masks(model, valid, q_len: int) -> list:
    """Per block: the attention mask for ``q_len`` new query positions, the last ``q_len`` of the keys
    ``valid`` [B, K] (False: left padding). Causal among the new positions, and within a sliding-window
    block's window (``_layer_windows``; left padding is contiguous, so index distance = position distance);
    a padding query sees only itself (its output is never used; an all-masked row would give NaN).
    Boolean for SDPA, additive for other attention implementations."""
    import torch

    B, K = valid.shape
    dev = valid.device
    k_idx = torch.arange(K, device=dev)
    q_abs = torch.arange(K - q_len, K, device=dev)
    causal = valid[:, None, None, :] & (k_idx[None, None, None, :] <= q_abs[None, None, :, None])
    itself = (k_idx[None, :] == q_abs[:, None])[None, None]
    sdpa = _layers(model).config._attn_implementation == "sdpa"
    made = {}
    out = []
    for w in _layer_windows(model):
        if w not in made:
            m = causal if w is None else causal & (q_abs[None, None, :, None] - k_idx[None, None, None, :] < w)
            m = m | itself
            made[w] = m if sdpa else torch.zeros(m.shape, device=dev).masked_fill(~m, torch.finfo(torch.float32).min)
        out.append(made[w])
    return out


class _KV:
    """What a transformers attention layer calls ``update(keys, values, layer_idx)`` on (a duck-typed Cache),
    for one block and the rows that run it: ``fn(new_keys, new_values) -> (all keys, all values)``."""

    __slots__ = ("fn",)

    def __init__(self, fn):
        self.fn = fn

    def update(self, key_states, value_states, layer_idx=None, *args, **kwargs):
        return self.fn(key_states, value_states)


def _row_plan(keep, L: int) -> list:
    """Per block, the rows of a batch that run it, from ``keep`` [B, L] (bool; None: every row runs every
    block): None (every row), a LongTensor of row indices on keep's device, or [] (no row: not run at all).
    Computed once per pass / decode on the CPU, so the blocks need no device round trip."""
    if keep is None:
        return [None] * L
    kc = keep.detach().cpu()
    out = []
    for il in range(L):
        col = kc[:, il]
        if bool(col.all()):
            out.append(None)
        elif not bool(col.any()):
            out.append([])
        else:
            out.append(col.nonzero()[:, 0].to(keep.device))
    return out


def _rows(x, r):
    """Rows ``r`` (a _row_plan entry) of a batch-first tensor, a (cos, sin) pair, or x itself for every row."""
    if r is None:
        return x
    if isinstance(x, tuple):
        return tuple(_rows(t, r) for t in x)
    return x.index_select(0, r)


def _cached_blocks(model, h, plan, *, masks, pos, pe, kv, bypass: Bypasses | None, layers=None):
    """The blocks over new positions ``h`` [B, C, E] with cached keys (``masks``, ``pe``: per block; ``kv(il, rows)``:
    the block's _KV for those rows). ``plan``: _row_plan. A block runs only for the rows that keep it (the others'
    keys and values of the new positions are never read: a row skips the same blocks at every new position); a
    skipped row passes h (+ its bypass), as in the runtime. A block every row skips is not run at all.
    ``layers``: callables in place of the model's blocks (compile_decode's)."""
    core = _layers(model)
    for il, layer in enumerate(layers or core.layers[: core.config.num_hidden_layers]):
        r = plan[il]
        if r is not None:  # some rows skip: they pass h (+ bypass)
            base = h if bypass is None else h + bypass.delta(h, il).to(h.dtype)
            if isinstance(r, list):  # no row runs the block
                h = base
                continue
        o = layer(_rows(h, r), attention_mask=_rows(masks[il], r), position_ids=_rows(pos, r),
                  past_key_values=kv(il, r), use_cache=True, position_embeddings=_rows(pe[il], r))
        if isinstance(o, tuple):
            o = o[0]
        h = o if r is None else base.index_copy(0, r, o.to(base.dtype))
    return h


def _stop_ids(model) -> set[int]:
    ids = set()
    for src in (model.config, getattr(model, "generation_config", None)):
        e = getattr(src, "eos_token_id", None)
        ids |= set(e) if isinstance(e, (list, tuple)) else ({e} if isinstance(e, int) else set())
    return ids


def eog_token_ids(model_path: str) -> set[int]:
    """The tokens that end a generation in the runtime (llama.cpp's ``llama_vocab_is_eog``) for a GGUF;
    for a Hugging Face checkpoint, the tokenizer's and config's end-of-sequence ids. Without the runtime
    (the GPU machine), a GGUF's eos / eot / eom token ids from its metadata."""
    if str(model_path).endswith(".gguf"):
        try:
            import llama_cpp

            from . import load
        except ImportError:
            import gguf

            r = gguf.GGUFReader(str(model_path))
            out = set()
            for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
                f = r.fields.get(key)
                if f is not None:
                    out.add(int(f.parts[f.data[0]][0]))
            return out
        with load(model_path, n_ctx=64) as m:
            vocab = m._vocab
            return {t for t in range(llama_cpp.llama_vocab_n_tokens(vocab)) if llama_cpp.llama_vocab_is_eog(vocab, t)}
    from transformers import AutoConfig, AutoTokenizer

    out = set()
    try:
        tok = AutoTokenizer.from_pretrained(model_path)
        out |= {tok.eos_token_id} if tok.eos_token_id is not None else set()
    except (OSError, ValueError):
        pass
    e = getattr(AutoConfig.from_pretrained(model_path), "eos_token_id", None)
    return out | (set(e) if isinstance(e, (list, tuple)) else ({e} if isinstance(e, int) else set()))


def sample_prefill(model, prompts: Sequence[Sequence[int]], *, pad: int, bf16: bool = True) -> dict:
    """Full-depth prefill of a left-padded batch of prompts with a KV cache (no grad), on the model's device:
    the sampler's state, with the routers' input (attn-normed block inputs [L, B, P, E]) and the prompt mask
    ``valid`` [B, P]. The cached keys / values (``kv``: per block) are only read afterwards."""
    import torch

    core = _layers(model)
    dev = _device(model)
    L = core.config.num_hidden_layers
    B, P = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, P), pad, dtype=torch.long)
    valid = torch.zeros((B, P), dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(list(p))
        valid[i, P - len(p):] = True
    ids, valid = ids.to(dev), valid.to(dev)
    pos = (valid.long().cumsum(1) - 1).clamp(min=0)  # every prompt starts at position 0, as in the runtime
    # every block keeps all its keys (no sliding-window cache that drops old ones), so the masks of
    # _cache_masks index the same K columns in every block
    kv = []

    def keep(k, v):
        kv.append((k, v))
        return k, v

    with torch.no_grad(), _autocast(dev, bf16):
        h = core.embed_tokens(ids)
        pe, masks = _block_rope(model, h, pos), _cache_masks(model, valid, P)
        inputs = []
        for il, layer in enumerate(core.layers[:L]):
            inputs.append(h)
            h = layer(h, attention_mask=masks[il], position_ids=pos, past_key_values=_KV(keep), use_cache=True,
                      position_embeddings=pe[il])
            if isinstance(h, tuple):
                h = h[0]
        normed = attn_normed(model, inputs)
        logits = _head(model, core.norm(h[:, -1:])).float()
    return {"kv": kv, "valid": valid, "next_pos": pos[:, -1:] + 1, "logits": logits, "normed": normed,
            "bf16": bf16, "pad": pad}


def prefix_forward(model, state: dict, conts: Sequence[Sequence[int]], gates=None, *,
                   bypass: Bypasses | None = None, lora: DecodeLora | None = None):
    """Final hidden states (after the output norm) [B, C, E] of the continuations ``conts`` (right-padded)
    after the full-depth prompt cached by ``sample_prefill``: the continuation half of ``gated_forward``
    (blocks of ``gates`` [B, L] skipped, bypasses, the decode LoRA on every continuation position; None:
    full depth, the teacher), without recomputing the prompt; a block runs only for the rows that keep it.
    Differentiable in the bypasses and LoRA."""
    import torch

    core = _layers(model)
    dev = _device(model)
    B, C = len(conts), max(len(c) for c in conts)
    ids = torch.full((B, C), state["pad"], dtype=torch.long)
    for i, c in enumerate(conts):
        ids[i, : len(c)] = torch.tensor(list(c))
    ids = ids.to(dev)
    valid = torch.cat([state["valid"], torch.ones(B, C, dtype=torch.bool, device=dev)], 1)
    pos = state["next_pos"] + torch.arange(C, device=dev)[None, :]
    h = core.embed_tokens(ids)
    pe, masks = _block_rope(model, h, pos), _cache_masks(model, valid, C)
    keep = None if gates is None else gates.detach() > 0.5
    plan = _row_plan(keep, core.config.num_hidden_layers)
    prefix = state["kv"]

    def kv(il, r):
        pk, pv = (_rows(t, r) for t in prefix[il])
        return _KV(lambda k, v: (torch.cat([pk.to(k.dtype), k], 2), torch.cat([pv.to(v.dtype), v], 2)))

    # the LoRA mask broadcasts over rows: a block may run for some rows only
    ctx = lora.active(torch.ones(1, 1, 1, device=dev)) if lora is not None and keep is not None \
        else contextlib.nullcontext()
    with ctx:
        h = _cached_blocks(model, h, plan, masks=masks, pos=pos, pe=pe, kv=kv, bypass=bypass)
    return core.norm(h)


def sample_decode(model, state: dict, gates, *, max_new: int, temperature: float, generator, stop_ids: set[int],
                  pad: int, bypass: Bypasses | None = None, lora: DecodeLora | None = None) -> list[list[int]]:
    """Sample continuations after ``sample_prefill`` with the blocks of ``gates`` [B, L] (0: skipped)
    skipped for every new token, as the runtime decodes: a skipped block passes h (+ its bypass) and is not
    computed for that row (each block runs on the rows that keep it, with a key / value buffer of those rows
    only), the decode LoRA is active for every new token. Temperature 0: greedy. The tokens stay on the
    device until the end (a finished sequence gets ``pad``; the batch stops early when every sequence has
    stopped, checked every 8 tokens). Returns each sequence's tokens, up to and including the first stop token."""
    import torch

    core = _layers(model)
    dev = _device(model)
    L = core.config.num_hidden_layers
    valid, next_pos, logits = state["valid"], state["next_pos"].clone(), state["logits"]
    B, P = valid.shape
    keep = gates.detach().to(dev) > 0.5
    plan = _row_plan(keep, L)
    # per block: key / value buffers of the rows that run it, prompt copied in, max_new - 1 columns to fill
    bufs = []
    for il, (pk, pv) in enumerate(state["kv"]):
        r = plan[il]
        if isinstance(r, list):
            bufs.append(None)
            continue
        kb, vb = (torch.zeros(t.shape[0] if r is None else len(r), t.shape[1], P + max_new, t.shape[3],
                              dtype=t.dtype, device=dev) for t in (pk, pv))
        kb[:, :, :P], vb[:, :, :P] = _rows(pk, r), _rows(pv, r)
        bufs.append((kb, vb))
    col = [P]

    def kv(il, r):
        kb, vb = bufs[il]

        def put(k, v):
            j = col[0]
            kb[:, :, j:j + 1], vb[:, :, j:j + 1] = k, v
            return kb[:, :, :j + 1], vb[:, :, :j + 1]
        return _KV(put)

    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=dev)
    toks = torch.full((B, max_new), pad, dtype=torch.long, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    valid = torch.cat([valid, torch.ones(B, max_new, dtype=torch.bool, device=dev)], 1)
    lora_ctx = (lambda: lora.active(torch.ones(1, 1, 1, device=dev))) if lora is not None \
        else contextlib.nullcontext
    with torch.no_grad(), _autocast(dev, state["bf16"]):
        for step in range(max_new):
            lg = logits[:, -1].float()
            if temperature > 0:
                tok = torch.multinomial(torch.softmax(lg / temperature, -1), 1, generator=generator)[:, 0]
            else:
                tok = lg.argmax(-1)
            tok = torch.where(done, torch.full_like(tok, pad), tok)
            toks[:, step] = tok
            done = done | torch.isin(tok, stop)
            if step == max_new - 1 or (step % 8 == 7 and bool(done.all())):
                break
            h = core.embed_tokens(tok[:, None])
            j = P + step
            col[0] = j
            pe, masks = _block_rope(model, h, next_pos), _cache_masks(model, valid[:, :j + 1], 1)
            with lora_ctx():
                h = _cached_blocks(model, h, plan, masks=masks, pos=next_pos, pe=pe, kv=kv, bypass=bypass,
                                   layers=getattr(model, "_first_decode_layers", None))
            next_pos = next_pos + 1
            logits = _head(model, core.norm(h)).float()
    out = []
    for row in toks.cpu().tolist():
        n = next((i + 1 for i, t in enumerate(row) if t in stop_ids), None)
        out.append(row[:n] if n is not None else row[: step + 1])
    return out


def _seq_div(t_logp, s_logp, pos, beta: float):
    """Per-sequence mean of (1 - beta) KL(student || teacher) + beta KL(teacher || student) over ``pos``."""
    import torch

    rkl = (s_logp.exp() * (s_logp - t_logp)).sum(-1)
    tok = rkl if beta == 0 else (1 - beta) * rkl + beta * (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    owner = pos.nonzero()[:, 0]
    out = torch.zeros(pos.shape[0], device=tok.device).index_add_(0, owner, tok.float())
    return out / pos.sum(1).clamp(min=1)


def onpolicy_loss(model, routers: Routers, prompts: Sequence[Sequence[int]], cfg: "TrainConfig",
                  rng: random.Random, generator, *, pad: int, stop_ids: set[int],
                  lora: DecodeLora | None = None, bypass: Bypasses | None = None):
    """On-policy distillation (GKD / MiniLLM style) for one batch of prompts.

    The current student (routers' sets as in ``draw_sets``, bypasses, decode LoRA) samples a
    continuation of each prompt at ``onpolicy_temperature`` with its current weights (every step, so
    the samples are always on-policy); the teacher is the same model at full depth. Loss on those tokens:
    (1 - beta) KL(student || teacher) + beta KL(teacher || student), exact over the vocabulary, at every
    continuation position whose prediction skipping changes (the first sampled token comes from the
    full-depth prompt and is excluded). The swap comparison for the routers uses the same divergence on
    the same sampled tokens, so the routers rank blocks by what the student's own text costs.
    """
    import torch

    dev = _device(model)
    ac = _autocast(dev, cfg.bf16)
    state = sample_prefill(model, prompts, pad=pad, bf16=cfg.bf16)
    scores = routers.scores(state["normed"], state["valid"])  # valid: the prompt positions
    hard, alt, a_idx, b_idx = draw_sets(scores, cfg, rng)
    conts = sample_decode(model, state, hard, max_new=cfg.onpolicy_tokens, temperature=cfg.onpolicy_temperature,
                          generator=generator, stop_ids=stop_ids, pad=pad, bypass=bypass, lora=lora)
    rows = [i for i, c in enumerate(conts) if len(c) >= 2]
    if not rows:  # every sample stopped at once: nothing that skipping changed
        zero = scores.sum() * 0.0
        return zero, {"okl": 0.0, "okl_swap": 0.0, "otokens": 0.0}
    # positions whose prediction skipping changes: every sampled token but the last (which predicts nothing)
    C = max(len(c) for c in conts)
    lens = torch.tensor([len(c) for c in conts], device=dev)
    pos = (torch.arange(C, device=dev)[None, :] < (lens - 1)[:, None])
    def head(x):
        return _head(model, x)

    with torch.no_grad(), ac:
        t_logp = torch.log_softmax(head(prefix_forward(model, state, conts)[pos]).float(), -1)
    trained = lora is not None or bypass is not None
    with (torch.enable_grad() if trained else torch.no_grad()), ac:
        hid_s = prefix_forward(model, state, conts, hard, bypass=bypass, lora=lora)
        div = _seq_div(t_logp, torch.log_softmax(head(hid_s[pos]).float(), -1), pos, cfg.onpolicy_beta)
    with torch.no_grad(), ac:
        hid_a = prefix_forward(model, state, conts, alt, bypass=bypass, lora=lora)
        div_alt = _seq_div(t_logp, torch.log_softmax(head(hid_a[pos]).float(), -1), pos, cfg.onpolicy_beta)
    idx = torch.tensor(rows, device=dev)  # sequences that stopped after one token carry no signal
    div, div_alt, hard = div[idx], div_alt[idx], hard[idx]
    scores, a_idx, b_idx = scores[idx], a_idx[idx], b_idx[idx]
    rank_loss, reg = rank_loss_of(scores, div.detach() - div_alt, a_idx, b_idx, cfg)
    loss = rank_loss + cfg.reg_lambda * reg
    if trained:
        loss = loss + div.mean()
    return loss, {"okl": float(div.detach().mean()), "okl_swap": float(div_alt.mean()),
                  "otokens": float(np.mean([len(conts[i]) for i in rows])), "oskip": float(1 - hard.mean())}


# ------------------------------------------------------------- statics
def static_rankings(model, routers: Routers, seqs, pad: int, bf16: bool = True) -> dict:
    import torch

    L = _layers(model).config.num_hidden_layers
    score_sum, bi_sum, n = np.zeros(L), np.zeros(L), 0
    dev = _device(model)
    ac = _autocast(dev, bf16)
    for i in range(0, len(seqs), 4):
        chunk = seqs[i:i + 4]
        ids, n_prompt, length = _batch(chunk, pad, dev)
        with torch.no_grad():
            with ac:
                _, inputs = gated_forward(model, ids, n_prompt, capture=True)
            T = ids.shape[1]
            valid = torch.arange(T, device=dev)[None, :] < length[:, None]
            prompt_mask = torch.arange(T, device=dev)[None, :] < n_prompt[:, None]
            s = routers.scores(attn_normed(model, inputs[:L]), prompt_mask)
            score_sum += s.sum(0).cpu().numpy()
            for il in range(L):
                cos = torch.nn.functional.cosine_similarity(inputs[il].float(), inputs[il + 1].float(), dim=-1)
                bi_sum[il] += float(((1 - cos) * valid).sum() / valid.sum()) * len(chunk)
            n += len(chunk)
    mean_s, bi = score_sum / n, bi_sum / n
    return {
        "router_mean": {"ranking": [int(x) for x in np.argsort(mean_s, kind="stable")],
                        "method": "mean router keep-score over training data, lowest first",
                        "values": [float(x) for x in mean_s], "n_sequences": n},
        "block_influence": {"ranking": [int(x) for x in np.argsort(bi, kind="stable")],
                            "method": "ShortGPT Block Influence 1-cos(h_in,h_out) averaged over tokens, lowest first",
                            "values": [float(x) for x in bi], "n_sequences": n},
    }


# ---------------------------------------------------------------- driver
def _dist(device=None):
    """(world size, rank) under torchrun / accelerate (WORLD_SIZE > 1), the process group initialised on first
    use: NCCL when this rank trains on CUDA, gloo on the CPU; (1, 0) otherwise."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device is not None and device.type == "cuda" else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    return world, rank


def _all_reduce_grads(params, world: int) -> None:
    """Mean of the gradients over the ranks, in one collective (a LoRA has hundreds of parameter tensors)."""
    import torch
    import torch.distributed as dist

    for q in params:
        if q.grad is None:
            q.grad = torch.zeros_like(q)
    flat = torch.cat([q.grad.reshape(-1) for q in params])
    dist.all_reduce(flat)
    flat /= world
    i = 0
    for q in params:
        q.grad.copy_(flat[i:i + q.numel()].view_as(q.grad))
        i += q.numel()


def model_signature(model) -> dict:
    """What a checkpoint must match to be resumed on a model, wherever its file lies (the GPU machine's copy has
    another path): architecture, sizes, and sums of the embedding and final norm weights."""
    core = _layers(model)
    cfg = core.config
    emb = core.embed_tokens.weight.detach()
    return {"arch": cfg.model_type, "n_layer": cfg.num_hidden_layers, "n_embd": cfg.hidden_size,
            "vocab": cfg.vocab_size, "embed_sum": round(float(emb.float().abs().sum()), 1),
            "norm_sum": round(float(core.norm.weight.detach().float().sum()), 3)}


def _same_signature(a: dict, b: dict) -> bool:
    exact = ("arch", "n_layer", "n_embd", "vocab")
    return all(a.get(k) == b.get(k) for k in exact) and \
        abs(a["embed_sum"] - b["embed_sum"]) <= 1e-4 * max(1.0, abs(a["embed_sum"])) and \
        abs(a["norm_sum"] - b["norm_sum"]) <= 1e-3 * max(1.0, abs(a["norm_sum"]))


def checkpoint_path(output) -> Path:
    """Where training on router file ``output`` writes its checkpoint: <stem>.ckpt.pt beside it."""
    return Path(output).with_suffix(".ckpt.pt")


def _checkpoint_state(cfg, routers, bypass, lora, opt, step, history, signature, rng=None) -> dict:
    """The checkpoint of ``cfg.checkpoint_format`` (CHECKPOINT_FORMATS), every tensor on the CPU."""
    import torch

    half = cfg.checkpoint_format != "full"

    def par(t):
        t = t.detach().cpu()
        return t.half() if half else t.clone()

    state = {"weight": par(routers.weight), "bias": par(routers.bias), "step": step, "history": history,
             "config": asdict(cfg), "model_signature": signature, "format": cfg.checkpoint_format,
             "rng_state": rng.getstate() if rng is not None else None}  # the set draws continue exactly
    if bypass is not None:
        state["bypass_down"], state["bypass_up"] = par(bypass.down), par(bypass.up)
    if lora is not None:
        state["lora"] = {k: (v.half() if half else v).cpu() for k, v in lora.state_dict().items()}
    if cfg.checkpoint_format != "params":
        o = opt.state_dict()
        if cfg.checkpoint_format == "compact":  # Adam's moments in bf16 (fp16 would flush exp_avg_sq to 0)
            o = {"param_groups": o["param_groups"],
                 "state": {i: {k: (v.detach().cpu().to(torch.bfloat16) if k != "step" and v.is_floating_point()
                                   else v.detach().cpu()) for k, v in st.items()} for i, st in o["state"].items()}}
        state["opt"] = o
    return state


def _write_checkpoint(path: Path, state: dict) -> None:
    import torch

    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def compile_decode(model) -> None:
    """torch.compile the decoder layers for the sampler's decode steps only (``sample_decode`` uses them; the
    scoring passes with gradients stay eager). Dynamic shapes: the rows that run a block and the cache length
    change from call to call. Opt-in (``compile``, CUDA only: on this project's 2-core CPU the first step of a
    4-block model spent 193 s compiling and then ran no faster); see docs/gpu_recipe.md."""
    import torch

    core = _layers(model)
    model._first_decode_layers = [torch.compile(layer, dynamic=True)
                                  for layer in core.layers[: core.config.num_hidden_layers]]


def onpolicy_prompt_pool(cfg: TrainConfig, sequences: list[Sequence_], examples=None) -> list[Sequence_]:
    """The prompts on-policy samples start from (``cfg.onpolicy_data``), as Sequence_s without continuation:
    ``tasks``: the training examples' prompts (``examples``, re-encoded whole; without them the training
    sequences' prompts as given); ``bigbench`` / ``linux`` / ``broad`` (both) / ``chat``: first_gguf.broad.
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
        from .broad import broad_prompts

        recs = broad_prompts(tuple(broad), seed=cfg.seed)
        toks = encode_prompts(cfg.model, [({"role": "user", "content": r["prompt"]},) for r in recs])
        for r, p in zip(recs, toks):
            add(p, r["source"])
    if "chat" in srcs:
        from .broad import chat_prompts

        recs = chat_prompts()
        for r, p in zip(recs, encode_prompts(cfg.model, [({"role": "user", "content": r["prompt"]},) for r in recs])):
            add(p, "chat")
    if not out:
        raise ValueError(f"no on-policy prompts from {cfg.onpolicy_data!r} within {cfg.max_prompt_tokens} tokens")
    return out


def training_data(cfg: TrainConfig):
    """(sequences, examples): cfg.tasks' train splits (+ docs supplement, extra data), tokenized as the
    runtime does (needs the llama.cpp runtime for a GGUF: on the GPU machine, carry them pre-tokenized)."""
    from .tasks import load_task, parse_tasks, split

    examples = []
    rs = random.Random(cfg.seed)
    for t in parse_tasks(cfg.tasks):
        tr = split(load_task(t), "train", seed=0)
        rs.shuffle(tr)
        examples += tr[: cfg.max_examples_per_task]
    if cfg.docs_supplement:
        from .tasks import docs_supplement

        extra = docs_supplement()
        rs.shuffle(extra)
        examples += extra[: cfg.max_examples_per_task]
    if cfg.extra_data:
        from .tasks import read_examples_jsonl

        examples += read_examples_jsonl(cfg.extra_data)
    return encode_examples(cfg.model, examples, cfg.max_prompt_tokens, cfg.max_continuation_tokens), examples


def train(cfg: TrainConfig, *, sequences: list[Sequence_] | None = None, progress: bool = True,
          onpolicy_prompts: list[Sequence_] | None = None, stop_ids: set[int] | None = None) -> dict:
    """Train routers (and LoRA); write the router file (and adapter). Returns a summary dict.

    ``sequences``: pre-tokenized training data (tests, synthetic tasks); default: cfg.tasks' train splits.
    ``onpolicy_prompts``: prompts for on-policy samples (Sequence_s; their ``task`` groups the balanced
    draw); default: ``onpolicy_prompt_pool(cfg, sequences)`` when ``cfg.onpolicy_batch > 0``.
    ``stop_ids``: the tokens that end a sample (default: the model's end-of-generation tokens, from the
    runtime for a GGUF).
    """
    import torch

    t0 = time.time()  # the time budget counts from here (model loading included)
    cfg.validate()
    world0 = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")) if world0 > 1 else None)
    preflight(cfg, sequences is None)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    world, rank = _dist(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = load_frozen_model(cfg.model).to(device)
    if cfg.compile:
        if device.type != "cuda":
            raise ValueError(f"compile is for CUDA devices only (device {device}); on the CPU it compiled for "
                             f"minutes and ran no faster")
        compile_decode(model)
    L, E = model.config.num_hidden_layers, model.config.hidden_size
    examples = None
    if sequences is None:
        sequences, examples = training_data(cfg)
    if not sequences:
        raise ValueError("no training sequences (each needs a prompt and >= 2 continuation tokens)")
    pad = model.config.eos_token_id if isinstance(model.config.eos_token_id, int) else 0

    lora = DecodeLora(model, cfg.lora_rank, seed=cfg.seed).to(device) if cfg.lora_rank > 0 else None
    routers = Routers(L, E, seed=cfg.seed).to(device)
    groups = [{"params": routers.parameters(), "lr": cfg.lr}]
    bypass = None
    if cfg.bypass_rank:
        bypass = Bypasses(L, E, cfg.bypass_rank, float(model.config.rms_norm_eps), seed=cfg.seed).to(device)
        groups.append({"params": bypass.parameters(), "lr": cfg.bypass_lr})
    if cfg.init_routers:  # warm start (routers, and bypasses when both sides have them)
        from .convert.router_file import load_router_file

        rf = load_router_file(cfg.init_routers)
        if (rf.n_layer, rf.n_embd) != (L, E) or sorted(rf.weights) != list(range(L)):
            raise ValueError(f"{cfg.init_routers}: routers for {rf.n_layer} blocks x {rf.n_embd}, blocks "
                             f"{sorted(rf.weights)}; the model needs all {L} blocks x {E}")
        routers.weight.data.copy_(torch.from_numpy(np.stack([rf.weights[il] for il in range(L)])))
        routers.bias.data.copy_(torch.tensor([rf.biases.get(il, 0.0) for il in range(L)]))
        if bypass is not None and rf.bypasses:
            if rf.bypass_rank != cfg.bypass_rank:
                raise ValueError(f"{cfg.init_routers}: bypasses of rank {rf.bypass_rank}; this run trains rank "
                                 f"{cfg.bypass_rank} (pass --bypass-rank {rf.bypass_rank})")
            # blocks without an adapter in the file keep the fresh one: up = 0 is the identity, as in the file
            for il, (down, up) in rf.bypasses.items():
                bypass.down.data[il].copy_(torch.from_numpy(np.asarray(down, dtype=np.float32)))
                bypass.up.data[il].copy_(torch.from_numpy(np.asarray(up, dtype=np.float32)))
    if cfg.static_ranking and any(not 0 <= b < L for b in cfg.static_ranking):
        raise ValueError(f"static ranking {cfg.static_ranking} names blocks outside 0..{L - 1}")
    if lora is not None:
        groups.append({"params": lora.parameters(), "lr": cfg.lora_lr})
    base_lrs = [g["lr"] for g in groups]  # the schedule scales these (a resumed optimizer holds scaled ones)
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    params = [p for g in groups for p in g["params"]]

    ckpt = checkpoint_path(cfg.output)
    signature = model_signature(model)
    start, history, rng_state = 0, [], None
    src = Path(cfg.resume_from) if cfg.resume_from else ckpt if cfg.resume and ckpt.exists() else None
    if src is not None:
        state = torch.load(src, map_location="cpu", weights_only=False)
        if "model_signature" in state:
            if not _same_signature(state["model_signature"], signature):
                raise ValueError(f"checkpoint {src} was trained on another model ({state['config']['model']}: "
                                 f"{state['model_signature']}); {cfg.model} is {signature}")
        elif state["config"]["model"] != cfg.model:
            raise ValueError(f"checkpoint {src} was trained on {state['config']['model']}, not {cfg.model}")

        def load(p, t, what):
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"checkpoint {src}: {what} of shape {tuple(t.shape)}; this run's is {tuple(p.shape)}")
            p.data.copy_(t)

        load(routers.weight, state["weight"], "router weights")
        load(routers.bias, state["bias"], "router biases")
        if bypass is not None:
            if "bypass_down" not in state:
                raise ValueError(f"checkpoint {src} has no bypasses; train without --bypass-rank or start afresh")
            load(bypass.down, state["bypass_down"], "bypass down matrices (pass the checkpoint's --bypass-rank)")
            load(bypass.up, state["bypass_up"], "bypass up matrices")
        if "opt" in state:  # a "params" checkpoint has none: the optimizer starts afresh
            opt.load_state_dict(state["opt"])
        if lora is not None:
            if "lora" not in state:
                raise ValueError(f"checkpoint {src} has no decode-only LoRA; train without --lora-rank or start "
                                 f"afresh")
            lora.load_state_dict(state["lora"])
        start, history = state["step"], state["history"]
        rng_state = state.get("rng_state") if world == 1 else None  # rank 0's draws only: the others restart
        if start >= cfg.steps:
            raise ValueError(f"checkpoint {src} is at step {start}; --steps {cfg.steps} leaves nothing to train "
                             f"(raise --steps)")

    rng = random.Random(cfg.seed * 1000 + rank)
    if rng_state is not None:
        rng.setstate(rng_state)
    order = [i for i in range(len(sequences)) if i % world == rank]
    draw = task_sampler([sequences[i].task for i in order], cfg.balance_tasks)
    if cfg.onpolicy_batch:
        pool = onpolicy_prompts if onpolicy_prompts is not None else onpolicy_prompt_pool(cfg, sequences, examples)
        pool = [pool[i] for i in range(len(pool)) if i % world == rank] or pool
        draw_prompt = task_sampler([p.task for p in pool], True)  # balanced over the prompt sources
        if stop_ids is None:
            stop_ids = _stop_ids(model) | eog_token_ids(cfg.model)
    bar = None
    t_loop, n_samples, stopped = time.time(), 0, False
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc="train routers", unit="step")
    for step in range(start, cfg.steps):
        t_step = time.time()
        brng = random.Random(cfg.seed * 7919 + step * 31 + rank)
        batch = [sequences[order[draw(brng)]] for _ in range(cfg.batch_size)]
        f = lr_factor(cfg.lr_schedule, step, cfg.steps, cfg.lr_final)
        for g, lr0 in zip(opt.param_groups, base_lrs):
            g["lr"] = lr0 * f
        loss, info = (step_loss(model, routers, batch, cfg, rng, pad=pad, lora=lora, bypass=bypass)
                      if cfg.batch_size else (0.0, {}))
        if cfg.onpolicy_batch:
            prompts = [pool[draw_prompt(brng)].prompt for _ in range(cfg.onpolicy_batch)]
            gen = torch.Generator(device=device).manual_seed(cfg.seed * 7919 + step * 31 + rank)
            oloss, oinfo = onpolicy_loss(model, routers, prompts, cfg, rng, gen, pad=pad, stop_ids=stop_ids,
                                         lora=lora, bypass=bypass)
            loss, info = loss + oloss, {**info, **oinfo}
        opt.zero_grad()
        if torch.is_tensor(loss) and loss.requires_grad:
            loss.backward()
        if world > 1:
            _all_reduce_grads(params, world)
        opt.step()
        info["loss"] = float(loss.detach()) if torch.is_tensor(loss) else float(loss)  # waits for the device
        info["sec"] = time.time() - t_step
        n_samples += cfg.onpolicy_batch * world
        history.append({"step": step + 1, **{k: round(v, 5) for k, v in info.items()}})
        if bar:
            bar.set_postfix({k: f"{info[k]:.4f}" for k in ("loss", "kl", "okl", "skip", "oskip") if k in info})
            bar.update(1)
        done = step + 1 - start
        if cfg.time_budget is not None and step + 1 < cfg.steps:
            # stop before a step that would end past the budget (the mean step so far as the estimate); every
            # rank stops at the same step (rank 0 decides)
            now = time.time()
            over = torch.tensor([float(now - t0 + (now - t_loop) / done > cfg.time_budget)], device=device)
            if world > 1:
                import torch.distributed as dist

                dist.broadcast(over, 0)
            stopped = bool(over.item())
        if rank == 0 and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps or stopped):
            _write_checkpoint(ckpt, _checkpoint_state(cfg, routers, bypass, lora, opt, step + 1, history, signature,
                                                      rng))
        if stopped:
            break
    if bar:
        bar.close()
    last = history[-1]["step"] if history else start
    loop_s = time.time() - t_loop

    summary = {"steps": last, "steps_this_run": last - start, "seconds_this_run": round(time.time() - t0, 1),
               "world_size": world, "device": str(device), "stopped_at_time_budget": stopped,
               "seconds_per_step": round(loop_s / max(1, last - start), 3),
               "onpolicy_samples_per_s": round(n_samples / loop_s, 1) if n_samples and loop_s > 0 else None,
               "first_loss": history[0]["loss"] if history else None,
               "last_loss": float(np.mean([h["loss"] for h in history[-20:]])) if history else None}
    if rank == 0:
        _write_outputs(cfg, model, routers, sequences, pad, history, summary, lora, bypass)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    return summary


def _fingerprint(cfg: TrainConfig, model) -> dict:
    from .convert.router_file import fingerprint_from_arrays, fingerprint_gguf

    if str(cfg.model).endswith(".gguf"):
        return fingerprint_gguf(cfg.model)
    core = _layers(model)
    return fingerprint_from_arrays(gguf_architecture(core.config), core.config.num_hidden_layers,
                                   core.config.hidden_size, core.config.vocab_size, gguf_norm_weight(model, core.norm))


def lora_path(output) -> Path:
    """Where the decode-only LoRA of a router file ``output`` is written: <stem>.lora.gguf beside it."""
    return Path(output).with_suffix(".lora.gguf")


def sidecar_path(output) -> Path:
    """Where the sidecar GGUF of a router file ``output`` is written: <stem>.sidecar.gguf beside it."""
    return Path(output).with_suffix(".sidecar.gguf")


def _write_outputs(cfg, model, routers, sequences, pad, history, summary, lora, bypass=None) -> None:
    from .convert.router_file import RouterFile, save_router_file

    L = _layers(model).config.num_hidden_layers
    rng = random.Random(cfg.seed)
    sample = rng.sample(sequences, min(cfg.n_static_examples, len(sequences)))
    statics = static_rankings(model, routers, sample, pad, cfg.bf16)
    w = routers.weight.detach().float().cpu().numpy()
    b = routers.bias.detach().float().cpu().numpy()
    provenance = {
        "command": " ".join(["first-gguf train"] + sys.argv[2:]) if sys.argv and "first-gguf" in sys.argv[0]
        else "first_gguf.train.train()",
        "config": asdict(cfg), "summary": summary,
        "loss_curve": [h for h in history if h["step"] % max(1, cfg.steps // 50) == 0 or h["step"] == cfg.steps],
        "n_sequences": len(sequences),
        "tasks": sorted({s.task for s in sequences}),
    }
    rf = RouterFile(L, w.shape[1], {il: w[il] for il in range(L)}, {il: float(b[il]) for il in range(L)},
                    _fingerprint(cfg, model), statics, provenance)
    if bypass is not None:
        down, up = bypass.down.detach().float().cpu().numpy(), bypass.up.detach().float().cpu().numpy()
        rf.bypasses = {il: (down[il], up[il]) for il in range(L)}
    save_router_file(cfg.output, rf, force=True)
    if Path(cfg.model).suffix == ".gguf":
        from .convert.gguf_edit import GGUFEditError

        try:
            from .convert.attach import write_sidecar

            # the same data as a sidecar GGUF for the model trained on, ready for --routers
            write_sidecar(cfg.model, sidecar_path(cfg.output), routers=rf.routers(), rankings=statics,
                          router_source=provenance, bypasses=rf.bypasses or None, force=True)
        except (GGUFEditError, ImportError) as e:  # e.g. the model already carries first-gguf data; no runtime
            print(f"[first-gguf] no sidecar written: {e}", file=sys.stderr)
    if lora is not None:
        lora.save_gguf(lora_path(cfg.output), model, provenance={"router_file": str(cfg.output),
                                                                 "command": provenance["command"],
                                                                 "rank": lora.rank, "steps": cfg.steps})


def main(argv: list[str] | None = None) -> None:
    """Entry point for torchrun / accelerate launch: python -m first_gguf.train [options]."""
    from .cli import train as train_cmd

    train_cmd.main(args=argv, prog_name="first_gguf.train", standalone_mode=True)


if __name__ == "__main__":  # pragma: no cover
    main()
