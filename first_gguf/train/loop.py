"""The training loop: ``train(cfg)`` (one process, or DDP under torchrun / accelerate)."""
from __future__ import annotations

import os
import random
import time
from pathlib import Path

import numpy as np

from ..convert.ranking_file import check_ranking
from .checkpoint import _checkpoint_state, _write_checkpoint, checkpoint_path, model_signature, restore_checkpoint
from .config import TrainConfig, lr_factor, preflight, resolve_device
from .data import Sequence_, onpolicy_prompt_pool, task_sampler, training_data
from .family import load_frozen_model
from .forward import _stop_ids, compile_decode, eog_token_ids
from .losses import onpolicy_loss, step_loss
from .outputs import _write_outputs
from .parts import Bypasses, DecodeLora, Routers


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
        from ..convert.router_file import load_router_file

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
    if cfg.static_ranking:
        check_ranking({"ranking": cfg.static_ranking}, "static ranking (--static-ranking)", n_layer=L)
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
        start, history, rng_state = restore_checkpoint(src, cfg, signature, routers=routers, bypass=bypass,
                                                       lora=lora, opt=opt, world=world)

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
