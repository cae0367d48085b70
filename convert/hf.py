"""convert: a Hugging Face checkpoint directory -> GGUF, with routers.

Drives the upstream ``convert_hf_to_gguf.py`` of the pinned llama.cpp source
(installed by first-gguf's build as ``first_gguf_native/llama.cpp``; it is not copied into
this repository), then attaches routers and static rankings with attach().
``lora``: a PEFT LoRA adapter directory merged into the weights first (needs
torch, transformers and peft).
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from .attach import attach, attach_data, write_sidecar
from .gguf_edit import GGUFEditError

OUTTYPES = ("f32", "f16", "bf16", "q8_0")

# Runs upstream convert_hf_to_gguf.py (argv[1], its arguments after argv[2]) with the BPE pre-tokenizer
# named argv[2] wherever upstream does not recognise the tokenizer's (get_vocab_base_pre raises
# NotImplementedError); where it does recognise it as another one, it stops, naming both.
_CONVERT_WITH_PRE = r"""
import logging, os, runpy, sys
from pathlib import Path
script, pre = sys.argv[1], sys.argv[2]
sys.argv = [script] + sys.argv[3:]
sys.path.insert(0, str(Path(script).parent))
if "NO_LOCAL_GGUF" not in os.environ:  # as the script does, before conversion imports gguf
    sys.path.insert(1, str(Path(script).parent / "gguf-py"))
