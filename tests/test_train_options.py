"""`first-gguf train`'s options are generated from TrainConfig's fields; --config files and the recipes/
folder use the same keys (first_gguf/train/config.py, first_gguf/cli.py train_options)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from first_gguf import cli
from first_gguf.train.config import TrainConfig, read_config_file

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.json"))


@pytest.fixture()
def captured(monkeypatch):
    """The TrainConfig the command builds, without training."""
    import first_gguf.train as train_mod

    seen = []
    monkeypatch.setattr(train_mod, "train", lambda cfg: seen.append(cfg) or {})
    return seen


def test_every_field_is_an_option_and_no_option_means_the_defaults(captured):
    params = {p.name for p in cli.main.commands["train"].params}
    assert {f.name for f in dataclasses.fields(TrainConfig)} | {"config_file"} == params
    res = CliRunner().invoke(cli.main, ["train", "--model", "m.gguf", "-o", "x.safetensors"])
    assert res.exit_code == 0, res.output
    assert captured[0] == TrainConfig(model="m.gguf", output="x.safetensors")


def test_options_parse_to_their_fields(captured, tmp_path):
    rank = tmp_path / "r.json"
    rank.write_text(json.dumps({"ranking": [3, 1, 2]}))
    res = CliRunner().invoke(cli.main, [
        "train", "--model", "m.gguf", "-o", "x.safetensors", "--data", "qa, mc", "--steps", "7", "--no-bf16",
        "--balance-tasks", "--static-ranking", str(rank), "--lr-schedule", "cosine", "--time-budget", "60",
        "--threads", "1", "--checkpoint-format", "params"])
    assert res.exit_code == 0, res.output
    c = captured[0]
    assert (c.tasks, c.steps, c.bf16, c.balance_tasks, c.static_ranking) == (["qa", "mc"], 7, False, True, [3, 1, 2])
    assert (c.lr_schedule, c.time_budget, c.threads, c.checkpoint_format) == ("cosine", 60.0, 1, "params")
    res = CliRunner().invoke(cli.main, ["train", "--model", "m.gguf", "-o", "x", "--lr-schedule", "linear"])
    assert res.exit_code == 2 and "linear" in res.output


def test_config_file_keys_and_command_line_precedence(captured, tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"model": "m.gguf", "output": "o.safetensors", "steps": 5, "bf16": False,
                               "resume": True, "tasks": "qa,mc", "static_ranking": [2, 0]}))
    res = CliRunner().invoke(cli.main, ["train", "--config", str(cfg), "--steps", "9", "-o", "p.safetensors"])
    assert res.exit_code == 0, res.output
    c = captured[0]
    assert (c.steps, c.output, c.bf16, c.resume, c.tasks, c.static_ranking) == (9, "p.safetensors", False, True,
                                                                                 ["qa", "mc"], [2, 0])
    for body, words in ((json.dumps({"stepz": 1}), "unknown keys ['stepz']"), ("[1]", "must hold a JSON object"),
                        ("{", "cannot read config"), (json.dumps({"model": "m.gguf"}), "missing --output"),
                        (json.dumps({"static_ranking": str(tmp_path / "none.json"), "model": "m", "output": "o"}),
                         "none.json")):
        cfg.write_text(body)
        res = CliRunner().invoke(cli.main, ["train", "--config", str(cfg)])
        assert res.exit_code == 1 and words in res.output and "Traceback" not in res.output, res.output
    res = CliRunner().invoke(cli.main, ["train", "--model", "no-such-model", "-o", "x.safetensors"])
    assert res.exit_code == 1 and "unknown model name 'no-such-model'" in res.output
    (tmp_path / "there.safetensors").write_bytes(b"")  # checked before a known model would be fetched
    n = len(captured)
    res = CliRunner().invoke(cli.main, ["train", "--model", "qwen2.5-coder-1.5b", "-o", str(tmp_path / "there.safetensors")])
    assert res.exit_code == 1 and "output file exists" in res.output and len(captured) == n


def test_a_config_without_model_or_output_is_refused_by_name():
    for kw, key in (({"output": "o.safetensors"}, "model"), ({"model": "m.gguf"}, "output")):
        with pytest.raises(ValueError, match=f"{key} is required"):
            TrainConfig(**kw).validate()


@pytest.mark.parametrize("recipe", RECIPES, ids=[str(p.relative_to(ROOT / "recipes")) for p in RECIPES])
def test_recipes_are_valid_configs(recipe, monkeypatch):
    """Each recipe reads (its ranking file exists and checks), builds a TrainConfig that validates, names a
    known model, and starts from a file an earlier recipe of its folder writes or that recipes/README.md
    says how to make."""
    from first_gguf.models import MODELS

    monkeypatch.chdir(ROOT)
    opts = read_config_file(recipe)
    assert opts["model"] in MODELS and "output" in opts
    TrainConfig(**opts).validate()
    init = opts.get("init_routers")
    if init:
        outputs = {json.loads(p.read_text())["output"] for p in recipe.parent.glob("*.json")}
        assert init in outputs or f"-o {init}" in (ROOT / "recipes" / "README.md").read_text(), init


def test_recipes_are_listed_in_the_readme():
    text = (ROOT / "recipes" / "README.md").read_text()
    assert RECIPES and all(f"recipes/{p.relative_to(ROOT / 'recipes')}" in text for p in RECIPES)
