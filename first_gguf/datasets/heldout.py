"""Held-out-by-source prompt sets: evaluation only, never training data.

Decided before any training that is measured on them; no training set of the
project draws from these sources, and ``tasks.load_task`` / ``parse_tasks`` /
``read_examples_jsonl`` refuse their names (``common.is_reserved``). Only
``first-gguf eval --heldout`` loads them, through ``load_heldout``.

- ``news``: BIG-bench ``gem/xsum``, a BBC article (cut to ~2,000 characters at a
  line or word boundary) -> its one-sentence reference summary.
- ``de``: English -> German software messages from the Debian gettext catalogues
  (``/usr/share/locale/de/LC_MESSAGES/*.mo``, the ones named in ``DE_DOMAINS``), in the
  ``translation`` task's format.
- ``yesno``: BIG-bench ``strategyqa``, a yes/no question -> the reference answer
  with its reason ("No. The density of a raw pear is ..."), a multi-token target
  (a one-token answer would be predicted by the full-depth prefill and never
  change with skipping).
- ``everyday``: everyday chat requests (advice, how-to, explanations, short
  creative requests) with no reference (target ""): measured by what the model
  generates (on-policy KL, repetition), not by a reference likelihood.
- ``coding``: 40 programming requests (write a function, explain a concept, fix an
  error; Python, SQL, JavaScript and others), no reference, measured like
  ``everyday``. Added in session 16, for the coder model.

Each source's examples come in a fixed order (sorted by id, shuffled with seed 0),
so the first N are the same subset on every machine.
"""
from __future__ import annotations

import json
import random

from .common import (BIGBENCH_HELDOUT_MEMBERS, HELDOUT_SOURCES, Example, bigbench_file, catalogue_examples,
                     example_uid, user_message)

NEWS_MAX_CHARS = 2000

# The catalogues ``de`` reads: the 86 German catalogues of the Debian 12 image this project is measured on,
# before ``./test.sh`` installs chromium (which brings 8 more: gtk30, libsecret, popt, ...). Reading every
# installed catalogue made the de prompts depend on the machine's packages (the first 8 differed after that
# install); pinned, every machine with these packages draws the same prompts. A catalogue missing here is
# reported when the source is loaded (catalogue_examples), since its prompts then differ.
DE_DOMAINS = (
    'Linux-PAM', 'PackageKit', 'adduser', 'appstream', 'apt', 'at-spi2-core', 'avahi', 'bash', 'coreutils',
    'diffutils', 'dpkg-dev', 'dpkg', 'elfutils', 'findutils', 'gdk-pixbuf', 'gettext-runtime', 'gettext-tools',
    'git', 'glib20', 'gnupg2', 'gnutls30', 'gprof', 'grep', 'gsettings-desktop-schemas', 'gstreamer-1.0',
    'gtk20-properties', 'gtk20', 'initdb-15', 'iso_15924', 'iso_3166-1', 'iso_3166-2', 'iso_3166-3', 'iso_3166',
    'iso_3166_2', 'iso_4217', 'iso_639-2', 'iso_639-3', 'iso_639-5', 'iso_639', 'iso_639_3', 'iso_639_5', 'ld',
    'libapt-pkg6.0', 'libc', 'libidn2', 'libpq5-15', 'make', 'man-db-gnulib', 'man-db', 'mit-krb5', 'net-tools',
    'opcodes', 'pg_amcheck-15', 'pg_archivecleanup-15', 'pg_basebackup-15', 'pg_checksums-15', 'pg_config-15',
    'pg_controldata-15', 'pg_ctl-15', 'pg_dump-15', 'pg_resetwal-15', 'pg_rewind-15', 'pg_test_fsync-15',
    'pg_test_timing-15', 'pg_upgrade-15', 'pg_verifybackup-15', 'pg_waldump-15', 'pgscripts-15', 'plpgsql-15',
    'polkit-1', 'postgres-15', 'procps-ng', 'psmisc', 'psql-15', 'python-apt', 'sed', 'shadow', 'shared-mime-info',
    'software-properties', 'systemd', 'tar', 'wget-gnulib', 'wget', 'xdg-user-dirs', 'xkeyboard-config', 'xz',
)

