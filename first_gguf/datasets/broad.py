"""Broad prompts for on-policy distillation: many kinds of instructions, no references needed.

On-policy training (``first-gguf train --onpolicy-batch``) only needs prompts: the student writes the
continuation and the full-depth model scores it. Adapters trained on five tasks learn those tasks'
distributions, not the model (RESEARCH.md section 7: +0.56 extra NLL on held-out sources vs +0.00 in
distribution), so these prompts aim at diversity over volume:

- ``bigbench``: the inputs of every English JSON task of the BIG-bench 1.0.0 sdist (the same sdist
  the tasks come from, sha256-checked), at most ``per_task`` per (sub)task and 3 * ``per_task`` per
  top-level task: reasoning, QA, dialogue,
  commonsense, code, arithmetic, text editing, data-to-text, story and question generation, ...
  Excluded: the reserved evaluation sources (``gem/xsum``, ``strategyqa``, anything with German
  text), the tasks the ``summarization``, ``qa`` and ``mc`` tasks are built from and every other
  subtask over the qa task's passages (CosmosQA, MultiRC, ROPES, MC-TACO), so their test splits stay
  unseen, and non-ASCII inputs (other languages; ASCII-art images are filtered by name).
- ``linux``: open questions about the installed commands' manual pages (``apropos -s 1 .``), long
  free-form replies like a chat's.
- ``chat`` (not part of the default ``broad`` pair): everyday chat requests, written here as
  instruction templates over topics and how-to tasks (explain, list facts, pros and cons, a poem, a
  story, tips, ...). The held-out ``everyday`` evaluation prompts (first_gguf.datasets.heldout) are the same
  *kind* of request, so this source is kept apart from them by construction: none of its topics or
  tasks is the subject of an ``everyday`` prompt (tests/test_onpolicy_train.py checks that no content
  word of a topic appears in them), so an improvement measured on ``everyday`` is one that carries
  over to new subjects, not a memorised reply.

Every prompt becomes one user message (the chat template is applied by the caller). The list is
deterministic (sorted sources, seeded shuffle) and cached as JSON Lines in the data cache.
"""
from __future__ import annotations

import json
import os
import random
import re
import subprocess
import tarfile
import tempfile
from pathlib import Path

from .common import BIGBENCH_MEMBERS, bigbench_sdist, data_cache_dir, is_reserved

BROAD_SOURCES = ("bigbench", "linux")
# tasks whose examples are not English prose prompts (German text counts as held-out material: the `de`
# evaluation source), or that share passages with the qa task's sources (CosmosQA, MultiRC, ROPES, and
# MC-TACO, built on MultiRC passages): the qa test split must stay unseen
_SKIP_NAME = re.compile(r"(xsum|strategyqa|german|_de\b|mlsum|russian|hindi|hinglish|kannada|persian|parsinlu|"
                        r"swahili|polish|multiemo|spanish|_es\b|_ru\b|multilingual|cs_restaurants|ascii|mnist|cifar|"
                        r"kanji|conlang|language_identification|international_phonetic|salient_translation|"
                        r"cosmosqa|multirc|ropes|mctaco)")
_OWNED = {m.split("benchmark_tasks/")[1].rsplit("/", 1)[0] for ms in BIGBENCH_MEMBERS.values() for m in ms}
FILTER_VERSION = 2  # part of the cache name: a changed filter never reuses an older cached list


def excluded(name: str) -> bool:
    """Whether the BIG-bench task ``name`` (e.g. ``natural_instructions/subtask025_cosmosqa_...``) is left out."""
    return name in _OWNED or is_reserved(name) or bool(_SKIP_NAME.search(name))


