"""Hugging Face base model -> GGUF, by llama.cpp's own tools (the same version as the runtime).

f32, f16, bf16 and q8_0 come straight from llama.cpp's convert_hf_to_gguf.py, run in a
subprocess with this interpreter (it needs torch, as the `train` extra installs). The other
types (q4_0, q4_1 and the k-quants) are made as llama.cpp's own tools make them: the
converter writes a GGUF in the model's own float type (f16, bf16, else f32: nothing is
rounded) to a temporary file, and llama.cpp's
quantize API (`llama_model_quantize`, which llama-cpp-python exposes) turns it into the
requested type. Everything is written to temporary files in the output folder; the result is
renamed into place on success and every temporary file is removed either way.
"""

from __future__ import annotations

import codecs
import ctypes
import json
import logging
import os
import re
import struct
import subprocess
import sys
from collections import deque
from pathlib import Path

from loraflow.converter.base_info import hf_gguf_arch, read_hf_config
from loraflow.converter.output import atomic_output, check_output, temp_path
from loraflow.errors import ConversionError
from loraflow.llama_source import CONVERT_SCRIPT, llama_cpp_source_dir

logger = logging.getLogger("loraflow.converter")

# written by convert_hf_to_gguf.py itself
CONVERTER_OUTTYPES = ("f32", "f16", "bf16", "q8_0")
# outtype -> the llama_ftype name passed to llama_model_quantize (llama_cpp.LLAMA_FTYPE_*)
QUANTIZE_FTYPES = {
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
}
BASE_OUTTYPES = CONVERTER_OUTTYPES + tuple(QUANTIZE_FTYPES)


def convert_base(hf_dir, out, outtype: str = "f16", force: bool = False, progress: bool = False) -> Path:
    """Convert the Hugging Face model folder `hf_dir` to the GGUF file `out` of type `outtype`.

    With `progress`, the converter's own output and a quantization progress bar go to stderr."""
    hf_dir, out = Path(hf_dir), Path(out)
    if outtype not in BASE_OUTTYPES:
        raise ConversionError(f"outtype {outtype!r} is not one of {', '.join(BASE_OUTTYPES)}")
    if not hf_dir.is_dir():
        raise ConversionError(f"{hf_dir}: not a Hugging Face model folder")
    config = read_hf_config(hf_dir)
    hf_gguf_arch(config, hf_dir)  # refuse what the flow converter would refuse later
    check_output(out, force, [hf_dir])
    script = llama_cpp_source_dir() / CONVERT_SCRIPT
    if outtype in QUANTIZE_FTYPES:
        _quantize_api()  # fail before the long conversion if the API is missing

    with atomic_output(out, force) as tmp:
        if outtype in CONVERTER_OUTTYPES:
            _run_converter(script, hf_dir, tmp, outtype, progress)
        else:
            intermediate = _lossless_intermediate(hf_dir)
            with temp_path(out.parent, out.name, f".{intermediate}") as mid:
                _run_converter(script, hf_dir, mid, intermediate, progress)
                quantize_gguf(mid, tmp, outtype, progress=progress)
    logger.info("wrote %s (%s)", out, outtype)
    return out