# The 24 prompts of the project's first loop measure (research/side_by_side.py shows the first 8 in full) ...
EVERYDAY_PROMPTS = (
    "Explain why the sky is blue.",
    "Give me three tips for sleeping better.",
    "What is the capital of France, and what is it famous for?",
    "Write a short email asking my landlord to fix the heating.",
    "How do I boil an egg?",
    "What is the difference between a virus and a bacterium?",
    "Suggest a name for a small coffee shop.",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "How can I save money on groceries?",
    "Why do cats purr?",
    "Write a haiku about autumn.",
    "What should I pack for a weekend hiking trip?",
    "Explain what a computer virus is to a child.",
    "How do plants make their food?",
    "Give me a simple recipe for pancakes.",
    "What are the benefits of regular exercise?",
    "How do I write a good cover letter?",
    "Why is the ocean salty?",
    "Describe a typical day of a nurse.",
    "What is the difference between weather and climate?",
    "How do I start learning to play the guitar?",
    "Tell me a fun fact about octopuses.",
    "What causes earthquakes?",
    "How can I be more productive when working from home?",
    # ... and 16 more of the same kind
    "How do I get a coffee stain out of a white shirt?",
    "Give me some advice for my first day at a new job.",
    "Explain how a rainbow forms.",
    "Write a short poem about the sea.",
    "What is a good way to learn a new language as an adult?",
    "Why do leaves change color in the fall?",
    "How can I keep my houseplants healthy?",
    "Write a birthday message for my grandmother.",
    "What should I do when I can't fall asleep?",
    "Explain what inflation is in simple terms.",
    "How do I fix a flat tire on a bicycle?",
    "Tell me a short story about a lost dog who finds its way home.",
    "What are some healthy snacks for children?",
    "How does a refrigerator keep food cold?",
    "Give me tips for a job interview.",
    "Why do we need to drink water every day?",
)

# Programming requests, the kind a user of a coder model types (session 16; no reference: measured on what the
# model generates). Written for this source only. Nearest sources of the project: the docs task summarises
# Python docstrings; the linux calibration source asks what commands do (git, tar, curl man pages), so no prompt
# here asks about a command-line tool; the chat source has "programming" among its topics; bigbench has code tasks.
CODING_PROMPTS = (
    "Write a Python function that checks whether a string is a palindrome.",
    "How do I reverse a list in Python?",
    "Write a SQL query that returns the ten most recent orders from a table called orders.",
    "Explain the difference between a list and a tuple in Python.",
    "Write a Python list comprehension that squares the even numbers of a list.",
    "What is the difference between a shallow copy and a deep copy in Python?",
    "Write a JavaScript function that removes duplicates from an array.",
    "How do I read a CSV file with pandas and print its first five rows?",
    "Explain what a race condition is, with a short example.",
    "Write a Python class for a stack with push, pop and peek methods.",
    "What is the time complexity of binary search, and why?",
    "How can I measure how long a piece of Python code takes to run?",
    "Write a regular expression that matches an email address, and explain it.",
    "What is the difference between `==` and `is` in Python?",
    "Write a C function that returns the length of a string without using strlen.",
    "How do I make an HTTP GET request in Python?",
    "Explain recursion using the factorial function as an example.",
    "Write a Python script that renames every .jpeg file in a folder to .jpg.",
    "What is a closure in JavaScript?",
    "Write a Python function that flattens a nested list.",
    "Write a function in Go that sums the numbers in a slice.",
    "What is the difference between a process and a thread?",
    "Write a Python generator that yields the Fibonacci numbers.",
    "How do I sort a dictionary by its values in Python?",
    "Explain what Big O notation means to a beginner.",
    "Write a Dockerfile for a small Flask application.",
    "Why does my Python code raise 'IndexError: list index out of range'?",
    "Write a unit test with pytest for a function add(a, b).",
    "What is the difference between an inner join and a left join in SQL?",
    "Write a Rust function that returns the largest number in a vector.",
    "How do I create a virtual environment in Python?",
    "Write a Python function that merges two sorted lists into one sorted list.",
    "What is a REST API?",
    "Write a Python function that validates a date string in the format YYYY-MM-DD.",
    "Explain the difference between TCP and UDP.",
    "How do I handle exceptions in Java?",
    "Write a Python decorator that prints how long a function took.",
    "What does the `async` keyword do in Python?",
    "Write a function that checks whether a number is prime, in any language you like.",
    "How do I convert a string to an integer in JavaScript?",
)


