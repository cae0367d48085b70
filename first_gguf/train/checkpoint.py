"""Training checkpoints (``<stem>.ckpt.pt`` beside the router file): the formats, writing one, resuming a run
from one, and reading one from outside a run (``read_checkpoint``, ``checkpoint_meta``, ``checkpoint_routers``,
``checkpoint_bypasses``, ``checkpoint_lora``: ``first-gguf routers from-checkpoint`` (from_checkpoint.py),
scripts/gpu_check.py). Every reader of the checkpoint layout goes through this module."""
from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .family import _layers
from .parts import LORA_TARGETS

# full: fp32 parameters + the optimizer's fp32 state (as before); compact: fp16 parameters + the Adam moments in
# bf16 (a third of full; resumes the optimizer too); params: fp16 parameters only (the optimizer restarts)
CHECKPOINT_FORMATS = ("full", "compact", "params")


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


def restore_checkpoint(src, cfg, signature: dict, *, routers, bypass, lora, opt, world: int = 1) -> tuple:
    """Resume a run from checkpoint ``src``: its routers, bypasses, decode-only LoRA and optimizer state (none in a
    "params" checkpoint: the optimizer starts afresh) into this run's, after checking that it was trained on the
    same model (``signature``: model_signature) with the same shapes. Returns (step, history, the set draws'
    random state: rank 0's, so None when ``world`` > 1). A ValueError naming the checkpoint otherwise."""
    state = read_checkpoint(src)
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
    return start, history, rng_state


def read_checkpoint(path) -> dict:
    """The checkpoint at ``path`` as written (every tensor on the CPU); a ValueError naming the file when it
    cannot be read or is not a first-gguf training checkpoint."""
    import pickle

    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:  # a missing, truncated or foreign file
        raise ValueError(f"cannot read checkpoint {path}: {e}") from None
    if not isinstance(state, dict) or "weight" not in state or "step" not in state:
        raise ValueError(f"{path} is not a first-gguf training checkpoint (no 'weight'/'step')")
    return state


def checkpoint_meta(state: dict) -> dict:
    """``step`` (steps done), ``format`` (CHECKPOINT_FORMATS; None for a checkpoint written before formats),
    ``config`` (the run's TrainConfig as a dict, or None), ``history`` (one dict per step: loss, KL, seconds, ...)."""
    return {"step": int(state["step"]), "format": state.get("format"), "config": state.get("config"),
            "history": state.get("history", [])}


def checkpoint_routers(state: dict) -> tuple[np.ndarray, np.ndarray]:
    """(router weights [n_layer, n_embd], biases [n_layer]), float32."""
    return state["weight"].float().numpy(), state["bias"].float().numpy()


def checkpoint_bypasses(state: dict) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """{block: (down [rank, n_embd], up [n_embd, rank])} float32; empty for a run without bypasses."""
    if "bypass_down" not in state:
        return {}
    down, up = state["bypass_down"].float().numpy(), state["bypass_up"].float().numpy()
    return {il: (down[il], up[il]) for il in range(down.shape[0])}


def checkpoint_lora(state: dict) -> dict[tuple[int, str], tuple[np.ndarray, np.ndarray]] | None:
    """The decode-only LoRA (DecodeLora.state_dict: "<block>.<module>.a|b") as {(block, GGUF tensor name):
    (A [rank, in], B [out, rank])} float32, the pairs ``write_lora_gguf`` takes (alpha: 2 x rank, as DecodeLora);
    None for a run without one."""
    if "lora" not in state:
        return None
    lora = {k: v.float().numpy() for k, v in state["lora"].items()}
    return {(int(k.split(".")[0]), LORA_TARGETS[k.split(".")[1]]): (v, lora[k[:-1] + "b"])
            for k, v in lora.items() if k.endswith(".a")}
