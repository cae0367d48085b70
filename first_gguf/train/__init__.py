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

The package
-----------
- ``config``: TrainConfig, its validation and preflight checks, learning rate schedules, the device.
- ``family``: the frozen model; Hugging Face model types, llama.cpp architectures, norms, sliding windows.
- ``parts``: what is trained: Routers, Bypasses, DecodeLora.
- ``forward``: gated_forward and the KV-cached sampler (sample_prefill, prefix_forward, sample_decode).
- ``losses``: the skip sets, the ranking loss, step_loss and onpolicy_loss.
- ``data``: tokenized training sequences, prompt pools, the task sampler.
- ``checkpoint``: writing, resuming and reading checkpoints (the one module that knows their layout).
- ``outputs``: the static rankings, router file, sidecar and LoRA adapter written at the end.
- ``loop``: ``train(cfg)``; ``__main__``: ``python -m first_gguf.train`` (torchrun, accelerate).
"""
from __future__ import annotations

from .checkpoint import (CHECKPOINT_FORMATS, checkpoint_bypasses, checkpoint_lora, checkpoint_meta, checkpoint_path,
                         checkpoint_routers, model_signature, read_checkpoint)
from .config import DEVICE_RE, LR_SCHEDULES, ONPOLICY_DATA, TrainConfig, lr_factor, preflight, resolve_device
from .data import Sequence_, encode_examples, encode_prompts, onpolicy_prompt_pool, task_sampler, training_data
from .family import (HF_MODEL_TYPES, NORM_PLUS_ONE, SLIDING_WINDOW_ARCHS, gguf_architecture, gguf_norm_weight,
                     load_frozen_model)
from .forward import (attn_normed, choose_gates, compile_decode, eog_token_ids, gated_forward, prefix_forward,
                      sample_decode, sample_prefill)
from .loop import train
from .losses import draw_sets, onpolicy_loss, rank_loss_of, step_loss
from .outputs import lora_path, sidecar_path, static_rankings
from .parts import LORA_TARGETS, Bypasses, DecodeLora, Routers

__all__ = [
    "CHECKPOINT_FORMATS", "DEVICE_RE", "HF_MODEL_TYPES", "LORA_TARGETS", "LR_SCHEDULES", "NORM_PLUS_ONE",
    "ONPOLICY_DATA", "SLIDING_WINDOW_ARCHS", "Bypasses", "DecodeLora", "Routers", "Sequence_", "TrainConfig",
    "attn_normed", "checkpoint_bypasses", "checkpoint_lora", "checkpoint_meta", "checkpoint_path",
    "checkpoint_routers", "choose_gates", "compile_decode", "draw_sets", "encode_examples", "encode_prompts",
    "eog_token_ids", "gated_forward", "gguf_architecture", "gguf_norm_weight", "load_frozen_model", "lora_path",
    "lr_factor", "model_signature", "onpolicy_loss", "onpolicy_prompt_pool", "prefix_forward", "preflight",
    "rank_loss_of", "read_checkpoint", "resolve_device", "sample_decode", "sample_prefill", "sidecar_path",
    "static_rankings", "step_loss", "task_sampler", "train", "training_data",
]
