"""What the dataset modules share: the example record, the names reserved for evaluation, the data cache,
the BIG-bench sdist (fetched once, sha256-checked) and its members, the Debian gettext catalogues, and the
standard-library docstrings (the ``docs`` task, and the calibration text of ``first_gguf.ranking``)."""
from __future__ import annotations

import gettext
import hashlib
import importlib
import inspect
import json
import os
import re
import sys
import tarfile
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

# Held-out-by-source prompt sets (first_gguf/datasets/heldout.py), decided before any training that measures on them:
# news (BIG-bench gem/xsum), de (German catalogues), yesno (BIG-bench strategyqa), everyday (chat prompts),
# coding (programming requests).
HELDOUT_SOURCES = ("news", "de", "yesno", "everyday", "coding")
RESERVED = ("xsum", "strategyqa")    # reserved wherever they occur in a task name
RESERVED_WORDS = HELDOUT_SOURCES     # reserved as a whole word of a task name ("de": German)

BIGBENCH_VERSION = "1.0.0"
BIGBENCH_SDIST = "bigbench-1.0.0.tar.gz"
BIGBENCH_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
BIGBENCH_MEMBERS = {
    "summarization": ["bigbench/benchmark_tasks/gem/wikilingua_en/task.json"],
    "qa": [f"bigbench/benchmark_tasks/natural_instructions/{t}/task.json" for t in (
        "subtask024_cosmosqa_answer_generation", "subtask061_ropes_answer_generation",
        "subtask058_multirc_question_answering")],
    "mc": ["bigbench/benchmark_tasks/social_iqa/task.json"],
}
# extracted in the same pass, read only by first_gguf.datasets.heldout (never by load_task)
BIGBENCH_HELDOUT_MEMBERS = {
    "news": "bigbench/benchmark_tasks/gem/xsum/task.json",
    "yesno": "bigbench/benchmark_tasks/strategyqa/task.json",
}


@dataclass(frozen=True)
class Example:
    task: str
    messages: tuple  # ({"role": "user", "content": ...},)
    target: str
    uid: str


def is_reserved(task: str) -> bool:
    """Whether ``task`` names data kept for external evaluation (never trained or tuned on).

    ``xsum`` / ``strategyqa`` anywhere in the name; the held-out source names (``de``: German,
    ``news``, ``yesno``, ``everyday``, ``coding``) only as a whole word ("de", "translation-de", "en_de"), so
    names like "self-student" or "decode" are not caught."""
    t = task.lower()
    return any(r in t for r in RESERVED) or any(w in RESERVED_WORDS for w in re.split(r"[^a-z0-9]+", t))


def data_cache_dir() -> Path:
    """The data folder of first-gguf's cache (fetched task data, prompt lists)."""
    from ..models import cache_dir

    return cache_dir() / "data"


def example_uid(*parts: str) -> str:
    """A short stable id of an example from the parts that identify it."""
    return hashlib.sha1("\x1f".join(parts).encode()).hexdigest()[:12]


def user_message(text: str) -> tuple:
    """The messages of a one-turn user prompt."""
    return ({"role": "user", "content": text},)


LOCALE_DIR = Path("/usr/share/locale")  # the Debian gettext catalogues the translation data comes from


