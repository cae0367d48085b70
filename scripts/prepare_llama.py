#!/usr/bin/env python3
"""Fetch, verify and patch the pinned llama.cpp for first-gguf's build.

Standard library only. CMakeLists.txt runs it when the package build (scikit-build-core,
``pip install .`` / ``pip wheel .``) configures; scripts/build_stock_reference.sh uses
``--sdist-only``.

1. Find the llama-cpp-python 0.3.36 sdist (it vendors llama.cpp 0c1e57098 and holds the
   Python bindings): ``$FIRST_GGUF_LLAMA_SDIST`` if set (an offline build), else the cache,
   else ``pip download``; its sha256 must match the pin.
2. Extract it under ``WORK/sdist``.
3. Copy its llama.cpp into a staging tree, apply ``patches/*.patch`` and sync the result
   into ``WORK/llama.cpp``, rewriting only files whose content changed, so a rebuild after
   a change in ``patches/`` or ``cpp/`` is incremental.
4. Write ``WORK/paths.cmake`` (the two trees and the patch digest) for CMakeLists.txt.

Usage: python scripts/prepare_llama.py --work DIR | --sdist-only
Prints the sdist path on its last line with --sdist-only.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV_SDIST = "FIRST_GGUF_LLAMA_SDIST"

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
LLAMA_CPP_PYTHON_SDIST = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
LLAMA_CPP_PYTHON_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"

# parts of the vendored tree the build does not need (about 110 MB)
SKIP_DIRS = {"models", "docs", "media", ".git"}


def log(msg: str) -> None:
    print(f"[prepare_llama] {msg}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    base = os.environ.get("FIRST_GGUF_CACHE")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "first-gguf"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_sha256(path: Path, what: str) -> None:
    digest = sha256(path)
    if digest != LLAMA_CPP_PYTHON_SHA256:
        raise SystemExit(f"error: {what} has sha256 {digest}; expected {LLAMA_CPP_PYTHON_SHA256} "
                         f"({LLAMA_CPP_PYTHON_SDIST})")


def fetch_sdist() -> Path:
    env = os.environ.get(ENV_SDIST)
    if env:
        given = Path(env)
        if not given.is_file():
            raise SystemExit(f"error: {ENV_SDIST}={env}: no such file; expected {LLAMA_CPP_PYTHON_SDIST}")
        check_sha256(given, f"{ENV_SDIST}={env}")
        return given
    dest = cache_dir() / "sdist" / LLAMA_CPP_PYTHON_SDIST
    if dest.exists() and sha256(dest) == LLAMA_CPP_PYTHON_SHA256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        log(f"downloading llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} sdist")
        res = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             "--quiet", f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", tmp],
        )
        if res.returncode != 0:
            raise SystemExit(f"error: pip download of llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} failed "
                             f"(exit {res.returncode}); offline, set {ENV_SDIST} to a copy of {LLAMA_CPP_PYTHON_SDIST}")
        got = Path(tmp) / LLAMA_CPP_PYTHON_SDIST
        if not got.exists():
            raise SystemExit(f"error: pip did not produce {LLAMA_CPP_PYTHON_SDIST} in {tmp}")
        check_sha256(got, f"the downloaded {LLAMA_CPP_PYTHON_SDIST}")
        os.replace(got, dest)
    return dest


def extract_sdist(sdist: Path, work: Path) -> Path:
    root = work / "sdist" / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"
    stamp = root / ".first-gguf-sha256"
    if stamp.exists() and stamp.read_text().strip() == LLAMA_CPP_PYTHON_SHA256:
        return root
    log(f"extracting {sdist.name}")
    if root.exists():
        shutil.rmtree(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        os.replace(Path(tmp) / root.name, root)
    stamp.write_text(LLAMA_CPP_PYTHON_SHA256 + "\n")
    return root


def patch_files() -> list[Path]:
    return sorted((ROOT / "patches").glob("*.patch"))


def stage_patched(vendored: Path, work: Path) -> tuple[Path, str]:
    stage = work / "stage-llama.cpp"
    if stage.exists():
        shutil.rmtree(stage)
    shutil.copytree(vendored, stage, ignore=lambda d, names: [n for n in names if d == str(vendored) and n in SKIP_DIRS])
    h = hashlib.sha256()
    for p in patch_files():
        log(f"applying {p.relative_to(ROOT)}")
        res = subprocess.run(["patch", "-p1", "--forward", "--batch", "--no-backup-if-mismatch", "-i", str(p)],
                             cwd=stage, capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"error: {p.name} does not apply to llama.cpp from llama-cpp-python "
                             f"{LLAMA_CPP_PYTHON_VERSION}:\n{res.stdout}{res.stderr}")
        h.update(p.read_bytes())
    (stage / ".first-gguf-patched").write_text(h.hexdigest() + "\n")
    return stage, h.hexdigest()


def sync_tree(src: Path, dst: Path) -> int:
    """Make dst equal to src, touching only files whose bytes differ."""
    changed = 0
    seen = set()
    for dirpath, _, files in os.walk(src):
        rel_dir = Path(dirpath).relative_to(src)
        (dst / rel_dir).mkdir(parents=True, exist_ok=True)
        for name in files:
            rel = rel_dir / name
            seen.add(rel)
            s, d = src / rel, dst / rel
            data = s.read_bytes()
            if d.exists() and d.read_bytes() == data:
                continue
            d.write_bytes(data)
            shutil.copymode(s, d)
            changed += 1
    for dirpath, _, files in os.walk(dst):
        for name in files:
            rel = Path(dirpath).relative_to(dst) / name
            if rel not in seen:
                (dst / rel).unlink()
                changed += 1
    return changed


def cmake_path(p: Path) -> str:
    return str(p.resolve()).replace("\\", "/")


def prepare(work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    root = extract_sdist(fetch_sdist(), work)
    stage, digest = stage_patched(root / "vendor" / "llama.cpp", work)
    llama_dir = work / "llama.cpp"
    n = sync_tree(stage, llama_dir)
    shutil.rmtree(stage)
    log(f"patched llama.cpp in {llama_dir} ({n} files updated)")
    paths = (f'set(FIRST_LLAMA_DIR "{cmake_path(llama_dir)}")\n'
             f'set(FIRST_BINDINGS_DIR "{cmake_path(root)}")\n'
             f'set(FIRST_LLAMA_CPP_PYTHON_VERSION "{LLAMA_CPP_PYTHON_VERSION}")\n'
             f'set(FIRST_PATCHES_SHA256 "{digest}")\n')
    out = work / "paths.cmake"
    if not out.exists() or out.read_text() != paths:
        out.write_text(paths)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--work", type=Path, help="folder for the extracted sdist and the patched llama.cpp tree")
    g.add_argument("--sdist-only", action="store_true", help="fetch and verify the sdist, print its path")
    args = ap.parse_args()
    if args.sdist_only:
        print(fetch_sdist())
        return
    prepare(args.work)


if __name__ == "__main__":
    main()