def _cut(text: str, n: int = NEWS_MAX_CHARS) -> str:
    """``text`` cut to at most ``n`` characters: at the last line break (a sentence in these articles)
    when that keeps more than half, else at the last space."""
    if len(text) <= n:
        return text
    cut = text.rfind("\n", 0, n)
    if cut <= n // 2:
        cut = text.rfind(" ", 0, n)
    return text[:cut if cut > 0 else n].rstrip()


def _bigbench_pairs(source: str) -> list[tuple[str, str, str]]:
    """(input, target, id) of the examples of a BIG-bench held-out source that have both."""
    member = BIGBENCH_HELDOUT_MEMBERS[source]
    out = []
    for ex in json.loads(bigbench_file(member).read_text())["examples"]:
        inp, target = ex.get("input", "").strip(), str(ex.get("target") or "").strip()
        if inp and target:
            out.append((inp, target, example_uid(member, inp)))
    return out


def _news() -> list[Example]:
    return [Example("news", user_message(f"Summarize this news article in one sentence:\n{_cut(article)}"), summary,
                    uid) for article, summary, uid in _bigbench_pairs("news")]


def _yesno() -> list[Example]:
    return [Example("yesno", user_message(f"Answer yes or no, and say why:\n{question}"), answer, uid)
            for question, answer, uid in _bigbench_pairs("yesno")]


def _prompts_only(source: str, prompts: tuple[str, ...]) -> list[Example]:
    return [Example(source, user_message(p), "", example_uid(source, p)) for p in prompts]


def parse_heldout(spec: str | list[str]) -> list[str]:
    """Held-out source names from "news,de" or a list (empty: none); unknown names raise ValueError."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    for s in names:
        if s not in HELDOUT_SOURCES:
            raise ValueError(f"unknown held-out source {s!r}; expected some of {', '.join(HELDOUT_SOURCES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"held-out sources repeat a name: {','.join(names)}")
    return names


def load_heldout(source: str, n: int | None = None) -> list[Example]:
    """The examples of one held-out source, in a fixed order (sorted by id, shuffled with seed 0);
    the first ``n`` when given. Evaluation only: no training code path calls this."""
    parse_heldout([source])
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"n must be a positive integer or None; got {n!r}")
    if source == "news":
        ex = _news()
    elif source == "yesno":
        ex = _yesno()
    elif source == "de":
        ex = catalogue_examples("de", "German", "de", domains=DE_DOMAINS)
    elif source == "coding":
        ex = _prompts_only("coding", CODING_PROMPTS)
    else:
        ex = _prompts_only("everyday", EVERYDAY_PROMPTS)
    if not ex:
        raise ValueError(f"no data found for held-out source {source!r}")
    ex.sort(key=lambda e: e.uid)
    random.Random(0).shuffle(ex)
    return ex[:n]


__all__ = ["CODING_PROMPTS", "DE_DOMAINS", "HELDOUT_SOURCES", "EVERYDAY_PROMPTS", "load_heldout", "parse_heldout"]