def _bigbench_prompts(per_task: int, seed: int) -> list[dict]:
    by_task: dict[str, list[str]] = {}
    with tarfile.open(bigbench_sdist()) as tar:
        for ti in tar:
            if not (ti.isfile() and ti.name.endswith("/task.json") and "benchmark_tasks/" in ti.name):
                continue
            name = ti.name.split("benchmark_tasks/")[1].rsplit("/", 1)[0]
            if excluded(name):
                continue
            try:
                data = json.loads(tar.extractfile(ti).read())
            except ValueError:
                continue
            prefix = str(data.get("task_prefix", "")).strip()
            inputs = []
            for ex in data.get("examples", []) if isinstance(data, dict) else []:
                inp = ex.get("input") if isinstance(ex, dict) else None
                if not isinstance(inp, str):
                    continue
                text = f"{prefix}\n{inp.strip()}".strip() if prefix and len(prefix) < 600 else inp.strip()
                if 20 <= len(text) <= 1500 and text.isascii():
                    inputs.append(text)
            random.Random(f"{seed}:{name}").shuffle(inputs)
            by_task[name] = inputs[:per_task]
    # a task with many subtasks (list_functions has 250) gets at most 3 * per_task prompts in all
    out = []
    for top in sorted({n.split("/")[0] for n in by_task}):
        subs = sorted(n for n in by_task if n.split("/")[0] == top)
        picks = [{"source": "bigbench", "task": n, "prompt": t} for n in subs for t in by_task[n]]
        random.Random(f"{seed}:{top}").shuffle(picks)
        out += picks[: 3 * per_task]
    return out


