"""The package as users install it.

``pip wheel . -w DIR`` gives one wheel for this platform (plus its dependencies' wheels); installed
offline (``--no-index``) into a fresh virtual environment it runs from any directory, whichever of
``llama_cpp`` and ``first_gguf`` is imported first, with one copy of llama.cpp in the process, and
generates what the development install generates.

The wheel is built from this checkout with pip's build isolation (scikit-build-core), reusing the
persistent build directory ``build/<wheel tag>`` that ./setup.sh compiled, so only the install
step and the packaging run again.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Imports llama_cpp *before* first_gguf on purpose, generates with the default model and reports
# which llama.cpp libraries the process mapped.
PROBE = r"""
import json, sys
import llama_cpp
import first_gguf
m = first_gguf.load(n_threads=1)
g = m.generate("Hi", 0.2, max_tokens=8)
libs = sorted({line.split()[-1] for line in open("/proc/self/maps")
               if "/libllama" in line or "/libggml" in line})
print(json.dumps({"tokens": g.tokens, "skipped": g.skipped_layers, "text": g.text, "libs": libs,
                  "first_gguf": first_gguf.__file__, "llama_cpp": llama_cpp.__file__,
                  "routers_path": str(m.routers_path)}))
"""


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "LLAMA_CPP_LIB_PATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _run(cmd, cwd, timeout=1800) -> subprocess.CompletedProcess:
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, env=_env(), capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, f"{cmd} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def _probe(python, cwd) -> dict:
    out = _run([python, "-c", PROBE], cwd=cwd, timeout=600).stdout
    return json.loads(out.strip().splitlines()[-1])


def _platform_tag() -> str:
    return sysconfig.get_platform().replace("-", "_").replace(".", "_")


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheelhouse")
    _run([sys.executable, "-m", "pip", "wheel", ROOT, "-w", out, "--quiet"], cwd=ROOT)
    return out


@pytest.fixture(scope="module")
def our_wheel(wheelhouse) -> Path:
    wheels = sorted(wheelhouse.glob("first_gguf-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory, wheelhouse) -> Path:
    venv = tmp_path_factory.mktemp("venv") / "env"
    _run([sys.executable, "-m", "venv", venv], cwd=venv.parent)
    py = venv / "bin" / "python"
    # offline: everything comes from the wheelhouse
    _run([py, "-m", "pip", "install", "--quiet", "--no-index", "--find-links", wheelhouse, "first-gguf"],
         cwd=venv.parent)
    return venv


def test_one_platform_wheel_with_the_patched_library(our_wheel):
    assert our_wheel.name.endswith(f"-py3-none-{_platform_tag()}.whl"), our_wheel.name
    with zipfile.ZipFile(our_wheel) as z:
        infos = {i.filename: i for i in z.infolist()}
        names = set(infos)
        for need in ["llama_cpp/__init__.py", "llama_cpp/llama_cpp.py", "llama_cpp/llama.py",
                     "llama_cpp/lib/libllama.so", "llama_cpp/lib/libggml.so", "llama_cpp/lib/libggml-base.so",
                     "llama_cpp/lib/libggml-cpu.so", "llama_cpp/lib/LICENSE.llama.cpp",
                     "first_gguf/__init__.py", "first_gguf/_lib.py", "first_gguf/convert/hf.py",
                     "first_gguf/train/__init__.py", "first_gguf/train/__main__.py", "first_gguf/train/loop.py",
                     "first_gguf/datasets/__init__.py", "first_gguf/datasets/common.py", "first_gguf/datasets/tasks.py",
                     "first_gguf/assets/smollm2-135m-instruct.routers.safetensors", "first_gguf/web/index.html",
                     "first_gguf_native/__init__.py", "first_gguf_native/llama.cpp/convert_hf_to_gguf.py",
                     "first_gguf_native/llama.cpp/conversion/__init__.py",
                     "first_gguf_native/llama.cpp/gguf-py/gguf/__init__.py"]:
            assert need in names, f"{need} missing from {our_wheel.name}"
        # llama.cpp's own install rules (lib/, include/, bin/, cmake files) stay out of site-packages
        dist_info = "-".join(our_wheel.name.split("-")[:2]) + ".dist-info"
        top = {n.split("/", 1)[0] for n in names}
        assert top == {"first_gguf", "first_gguf_native", "llama_cpp", dist_info}, top
        assert not any("__pycache__" in n for n in names)
        # one real file per library (a symlink would be stored as a tiny file holding the target's name)
        libllama = z.read("llama_cpp/lib/libllama.so")
        assert libllama[:4] == b"\x7fELF" and infos["llama_cpp/lib/libllama.so"].file_size > 1_000_000
        assert b"first_model_attach_sidecar" in libllama and b"first_set_skip_mask" in libllama
        meta = z.read(f"{dist_info}/METADATA").decode()
        assert "Requires-Dist: llama-cpp-python" not in meta  # the bindings come inside this wheel


def test_fresh_venv_any_directory_any_import_order(fresh_venv, tmp_path):
    """The issue's check: pip install into a new environment, then load + generate from elsewhere,
    here with llama_cpp imported first; equal to the development install's output."""
    site = Path(_run([fresh_venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=tmp_path).stdout.strip())
    got = _probe(fresh_venv / "bin" / "python", cwd=tmp_path)
    assert Path(got["first_gguf"]).is_relative_to(site) and Path(got["llama_cpp"]).is_relative_to(site), got
    names = sorted(Path(p).name for p in got["libs"])
    assert names == ["libggml-base.so", "libggml-cpu.so", "libggml.so", "libllama.so"], got["libs"]
    assert all(Path(p).parent == site / "llama_cpp" / "lib" for p in got["libs"]), got["libs"]
    assert got["routers_path"] != "None" and got["skipped"], got
    dev = _probe(sys.executable, cwd=tmp_path)
    assert (got["tokens"], got["skipped"]) == (dev["tokens"], dev["skipped"])


def test_dev_install_any_import_order(tmp_path):
    """The development install (./setup.sh, editable) also loads one llama.cpp with llama_cpp first."""
    got = _probe(sys.executable, cwd=tmp_path)
    names = sorted(Path(p).name for p in got["libs"])
    assert names == ["libggml-base.so", "libggml-cpu.so", "libggml.so", "libllama.so"], got["libs"]
    assert len({Path(p).parent for p in got["libs"]}) == 1


def test_cli_entry_point_in_fresh_venv(fresh_venv, tmp_path):
    res = _run([fresh_venv / "bin" / "first-gguf", "--help"], cwd=tmp_path)
    assert "generate" in res.stdout and "convert" in res.stdout
    # the converter's upstream script is found inside the installed package
    res = _run([fresh_venv / "bin" / "python", "-c",
                "from first_gguf.convert.hf import llama_source_dir; print(llama_source_dir())"], cwd=tmp_path)
    assert Path(res.stdout.strip(), "convert_hf_to_gguf.py").is_file()


def test_prepare_refuses_a_wrong_sdist(tmp_path):
    bogus = tmp_path / "llama_cpp_python-0.3.36.tar.gz"
    bogus.write_bytes(b"not the sdist")
    for given, says in [(bogus, "has sha256"), (tmp_path / "missing.tar.gz", "no such file")]:
        env = _env() | {"FIRST_GGUF_LLAMA_SDIST": str(given)}
        res = subprocess.run([sys.executable, ROOT / "scripts" / "prepare_llama.py", "--work", tmp_path / "work"],
                             env=env, capture_output=True, text=True, timeout=60)
        assert res.returncode != 0 and str(given) in res.stderr and says in res.stderr, res.stderr
        assert not (tmp_path / "work" / "paths.cmake").exists()


def test_a_stock_libllama_is_refused_with_the_reason(tmp_path):
    """llama_cpp pointed at stock llama-cpp-python's library (no first_* symbols): import first_gguf
    stops with one error naming the library and the override, instead of failing later."""
    from conftest import STOCK_PYTHON

    if not STOCK_PYTHON.exists():
        pytest.skip("stock reference not built (./test.sh builds it)")
    stock_lib = Path(_run([STOCK_PYTHON, "-c", "import llama_cpp, os; print(os.path.dirname(llama_cpp.__file__))"],
                          cwd=tmp_path).stdout.strip()) / "lib"
    env = _env() | {"LLAMA_CPP_LIB_PATH": str(stock_lib)}
    res = subprocess.run([sys.executable, "-c", "import first_gguf"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: first_gguf:") and str(stock_lib.resolve()) in last and "LLAMA_CPP_LIB_PATH" in last, last
