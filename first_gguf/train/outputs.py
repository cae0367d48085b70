"""What a run writes at its end: the static rankings computed from the trained routers (``router_mean``,
``block_influence``), the router file, the sidecar GGUF and the decode-only LoRA adapter, and their paths."""
from __future__ import annotations

import random
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .data import _batch
from .family import _autocast, _device, _layers, gguf_architecture, gguf_norm_weight
from .forward import attn_normed, gated_forward
from .parts import Routers

if TYPE_CHECKING:
    from .config import TrainConfig


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


def _fingerprint(cfg: TrainConfig, model) -> dict:
    from ..convert.router_file import fingerprint_from_arrays, fingerprint_gguf

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
    from ..convert.router_file import RouterFile, save_router_file

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
        from ..convert.gguf_edit import GGUFEditError

        try:
            from ..convert.attach import attach_data, write_sidecar

            # the same data as a sidecar GGUF for the model trained on, ready for --routers
            write_sidecar(cfg.model, sidecar_path(cfg.output), **attach_data(rf).kwargs(), force=True)
        except (GGUFEditError, ImportError) as e:  # e.g. the model already carries first-gguf data; no runtime
            print(f"[first-gguf] no sidecar written: {e}", file=sys.stderr)
    if lora is not None:
        lora.save_gguf(lora_path(cfg.output), model, provenance={"router_file": str(cfg.output),
                                                                 "command": provenance["command"],
                                                                 "rank": lora.rank, "steps": cfg.steps})