def catalogue_examples(lang: str, name: str, task: str, *, max_chars: int = 160,
                       domains: tuple[str, ...] | None = None) -> list[Example]:
    """English -> ``name`` software messages from the Debian gettext catalogues of ``lang``
    (``/usr/share/locale/<lang>/LC_MESSAGES/*.mo``), one example per distinct English message.
    ``domains``: read only the catalogues of these names (``gtk30`` for ``gtk30.mo``), so that installing
    another package does not change the set; None reads every installed catalogue. A named catalogue that is not
    installed is reported (a warning naming it), since the set then differs from other machines'. One that is
    installed but unreadable is skipped silently, as every catalogue is: that is the same on every machine with
    the package (the de pin's ``net-tools.mo`` has Latin-1 bytes that Python's gettext rejects)."""
    d = LOCALE_DIR / lang / "LC_MESSAGES"
    out, seen = [], set()
    for mo in sorted(d.glob("*.mo")) if d.is_dir() else []:
        if domains is not None and mo.stem not in domains:
            continue
        try:
            with open(mo, "rb") as f:
                cat = gettext.GNUTranslations(f)._catalog
        except Exception:  # a damaged catalogue is skipped, not fatal
            continue
        for src, dst in cat.items():
            if not isinstance(src, str) or not src or not dst or src in seen:
                continue
            if not (15 <= len(src) <= max_chars) or "\n" in src or "%" in src or not src.isascii():
                continue
            if not any(c.isalpha() for c in src) or src.upper() == src:
                continue
            seen.add(src)
            out.append(Example(task, user_message(f"Translate to {name}:\n{src}"), dst, example_uid(lang, src)))
    missing = [x for x in domains or () if not (d / f"{x}.mo").is_file()]
    if missing:
        warnings.warn(f"{task!r}: {len(missing)} of its {len(domains)} pinned catalogues are not installed "
                      f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''} under {d}), so its prompts "
                      "differ from other machines'; rows compare only with rows on the same prompt ids", stacklevel=3)
    return out


class DataUnavailableError(ValueError):
    """Task data that cannot be fetched (e.g. a file gone from the package index): names the file, what
    reads it and how to supply it. A ValueError, so every command reports it as one line."""


# the names that read the BIG-bench sdist, for the message when it cannot be had
_BIGBENCH_READERS = ("tasks summarization, qa and mc; held-out sources news and yesno; "
                     "the bigbench prompt source (fit --sources, train --onpolicy-data broad, rank)")
BIGBENCH_ENV = "FIRST_GGUF_BIGBENCH_SDIST"  # a local copy of the sdist, used instead of the download


def _bigbench_unavailable(why: str) -> DataUnavailableError:
    return DataUnavailableError(
        f"{BIGBENCH_SDIST} {why}. It is read by the {_BIGBENCH_READERS}. Set {BIGBENCH_ENV} to a local copy "
        f"(sha256 {BIGBENCH_SHA256}), or use what needs no download: tasks translation and docs, held-out "
        f"sources de, everyday and coding, prompt sources chat and linux")


def _copy_verified(src: Path, dest: Path, sha256: str) -> Path:
    """Copy a user-supplied file into the cache after checking its sha256 (atomically: no half-written copy)."""
    import shutil

    from ..convert.gguf_edit import atomic_output
    from ..models import sha256_file

    if not src.is_file():
        raise DataUnavailableError(f"{BIGBENCH_ENV}={src}: no such file; expected {dest.name}")
    got = sha256_file(src)
    if got != sha256:
        raise DataUnavailableError(f"{BIGBENCH_ENV}={src} has sha256 {got}; expected {sha256} ({dest.name})")
    with atomic_output(dest) as tmp:
        shutil.copyfile(src, tmp)
    return dest


