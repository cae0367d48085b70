"""Offline task data: (prompt messages, reference continuation) examples per task.

Sources (RESEARCH.md section 5), fetched with the ordinary clients and cached;
no dataset text is stored in this repository:

- ``translation``: Debian gettext catalogues on the machine, en->fr and en->es
  (``/usr/share/locale/{fr,es}/LC_MESSAGES/*.mo``, read with the stdlib).
- ``docs``: Python standard-library docstrings (plain English technical text).
  Its train split is small (108 examples); ``docs_supplement()`` adds training-only
  docstrings from other standard-library modules and numpy, disjoint from the
  task's examples (``first-gguf train --docs-supplement``).
- ``summarization``: BIG-bench ``gem/wikilingua_en`` (from the ``bigbench==1.0.0``
  sdist, fetched with ``pip download``; only the needed members are extracted).
- ``qa``: BIG-bench natural-instructions reading comprehension (CosmosQA, ROPES,
  MultiRC answer generation).
- ``mc``: BIG-bench ``social_iqa`` multiple choice, answered with the option text.

Reserved for external evaluation and refused here: BIG-bench ``gem/xsum``,
``strategyqa``, the German (``de``) catalogues and the held-out source names of
``first_gguf.datasets.heldout`` (``news``, ``de``, ``yesno``, ``everyday``, ``coding``), which only
``first-gguf eval --heldout`` loads.

Splits are deterministic: each task's examples are shuffled with a fixed seed
and cut into train (80%), dev (10%) and test (10%).
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

from .common import (BIGBENCH_MEMBERS, DOC_MODULES, HELDOUT_SOURCES, Example, bigbench_file, catalogue_examples,
                     docstrings, documented_objects, example_uid, is_reserved, user_message)

TASKS = ("summarization", "qa", "mc", "translation", "docs")
SPLITS = ("train", "dev", "test")


def _translation(max_chars: int = 160) -> list[Example]:
    return [ex for lang, name in (("fr", "French"), ("es", "Spanish"))
            for ex in catalogue_examples(lang, name, "translation", max_chars=max_chars)]


def _docs() -> list[Example]:
    return [_docs_example(name, doc, example_uid(name)) for name, doc in docstrings(min_chars=400)]


def _docs_example(name: str, doc: str, uid: str) -> Example:
    """A ``docs`` example: the first ~280 characters of ``doc`` as the prompt, the next 500 as the target."""
    cut = doc.rfind(" ", 0, 280)
    return Example("docs", user_message(f"Continue this Python documentation for {name}:\n{doc[:cut]}"),
                   doc[cut:cut + 500].strip(), uid)


# Modules for the training-only docs supplement: none of them is (or is under) a module of the docs task.
DOCS_SUPPLEMENT_MODULES = (
    "asyncio", "doctest", "difflib", "io", "codecs", "pickle", "pkgutil", "traceback", "ast", "base64",
    "ipaddress", "socket", "socketserver", "optparse", "shelve", "time", "tokenize", "unittest", "uuid", "abc",
    "enum", "imaplib", "lzma", "mimetypes", "platform", "selectors", "smtplib", "ssl", "threading", "array",
    "decimal", "fractions", "email.message", "http.client", "urllib.request", "urllib.parse",
    "xml.etree.ElementTree", "sqlite3", "multiprocessing", "concurrent.futures", "queue", "contextlib", "copy",
    "hashlib", "struct", "weakref", "operator", "glob", "fnmatch", "configparser", "gzip", "bz2", "sched",
    "locale", "calendar", "pprint", "types", "warnings", "secrets", "zlib", "html.parser", "ftplib", "poplib",
    "mailbox", "wave", "pdb", "cmd", "code", "trace", "timeit", "filecmp", "plistlib", "netrc", "gettext",
    "ctypes", "sysconfig", "importlib", "importlib.metadata", "builtins",
    "numpy", "numpy.linalg", "numpy.random", "numpy.fft")


def docs_supplement(min_chars: int = 400) -> list[Example]:
    """Training-only ``docs`` examples, in the task's format, from modules outside the task.

    The ``docs`` task has 135 examples (108 in its train split), too few to train
    bypass adapters for that domain next to thousands of examples of the other
    tasks. These come from other modules (functions, classes and their public
    methods); a docstring whose text also occurs in the task (re-exports) is
    dropped, so the task's dev and test examples stay unseen.
    """
    import inspect

    overlap = [m for m in DOCS_SUPPLEMENT_MODULES if m.split(".")[0] in DOC_MODULES]
    if overlap:
        raise AssertionError(f"supplement modules {overlap} overlap the docs task")
    seen = {doc for _, doc in docstrings(min_chars=min_chars)}
    out = []
    for qual, obj in documented_objects(DOCS_SUPPLEMENT_MODULES, methods=True):
        doc = " ".join((inspect.getdoc(obj) or "").split())
        if len(doc) < min_chars or not doc.isascii() or doc in seen:
            continue
        seen.add(doc)
        out.append(_docs_example(qual, doc, "supplement:" + example_uid(qual)))
    return out


def _bigbench(task: str) -> list[Example]:
    out = []
    for member in BIGBENCH_MEMBERS[task]:
        data = json.loads(bigbench_file(member).read_text())
        prefix = data.get("task_prefix", "") if task == "qa" else ""
        for ex in data["examples"]:
            inp = ex.get("input", "").strip()
            if task == "mc":
                scores = ex.get("target_scores") or {}
                if not scores:
                    continue
                answer = max(scores, key=scores.get)
                options = "\n".join(f"- {o}" for o in scores)
                prompt = f"{inp}\nOptions:\n{options}\nAnswer with the best option."
                target = answer
            else:
                tgt = ex.get("target")
                target = tgt[0] if isinstance(tgt, list) else tgt
                if task == "summarization":
                    prompt = f"Summarize this text in one or two sentences:\n{inp}"
                else:
                    prompt = f"{prefix.strip()}\n{inp}".strip()
            if not target or not inp or len(prompt) > 3000:
                continue
            out.append(Example(task, user_message(prompt), str(target).strip(), example_uid(member, inp)))
    return out


def read_examples_jsonl(path: str | os.PathLike, default_task: str = "extra") -> list[Example]:
    """Examples from a JSON Lines file: ``{"messages": [{"role", "content"}, ...], "target": str}``
    per line, optionally ``"task"`` (default ``default_task``). Blank lines are skipped."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read examples from {p}: {e}") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{p}:{n}"
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{where}: not JSON ({e})") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{where}: expected a JSON object; got {type(rec).__name__}")
        msgs, target = rec.get("messages"), rec.get("target")
        if (not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs)):
            raise ValueError(f"{where}: expected \"messages\": a non-empty list of {{\"role\": str, \"content\": str}}")
        if not isinstance(target, str) or not target.strip():
            raise ValueError(f"{where}: expected \"target\": a non-empty string")
        task = rec.get("task", default_task)
        if not isinstance(task, str) or not task:
            raise ValueError(f"{where}: \"task\" must be a non-empty string; got {task!r}")
        if is_reserved(task):
            raise ValueError(f"{where}: task {task!r} is reserved for external evaluation")
        out.append(Example(task, tuple({"role": m["role"], "content": m["content"]} for m in msgs), target,
                           f"{p.name}:{n}"))
    if not out:
        raise ValueError(f"{p} holds no examples")
    return out


