#!/usr/bin/env python3
"""Fetch, verify, patch and compile the pinned llama.cpp for first-gguf.

Standard library only: this runs before anything else is installed.

1. ``pip download`` the llama-cpp-python 0.3.36 sdist (it vendors llama.cpp
   0c1e57098) into the cache and check its sha256.
2. Extract it under ``build/sdist``.
3. Copy its llama.cpp into a staging tree, apply ``patches/*.patch`` and sync
   the result into ``build/llama.cpp``, rewriting only files whose content
   changed, so a rebuild after a change in ``patches/`` or ``cpp/`` is
   incremental.
4. Configure and build the top-level CMakeLists.txt into ``build/native``:
   ``build/native/lib`` then holds libllama (patched, with cpp/ inside) and
   libggml*, the only copies first_gguf loads.

Usage: python scripts/build_llama.py [--jobs N] [--sdist-only]
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
BUILD = ROOT / "build"

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
LLAMA_CPP_PYTHON_SDIST = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
LLAMA_CPP_PYTHON_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"

# parts of the vendored tree the build does not need (about 110 MB)
SKIP_DIRS = {"models", "docs", "media", ".git"}


def log(msg: str) -> None:
    print(f"[build_llama] {msg}", flush=True)


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


def fetch_sdist() -> Path:
    dest = cache_dir() / "sdist" / LLAMA_CPP_PYTHON_SDIST
    if dest.exists() and sha256(dest) == LLAMA_CPP_PYTHON_SHA256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        log(f"downloading llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} sdist")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             "--quiet", f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", tmp],
            check=True,
        )
        got = Path(tmp) / LLAMA_CPP_PYTHON_SDIST
        if not got.exists():
            raise SystemExit(f"error: pip did not produce {LLAMA_CPP_PYTHON_SDIST} in {tmp}")
        digest = sha256(got)
        if digest != LLAMA_CPP_PYTHON_SHA256:
            raise SystemExit(f"error: {LLAMA_CPP_PYTHON_SDIST} has sha256 {digest}; "
                             f"expected {LLAMA_CPP_PYTHON_SHA256}")
        os.replace(got, dest)
    return dest


def extract_sdist(sdist: Path) -> Path:
    root = BUILD / "sdist" / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"
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


def stage_patched(vendored: Path) -> Path:
    stage = BUILD / "stage-llama.cpp"
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
    return stage


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


def build_native(llama_dir: Path, jobs: int) -> Path:
    out = BUILD / "native"
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    if not (out / "CMakeCache.txt").exists():
        log("configuring (cmake)")
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(out), *gen,
                        f"-DFIRST_LLAMA_DIR={llama_dir}", "-DCMAKE_BUILD_TYPE=Release"], check=True)
    log(f"compiling libllama + libggml with {jobs} jobs (first time: several minutes)")
    subprocess.run(["cmake", "--build", str(out), "--target", "llama", "-j", str(jobs)], check=True)
    lib = out / "lib"
    if not (lib / "libllama.so").exists() and not (lib / "libllama.dylib").exists():
        raise SystemExit(f"error: build finished but no libllama in {lib}")
    return lib


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--sdist-only", action="store_true", help="fetch and verify the sdist, print its path")
    args = ap.parse_args()

    sdist = fetch_sdist()
    if args.sdist_only:
        print(sdist)
        return
    root = extract_sdist(sdist)
    stage = stage_patched(root / "vendor" / "llama.cpp")
    n = sync_tree(stage, BUILD / "llama.cpp")
    shutil.rmtree(stage)
    log(f"patched tree in build/llama.cpp ({n} files updated)")
    lib = build_native(BUILD / "llama.cpp", args.jobs)
    log(f"libraries in {lib}")


if __name__ == "__main__":
    main()