from conversion import base
upstream = base.TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    logging.disable(logging.WARNING)  # upstream's banner for an unknown tokenizer; we name it
    try:
        found = upstream(self, tokenizer)
    except NotImplementedError:
        found = None
    finally:
        logging.disable(logging.NOTSET)
    if found is not None and found != pre:
        raise SystemExit(f"first-gguf: the tokenizer's pre-tokenizer is {found!r} (recognised by "
                         f"convert_hf_to_gguf.py), not {pre!r} as named")
    return pre
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
runpy.run_path(script, run_name="__main__")
"""


def _run_teeing_stderr(cmd: list[str], show: bool) -> tuple[int, str]:
    """Run cmd; its stderr (upstream's log and progress bar) goes to ours as it comes when ``show``, and is
    returned in any case, to explain a failure."""
    import codecs

    dec = codecs.getincrementaldecoder("utf-8")("replace")
    chunks: list[str] = []
    with subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as proc:
        while True:
            b = proc.stderr.read1(1 << 16)
            text = dec.decode(b, final=not b)
            chunks.append(text)
            if show and text:
                sys.stderr.write(text)
                sys.stderr.flush()
            if not b:
                break
    return proc.returncode, "".join(chunks)


def pre_tokenizer_from_gguf(path: str | os.PathLike) -> str:
    """The BPE pre-tokenizer (``tokenizer.ggml.pre``) of a reference GGUF of the same tokenizer."""
    from .gguf_edit import field_value, read_gguf

    p = Path(path)
    if not p.is_file():
        raise GGUFEditError(f"reference GGUF for the pre-tokenizer not found: {p}")
    pre = field_value(read_gguf(p), "tokenizer.ggml.pre")
    if not pre:
        raise GGUFEditError(f"{p} has no tokenizer.ggml.pre key; expected a GGUF with a BPE tokenizer "
                            f"(tokenizer.ggml.model 'gpt2') to take the pre-tokenizer from")
    return str(pre)


def _check_pre_tokenizer(pre: str) -> str:
    if not isinstance(pre, str) or not pre or not all(c.isalnum() or c in "-_." for c in pre):
        raise GGUFEditError(f"invalid pre-tokenizer name {pre!r}; expected a llama.cpp pre-tokenizer name such as "
                            f"'qwen2', 'llama3' or 'gpt2' (letters, digits, '-', '_', '.')")
    return pre


def _check_vocab_loads(path: Path, pre: str) -> None:
    """llama.cpp's own word on a named pre-tokenizer: load the converted file's vocabulary only."""
    from .._lib import llama_cpp
    from ..model import _LOG

    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    _LOG.lines.clear()
    model = llama_cpp.llama_model_load_from_file(str(path).encode("utf-8"), params)
    if not model:
        raise GGUFEditError(f"llama.cpp cannot load the vocabulary with pre-tokenizer {pre!r}: "
                            f"{_LOG.detail('unknown error')}")
    llama_cpp.llama_model_free(model)


def llama_source_dir() -> Path:
    env = os.environ.get("FIRST_GGUF_LLAMA_DIR")
    if env:
        d = Path(env)
    else:
        try:
            from first_gguf_native import LLAMA_SOURCE_DIR as d
        except ImportError:
            raise GGUFEditError("first_gguf_native (installed by first-gguf's build, with upstream "
                                "convert_hf_to_gguf.py) is missing; reinstall first-gguf (./setup.sh in a checkout) "
                                "or set FIRST_GGUF_LLAMA_DIR to the pinned llama.cpp source") from None
    if not (d / "convert_hf_to_gguf.py").exists():
        raise GGUFEditError(f"convert_hf_to_gguf.py not found in {d}; reinstall first-gguf (./setup.sh in a "
                            f"checkout) or set FIRST_GGUF_LLAMA_DIR to the pinned llama.cpp source")
    return d


def _check_hf_dir(d: Path) -> dict:
    if not d.is_dir():
        raise GGUFEditError(f"Hugging Face checkpoint directory not found: {d}")
    cfg = d / "config.json"
    if not cfg.is_file():
        raise GGUFEditError(f"{d} has no config.json; expected a Hugging Face checkpoint directory")
    if not any(d.glob("*.safetensors")) and not any(d.glob("*.bin")):
        raise GGUFEditError(f"{d} holds no weights (*.safetensors or *.bin)")
    try:
        config = json.loads(cfg.read_text())
    except ValueError as e:
        raise GGUFEditError(f"{cfg}: invalid JSON: {e}") from None
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise GGUFEditError(f"{index}: expected a JSON object with a 'weight_map' of tensor -> file: {e!r}") \
                from None
        missing = [f for f in shards if not (d / str(f)).is_file()]
        if missing:
            raise GGUFEditError(f"{index} names weight files missing from {d}: {', '.join(map(str, missing))}")
    for f in sorted(d.glob("*.safetensors")):
        check_safetensors(f)
    return config


# bytes per element of the safetensors dtypes
_SAFETENSORS_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2,
                         "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}


def check_safetensors(path: Path) -> None:
    """Raise GGUFEditError naming ``path`` unless its header parses and every tensor's bytes lie within the file.

    Layout: an 8-byte little-endian header length N, N bytes of JSON (name -> dtype, shape,
    data_offsets [begin, end) relative to the data after the header), then the data. Checked before
    the upstream converter runs, which would otherwise fail deep inside with a long traceback.
    """
    size = path.stat().st_size

    def bad(why: str) -> GGUFEditError:
        return GGUFEditError(f"corrupt or truncated safetensors file {path}: {why}")

    if size < 8:
        raise bad(f"it has {size} bytes; expected at least the 8-byte header length")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if 8 + n > size:
            raise bad(f"its header length is {n} bytes, but the file has {size} bytes")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise bad(f"its header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad(f"its header is a JSON {type(header).__name__}; expected an object")
    n_data = size - 8 - n
    for name, t in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in t["data_offsets"])
            dtype, shape = t["dtype"], [int(x) for x in t["shape"]]
        except (KeyError, TypeError, ValueError):
            raise bad(f"tensor {name!r} lacks a valid dtype, shape or data_offsets: {t!r}") from None
        if not 0 <= begin <= end:
            raise bad(f"tensor {name!r} has data_offsets [{begin}, {end}]")
        if end > n_data:
            raise bad(f"tensor {name!r} ends at byte {end} of the data, but the file holds {n_data} bytes of data")
        itemsize = _SAFETENSORS_ITEMSIZE.get(dtype)
        if itemsize is not None and end - begin != math.prod(shape) * itemsize:
            raise bad(f"tensor {name!r} ({dtype} {shape}) has {end - begin} bytes; expected "
                      f"{math.prod(shape) * itemsize}")


def merge_lora(base_dir: Path, lora_dir: Path, out_dir: Path) -> Path:
    """Merge a PEFT LoRA adapter into the base weights; writes a checkpoint directory."""
    if not (lora_dir / "adapter_config.json").is_file():
        raise GGUFEditError(f"{lora_dir} is not a PEFT adapter (no adapter_config.json)")
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, lora_dir).merge_and_unload()
    merged.save_pretrained(out_dir, safe_serialization=True)
    for f in base_dir.iterdir():  # tokenizer and friends
        if f.is_file() and not f.name.endswith((".safetensors", ".bin")) and f.name != "config.json" \
                and not (out_dir / f.name).exists():
            shutil.copy2(f, out_dir / f.name)
    return out_dir


def convert_hf(model_dir: str | os.PathLike, output: str | os.PathLike, *, outtype: str = "f16",
               routers: str | os.PathLike | None = None, rankings: Sequence = (),
               lora: str | os.PathLike | None = None, sidecar: str | os.PathLike | None = None,
               force: bool = False, progress: bool = False, pre_tokenizer: str | None = None) -> Path:
    """Convert a Hugging Face checkpoint to ``output`` with upstream convert_hf_to_gguf.py and add the
    router file ``routers`` (with its bypasses and rankings) and ``rankings`` (static ranking files or
    mappings with a 'name'; merged as attach.attach_data says): into ``output`` itself, or, with
    ``sidecar``, into that sidecar GGUF beside an untouched ``output``. Returns ``output``.

    ``pre_tokenizer``: the llama.cpp name of the checkpoint's BPE pre-tokenizer (e.g. 'qwen2'), for a
    tokenizer upstream does not recognise by its hash (a retrained or trimmed one); see
    pre_tokenizer_from_gguf to take it from a GGUF of the same tokenizer."""
    src, out = Path(model_dir), Path(output)
    side = Path(sidecar) if sidecar is not None else None
    if side is not None and (routers is None and not rankings):
        raise GGUFEditError("a sidecar needs routers and/or rankings to hold")
    if side is not None and side.exists() and not force:
        raise GGUFEditError(f"output file exists: {side}; pass force=True (--force) to overwrite")
    if outtype not in OUTTYPES:
        raise GGUFEditError(f"unknown outtype {outtype!r}; expected one of {', '.join(OUTTYPES)}")
    if pre_tokenizer is not None:
        _check_pre_tokenizer(pre_tokenizer)
    _check_hf_dir(src)
    if out.exists() and not force:
        raise GGUFEditError(f"output file exists: {out}; pass force=True (--force) to overwrite")
    if not out.parent.is_dir():
        raise GGUFEditError(f"output folder does not exist: {out.parent}")
    data = attach_data(routers, rankings)  # fail early, before the slow conversion
    script = llama_source_dir() / "convert_hf_to_gguf.py"
    with tempfile.TemporaryDirectory(prefix=".first-convert-", dir=out.parent) as tmp:
        tmp_p = Path(tmp)
        if lora is not None:
            src = merge_lora(src, Path(lora), tmp_p / "merged")
        base = tmp_p / "base.gguf"
        # with progress, upstream's log and progress bar reach our stderr as they come
        args = [str(src), "--outfile", str(base), "--outtype", outtype]
        cmd = ([sys.executable, str(script)] if pre_tokenizer is None else
               [sys.executable, "-c", _CONVERT_WITH_PRE, str(script), pre_tokenizer])
        rc, err = _run_teeing_stderr(cmd + args, progress)
        if rc != 0 or not base.exists():
            if "BPE pre-tokenizer was not recognized" in err:
                m = re.search(r"chkhsh:\s*([0-9a-f]{64})", err)
                raise GGUFEditError(
                    f"convert_hf_to_gguf.py does not recognise the BPE pre-tokenizer of {src}"
                    + (f" (chkhsh {m.group(1)})" if m else "") + "; name it with --pre-tokenizer NAME (the "
                    "llama.cpp name, e.g. qwen2 for a Qwen2/Qwen3 tokenizer, llama3, gpt2) or take it from a GGUF "
                    "of the same tokenizer with --pre-tokenizer-from FILE")
            lines = err.strip().splitlines()
            first = next((ln for ln in lines if ln.startswith("first-gguf: ")), None)
            tail = first or "\n".join(lines[-5:])
            raise GGUFEditError(f"convert_hf_to_gguf.py failed on {src} (exit {rc}): {tail}")
        if pre_tokenizer is not None:
            _check_vocab_loads(base, pre_tokenizer)
        if routers is None and not data.rankings:
            os.replace(base, out)
            return out
        data.check_base(base, force=force, label=model_dir)
        if side is None:
            return attach(base, out, **data.kwargs(), force=True, progress=progress)
        write_sidecar(base, side, **data.kwargs(), force=True)
        os.replace(base, out)
        return out