def load_task(task: str) -> list[Example]:
    if is_reserved(task):
        raise ValueError(f"task {task!r} is reserved for external evaluation and never loaded for training or tuning")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if task == "translation":
        ex = _translation()
    elif task == "docs":
        ex = _docs()
    else:
        ex = _bigbench(task)
    if not ex:
        raise ValueError(f"no data found for task {task!r}")
    return ex


def split(examples: list[Example], which: str, *, seed: int = 0) -> list[Example]:
    if which not in SPLITS:
        raise ValueError(f"unknown split {which!r}; expected one of {SPLITS}")
    ex = sorted(examples, key=lambda e: e.uid)
    random.Random(seed).shuffle(ex)
    n = len(ex)
    a, b = int(n * 0.8), int(n * 0.9)
    return {"train": ex[:a], "dev": ex[a:b], "test": ex[b:]}[which]


def parse_tasks(spec: str | list[str]) -> list[str]:
    names = [t.strip() for t in (spec.split(",") if isinstance(spec, str) else spec) if t.strip()]
    if not names:
        raise ValueError("no tasks given")
    for t in names:
        if is_reserved(t):
            hint = "; evaluate it with first-gguf eval --heldout" if t in HELDOUT_SOURCES else ""
            raise ValueError(f"task {t!r} is reserved for external evaluation{hint}")
        if t not in TASKS:
            raise ValueError(f"unknown task {t!r}; expected one of {', '.join(TASKS)}")
    return names


__all__ = ["TASKS", "HELDOUT_SOURCES", "Example", "is_reserved", "load_task", "split", "parse_tasks"]
