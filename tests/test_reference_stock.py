"""skip_budget=0 against stock llama-cpp-python 0.3.36 built from the same pinned source (unpatched)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "<|im_start|>user\nExplain why the sky is blue.<|im_end|>\n<|im_start|>assistant\n",
    "Translate to French: The weather is nice today.\nFrench:",
]
MAX_TOKENS = 40


@pytest.fixture(scope="module")
def stock(stock_python, base_gguf, tmp_path_factory):
    out = tmp_path_factory.mktemp("stock")
    req = {"model": str(base_gguf), "prompts": PROMPTS, "max_tokens": MAX_TOKENS, "n_ctx": 2048, "out": str(out)}
    res = subprocess.run([str(stock_python), str(Path(__file__).with_name("stock_reference.py"))],
                         input=json.dumps(req), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(res.stdout)
    for i, d in enumerate(data):
        d["logits"] = np.load(out / f"logits_{i}.npy")
    return data


def _ours_logits(model, prompt):
    model.reset()
    logits, _, _ = model._prefill(model.tokenize(prompt))
    return logits


@pytest.mark.reference
@pytest.mark.parametrize("i", range(len(PROMPTS)))
def test_budget0_tokens_and_text_equal_stock(stock, base_model, i):
    gen = base_model.generate(PROMPTS[i], 0.0, max_tokens=MAX_TOKENS)
    assert gen.skipped_layers == []
    assert gen.tokens == stock[i]["tokens"]
    assert gen.text == stock[i]["text"]


@pytest.mark.reference
@pytest.mark.parametrize("i", range(len(PROMPTS)))
def test_budget0_logits_equal_stock(stock, base_model, i):
    ours = _ours_logits(base_model, PROMPTS[i])
    diff = float(np.max(np.abs(ours - stock[i]["logits"])))
    print(f"prompt {i}: max |logit diff| vs stock = {diff:.3g}")
    assert diff <= 1e-3


@pytest.mark.reference
@pytest.mark.parametrize("i", range(len(PROMPTS)))
def test_routers_do_not_change_full_depth_output(stock, router_model, i):
    """With routers scored in the graph, skip_budget=0 still equals stock."""
    gen = router_model.generate(PROMPTS[i], 0.0, max_tokens=MAX_TOKENS)
    assert gen.router_scores is not None and len(gen.router_scores) == router_model.n_layer
    assert gen.tokens == stock[i]["tokens"]
    diff = float(np.max(np.abs(_ours_logits(router_model, PROMPTS[i]) - stock[i]["logits"])))
    assert diff <= 1e-3