def _download_sdist(name: str, filename: str, sha256: str, dest_dir: Path) -> Path:
    """Fetch one sdist file from the package index pip uses, checking its sha256.

    ``pip download`` cannot be used for bigbench 1.0.0: pip rejects the sdist's
    metadata (a direct-URL dependency) even with --no-deps, before saving it.
    Raises DataUnavailableError when the index does not list the file or cannot be reached.
    """
    import urllib.error
    import urllib.request

    from pip._internal.models.index import PyPI  # the index pip itself is configured with by default

    dest = dest_dir / filename
    if dest.exists():
        return dest
    index = PyPI.simple_url.rstrip("/") + f"/{name}/"
    req = urllib.request.Request(index, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            files = json.load(r)["files"]
    except (urllib.error.URLError, OSError, ValueError, KeyError) as e:
        raise _bigbench_unavailable(f"could not be listed from the package index ({index}: {e})") from None
    entry = next((f for f in files if f["filename"] == filename), None)
    if entry is None:
        raise _bigbench_unavailable("is not on the package index (only "
                                    f"{', '.join(f['filename'] for f in files) or 'nothing'} is)")
    print(f"[first-gguf] downloading {filename} ({entry.get('size', 0) / 1e6:.0f} MB, once)", file=sys.stderr)
    h = hashlib.sha256()
    with tempfile.NamedTemporaryFile(dir=dest_dir, suffix=".part", delete=False) as tmp:
        try:
            with urllib.request.urlopen(entry["url"], timeout=600) as r:
                while chunk := r.read(1 << 20):
                    h.update(chunk)
                    tmp.write(chunk)
            tmp.close()
            if h.hexdigest() != sha256:
                raise DataUnavailableError(f"{filename} from {entry['url']} has sha256 {h.hexdigest()}; "
                                           f"expected {sha256}; nothing was kept")
            os.replace(tmp.name, dest)
        finally:
            if os.path.exists(tmp.name):
                os.unlink(tmp.name)
    return dest


def bigbench_sdist() -> Path:
    """The verified bigbench sdist in the data cache: copied once from ``$FIRST_GGUF_BIGBENCH_SDIST`` when
    that is set, else downloaded once. Raises DataUnavailableError when neither can be had."""
    sdist_dir = data_cache_dir() / "sdist"
    sdist_dir.mkdir(parents=True, exist_ok=True)
    dest = sdist_dir / BIGBENCH_SDIST
    if dest.exists():
        return dest
    local = os.environ.get(BIGBENCH_ENV)
    if local:
        return _copy_verified(Path(local).expanduser(), dest, BIGBENCH_SHA256)
    return _download_sdist("bigbench", BIGBENCH_SDIST, BIGBENCH_SHA256, sdist_dir)


def bigbench_file(member: str) -> Path:
    """Extract one member of the bigbench sdist into the cache (downloading the sdist once)."""
    dest = data_cache_dir() / "bigbench" / member
    if dest.exists():
        return dest
    sdist = bigbench_sdist()
    wanted = {m for ms in BIGBENCH_MEMBERS.values() for m in ms} | set(BIGBENCH_HELDOUT_MEMBERS.values())
    with tarfile.open(sdist) as tar:
        for ti in tar:
            rel = ti.name.split("/", 1)[1] if "/" in ti.name else ti.name
            if rel in wanted and ti.isfile():
                target = data_cache_dir() / "bigbench" / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                data = tar.extractfile(ti).read()
                # a unique temporary name: processes extracting at the same time never share one
                with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".part", delete=False) as tmp:
                    tmp.write(data)
                os.replace(tmp.name, target)
    if not dest.exists():
        raise RuntimeError(f"{member} not found in {sdist}")
    return dest


# the standard-library modules whose docstrings are the docs task's text and first_gguf.ranking's calibration text
DOC_MODULES = ["json", "os", "pathlib", "collections", "itertools", "functools", "re", "string", "textwrap",
               "datetime", "statistics", "random", "math", "shutil", "subprocess", "argparse", "logging",
               "csv", "heapq", "bisect", "tempfile", "zipfile", "tarfile", "inspect", "typing", "dataclasses"]


def documented_objects(modules, *, methods: bool = False):
    """(qualified name, object) for the public functions, classes and builtins of ``modules``; with
    ``methods`` also each class's public callables, right after the class. Modules that do not import
    are skipped."""
    import warnings

    for modname in modules:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod = importlib.import_module(modname)
        except ImportError:
            continue
        for name in sorted(dir(mod)):
            if name.startswith("_"):
                continue
            obj = getattr(mod, name, None)
            if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
                continue
            yield f"{modname}.{name}", obj
            if methods and inspect.isclass(obj):
                for m, v in sorted(vars(obj).items()):
                    if not m.startswith("_") and callable(v):
                        yield f"{modname}.{name}.{m}", v


def docstrings(min_chars: int = 500) -> list[tuple[str, str]]:
    """(qualified name, docstring on one line) of DOC_MODULES' public objects, ASCII, at least ``min_chars``."""
    out = []
    for qual, obj in documented_objects(DOC_MODULES):
        doc = inspect.getdoc(obj) or ""
        if len(doc) >= min_chars and doc.isascii():
            out.append((qual, " ".join(doc.split())))
    return out