def _lossless_intermediate(hf_dir: Path) -> str:
    """The smallest converter outtype that holds the weights exactly: f16 or bf16 when every
    floating-point tensor of the safetensors files is stored so, else f32 (llama.cpp's quantizer
    reads all three)."""
    dtypes = set()
    for file in sorted(hf_dir.glob("*.safetensors")):
        try:
            with open(file, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
        except (OSError, ValueError, struct.error):
            return "f32"  # the converter will say what is wrong with it
        header.pop("__metadata__", None)
        dtypes |= {t.get("dtype") for t in header.values() if str(t.get("dtype", "")).startswith(("F", "BF"))}
    return {frozenset({"F16"}): "f16", frozenset({"BF16"}): "bf16"}.get(frozenset(dtypes), "f32")


def _run_converter(script: Path, hf_dir: Path, out: Path, outtype: str, progress: bool) -> None:
    """Run convert_hf_to_gguf.py; with `progress` its output (and its tqdm bar) streams to stderr."""
    cmd = [sys.executable, str(script), str(hf_dir), "--outfile", str(out), "--outtype", outtype]
    logger.info("running %s", " ".join(cmd))
    tail: deque[str] = deque(maxlen=400)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        while chunk := os.read(proc.stdout.fileno(), 65536):
            text = decoder.decode(chunk)
            tail.append(text)
            if progress:
                sys.stderr.write(text)
                sys.stderr.flush()
        rc = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        proc.stdout.close()
    if rc != 0:
        lines = [line for line in re.split(r"[\r\n]+", "".join(tail)) if line.strip()]
        last = "\n".join(lines[-15:])
        raise ConversionError(f"{script.name} failed on {hf_dir} (exit {rc}):\n{last}")


# ---- quantization through llama.cpp's API ----------------------------------------------------

def _quantize_api():
    try:
        import llama_cpp
    except ImportError:
        raise ConversionError("quantizing needs llama_cpp (loraflow's patched llama-cpp-python): "
                              "run `make install`") from None
    missing = [n for n in ("llama_model_quantize", "llama_model_quantize_default_params", "llama_log_set")
               if not hasattr(llama_cpp, n)]
    if missing:
        raise ConversionError(f"this llama_cpp has no {', '.join(missing)}; run `make install`")
    return llama_cpp


_PROGRESS_LINE = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]")


def quantize_gguf(src, dst, outtype: str, progress: bool = False, n_threads: int = 0) -> Path:
    """Quantize the GGUF `src` (f32/f16/bf16) into `dst` with llama.cpp's llama_model_quantize.

    llama.cpp's log is captured while it runs: its per-tensor lines drive a progress bar, its
    fall-back warnings (rows that do not fit a k-quant block) are logged, its errors end up in
    the ConversionError. `dst` is written directly; callers pass a temporary path."""
    if outtype not in QUANTIZE_FTYPES:
        raise ConversionError(f"quantization type {outtype!r} is not one of {', '.join(QUANTIZE_FTYPES)}")
    llama_cpp = _quantize_api()
    from tqdm import tqdm

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise ConversionError(f"{src}: no such GGUF file to quantize")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANTIZE_FTYPES[outtype])
    params.nthread = n_threads

    lines: list[str] = []
    pending = [""]
    bar = tqdm(desc=f"quantizing to {outtype}", unit="tensor", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)

    def on_line(line: str) -> None:
        lines.append(line)
        m = _PROGRESS_LINE.match(line)
        if m:
            bar.total = int(m[2])
            bar.update(int(m[1]) - bar.n)
        elif "falling back" in line or "required fallback" in line:
            logger.info("llama.cpp: %s", line.strip())

    @llama_cpp.llama_log_callback
    def log_callback(level, text, user_data):
        try:
            pending[0] += text.decode("utf-8", errors="replace")
            *done, pending[0] = pending[0].split("\n")
            for line in done:
                on_line(line)
        except Exception:  # never raise into C
            pass

    llama_cpp.llama_log_set(log_callback, ctypes.c_void_p(0))
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    finally:
        _restore_llama_log(llama_cpp)
        if pending[0]:
            on_line(pending[0])
        bar.close()
    if rc != 0:
        errors = [line.strip() for line in lines if "error" in line.lower() or "failed" in line.lower()]
        detail = "\n".join((errors or [line.strip() for line in lines if line.strip()])[-10:])
        raise ConversionError(f"llama.cpp could not quantize {src} to {outtype} "
                              f"(llama_model_quantize returned {rc}):\n{detail}")
    fallback = [line for line in lines if "required fallback" in line]
    if fallback:
        logger.warning("llama.cpp: %s", fallback[-1].split(": ", 1)[-1].strip())
    return dst


def _restore_llama_log(llama_cpp) -> None:
    """Give llama.cpp's log back to llama-cpp-python's own callback."""
    try:
        from llama_cpp import _logger

        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    except (ImportError, AttributeError):
        llama_cpp.llama_log_set(None, ctypes.c_void_p(0))
