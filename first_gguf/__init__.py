"""first-gguf: prompt-decided layer skipping (FiRST) for GGUF models on llama.cpp.

    import first_gguf
    model = first_gguf.load()                       # embedded default model
    model = first_gguf.load("gemma3-270m")          # a second known model, fetched by name
    out = model.chat([{"role": "user", "content": "Hi"}], skip_budget=0.3)
    out.text, out.skipped_layers, out.decode_tokens_per_s

    from first_gguf import Llama                    # llama-cpp-python's Llama, with skip_budget= (a drop-in)
    llm = Llama("smollm2-135m-instruct", n_ctx=2048)
    llm.create_chat_completion(messages, skip_budget=0.3)["first_gguf"]["skipped_layers"]
"""
from __future__ import annotations

import os

from .llama import Llama
from .model import Generation, GenerationChunk, Model, ScoreResult

__version__ = "0.1.0"


def load(model: str | os.PathLike | None = None, *, n_ctx: int = 4096, n_threads: int | None = None,
         seed: int = 0, verbose: bool = False, decode_lora: str | os.PathLike | None = None,
         routers: str | os.PathLike | None = None) -> Model:
    """Load a GGUF model on the patched runtime.

    Args:
        model: path to a GGUF file; None loads the embedded default model
            (the upstream SmolLM2-135M-Instruct Q4_1 GGUF with first-gguf's shipped
            sidecar: routers, bypass adapters, static rankings), downloading and
            verifying it on first use; a known model's name ("smollm2-135m-instruct",
            "gemma3-270m") loads that one the same way.
        n_ctx: context length in tokens; 0: the model's training context (as in llama-cpp-python).
        n_threads: CPU threads (default: half the cores).
        seed: sampler seed.
        verbose: show llama.cpp's log.
        decode_lora: a llama.cpp LoRA adapter GGUF attached only while blocks are skipped (see Model).
        routers: a first-gguf sidecar GGUF for ``model`` (see Model); with model=None, the default
            model's own sidecar unless given.
    """
    if model is not None and not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a path to a GGUF file or None; got {type(model).__name__}")
    if routers is not None and not isinstance(routers, (str, os.PathLike)):
        raise TypeError(f"routers must be a path to a first-gguf sidecar GGUF or None; got {type(routers).__name__}")
    from .models import resolve

    model, routers = resolve(model, routers)
    return Model(model, n_ctx=n_ctx, n_threads=n_threads, seed=seed, verbose=verbose, decode_lora=decode_lora,
                 routers=routers)


__all__ = ["load", "Model", "Llama", "Generation", "GenerationChunk", "ScoreResult", "__version__"]
