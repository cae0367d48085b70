"""Runs under *stock* llama-cpp-python 0.3.36 (built from the same pinned sdist,
unpatched, in build/stock-venv). Never imports first_gguf.

stdin: JSON {"model": path, "prompts": [...], "max_tokens": N, "n_ctx": N, "out": dir, "fresh": bool (optional)}
"fresh": for sliding-window models (Gemma 3): clear the KV cache before each prompt and leave out
create_completion ("text" and "finish_reason" are then null), which fails on them in llama-cpp-python 0.3.36
("decode: failed to find a memory slot for batch of size 1"); the tokens and logits come from eval/generate.
stdout: JSON list, per prompt: {"text", "tokens"}; last-prompt-token logits in out/logits_<i>.npy
"""
import json
import sys
from pathlib import Path

import numpy as np
from llama_cpp import Llama

req = json.load(sys.stdin)
llm = Llama(model_path=req["model"], n_ctx=req["n_ctx"], n_threads=2, n_threads_batch=2, seed=0, verbose=False)
out = []
for i, prompt in enumerate(req["prompts"]):
    if req.get("fresh"):
        import llama_cpp as lc

        llm.reset()
        lc.llama_memory_clear(lc.llama_get_memory(llm._ctx.ctx), True)
        res = {"choices": [{"text": None, "finish_reason": None}]}
    else:
        res = llm.create_completion(prompt, max_tokens=req["max_tokens"], temperature=0.0, repeat_penalty=1.0)
    tokens = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
    llm.reset()
    llm.eval(tokens)
    import llama_cpp as lc

    ptr = lc.llama_get_logits_ith(llm._ctx.ctx, -1)  # the last evaluated token
    np.save(Path(req["out"]) / f"logits_{i}.npy", np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy())
    gen = []
    llm.reset()
    for tok in llm.generate(tokens, temp=0.0, repeat_penalty=1.0, reset=True):
        if llm._model.token_is_eog(tok) if hasattr(llm._model, "token_is_eog") else tok == llm.token_eos():
            break
        gen.append(int(tok))
        if len(gen) >= req["max_tokens"]:
            break
    out.append({"text": res["choices"][0]["text"], "finish_reason": res["choices"][0]["finish_reason"],
                "tokens": gen})
json.dump(out, sys.stdout)