def linux_prompts() -> list[dict]:
    """Questions about the commands of section 1 of the installed manual pages (``apropos -s 1 .``)."""
    try:
        res = subprocess.run(["apropos", "-s", "1", "."], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return []  # no man-db: the source is simply absent
    out, seen = [], set()
    for line in sorted(set(res.stdout.splitlines())):
        m = re.match(r"^([a-z][\w.+-]*) \(1\)\s+- (.+)$", line)
        if (not m or "_" in m[1] or m[1].startswith("gcloud") or not m[2][:1].isalpha()
                or m[2].endswith("...") or not 12 <= len(m[2]) <= 80 or m[2] in seen):
            continue  # generated command families (gcloud_*), placeholders, truncated or repeated lines
        seen.add(m[2])
        cmd, desc = m[1], m[2].rstrip(".")
        if len(out) % 2:
            q = f"What is the Linux command {cmd} used for?"
        else:
            q = f"Explain in a few sentences what {cmd} ({desc[0].lower() + desc[1:]}) does."
        out.append({"source": "linux", "task": "linux", "prompt": q})
    return out


# subjects chosen to avoid every subject of heldout.EVERYDAY_PROMPTS (no sky, sleep, eggs, cats, coffee,
# plants, exercise, the sea, language learning, money saving, dogs, birthdays, ...)
CHAT_TOPICS = (
    "volcanoes", "the Moon", "honeybees", "the Roman Empire", "electric cars", "solar panels", "black holes",
    "the internet", "chess", "jazz music", "the Great Wall of China", "tea", "chocolate", "recycling",
    "glaciers", "the human heart", "dinosaurs", "penguins", "elephants", "the printing press", "airplanes",
    "tides", "thunderstorms", "deserts", "coral reefs", "the Olympic Games", "democracy", "libraries",
    "mountains", "rivers", "trains", "bridges", "the stock market", "credit cards", "wind turbines",
    "nuclear power", "Mars", "comets", "the Sun", "magnets", "electricity", "batteries", "smartphones",
    "video games", "board games", "basketball", "yoga", "meditation", "rice", "pizza", "cheese", "museums",
    "opera", "painting", "photography", "the piano", "movies", "social media", "public speaking",
    "time management", "friendship", "teamwork", "volunteering", "honesty", "ancient Egypt", "the pyramids",
    "the Vikings", "castles", "pirates", "the Amazon rainforest", "the Arctic", "polar bears", "whales",
    "sharks", "owls", "frogs", "butterflies", "ants", "spiders", "horses", "snow", "winter", "weddings",
    "city life", "public transport", "robots", "artificial intelligence", "programming", "the alphabet",
    "fractions", "prime numbers", "gravity", "sound", "atoms", "DNA", "the immune system", "bones",
    "the brain", "vitamins", "first aid", "fire safety", "maps", "clocks", "calendars", "banks", "taxes",
    "bread", "the violin", "the Renaissance", "the Industrial Revolution", "submarines",
    "lighthouses", "kites", "skateboarding", "tennis", "marathons", "sunscreen", "umbrellas",
    "newspapers", "podcasts", "the metric system", "volcanic islands", "fossils", "crystals", "tornadoes",
)
CHAT_TEMPLATES = (
    "Explain {t} in simple terms.",
    "Give me three interesting facts about {t}.",
    "Write a short paragraph about {t}.",
    "Write a short poem about {t}.",
    "What are the pros and cons of {t}?",
    "How would you explain {t} to a ten-year-old?",
    "Tell me a short story that involves {t}.",
    "What are common misconceptions about {t}?",
    "Why do people find {t} interesting?",
    "Summarize what everyone should know about {t} in three sentences.",
    "Write a short quiz with three questions about {t}.",
    "What is the history of {t}, briefly?",
)
CHAT_TASKS = (
    "make a monthly budget", "clean a cast iron pan", "plant tomatoes", "change a light bulb safely",
    "prepare for a marathon", "train a puppy to sit", "organize a small closet", "write a thank-you note",
    "make homemade bread", "memorize a speech", "tie a tie", "choose a good laptop", "read a train timetable",
    "host a dinner party", "start journaling", "make a paper airplane", "sharpen a kitchen knife",
    "set up an aquarium", "float on my back in a pool", "paint a room", "make a smoothie",
    "back up my photos", "choose a good password", "read a map", "write a short speech for a wedding",
    "fold a fitted sheet", "keep a conversation going", "prepare for an exam", "make friends in a new city",
    "wash a wool sweater", "build a birdhouse", "teach my nephew to play checkers", "make vegetable soup",
    "care for a goldfish", "plan a picnic", "stop procrastinating", "write a good product review",
    "sew on a button", "make a snowman", "stay safe during a thunderstorm",
)
CHAT_TASK_TEMPLATES = (
    "How do I {t}?",
    "Give me step-by-step instructions to {t}.",
    "What mistakes should I avoid when I {t}?",
)


def chat_prompts() -> list[dict]:
    """Everyday chat requests (the ``chat`` source, see the module docstring): every template over every
    topic and how-to task, in a fixed order."""
    out = [{"source": "chat", "task": "chat", "prompt": tpl.format(t=t)}
           for t in CHAT_TOPICS for tpl in CHAT_TEMPLATES]
    out += [{"source": "chat", "task": "chat", "prompt": tpl.format(t=t)}
            for t in CHAT_TASKS for tpl in CHAT_TASK_TEMPLATES]
    return out


def broad_prompts(sources=BROAD_SOURCES, *, per_task: int = 40, seed: int = 0) -> list[dict]:
    """``[{"source", "task", "prompt"}]`` from ``sources`` (see the module docstring), cached."""
    bad = [s for s in sources if s not in BROAD_SOURCES]
    if bad or not sources:
        raise ValueError(f"unknown broad prompt source(s) {bad or sources!r}; expected some of {BROAD_SOURCES}")
    cache = data_cache_dir() / f"broad-v{FILTER_VERSION}-{'-'.join(sorted(sources))}-{per_task}-{seed}.jsonl"
    if cache.exists():
        return [json.loads(line) for line in cache.read_text().splitlines() if line.strip()]
    out = []
    for s in sorted(sources):
        out += _bigbench_prompts(per_task, seed) if s == "bigbench" else linux_prompts()
    if not out:
        raise ValueError(f"no broad prompts found for {list(sources)}")
    random.Random(seed).shuffle(out)
    cache.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=cache.parent, suffix=".part", delete=False) as tmp:
        tmp.write("".join(json.dumps(r) + "\n" for r in out))
    os.replace(tmp.name, cache)
    return out


__all__ = ["BROAD_SOURCES", "broad_prompts", "chat_prompts", "linux_prompts"]
