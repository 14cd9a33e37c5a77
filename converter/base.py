"""Hugging Face base model -> GGUF, by llama.cpp's own convert_hf_to_gguf.py (same version as the runtime).

It runs in a subprocess with this interpreter (it needs torch, as the `train` extra installs)
and writes to a temporary file in the output folder that is renamed on success.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from loraflow.converter.base_info import hf_arch, read_hf_config
from loraflow.errors import ConversionError
from loraflow.llama_source import CONVERT_SCRIPT, llama_cpp_source_dir

logger = logging.getLogger("loraflow.converter")

BASE_OUTTYPES = ("f32", "f16", "bf16", "q8_0")


def convert_base(hf_dir, out, outtype: str = "f16", force: bool = False) -> Path:
    """Convert the Hugging Face model folder `hf_dir` to the GGUF file `out`."""
    hf_dir, out = Path(hf_dir), Path(out)
    if outtype not in BASE_OUTTYPES:
        raise ConversionError(f"outtype {outtype!r} is not one of {', '.join(BASE_OUTTYPES)}")
    if not hf_dir.is_dir():
        raise ConversionError(f"{hf_dir}: not a Hugging Face model folder")
    hf_arch(read_hf_config(hf_dir), hf_dir)  # refuse what the flow converter would refuse later
    if out.exists() and not force:
        raise ConversionError(f"{out} already exists; pass --force to overwrite it")
    if out.is_dir():
        raise ConversionError(f"{out} is a directory")
    if importlib.util.find_spec("torch") is None:
        raise ConversionError("converting a Hugging Face model needs torch: pip install 'loraflow[train]' "
                              "(install the CPU build of torch first)")
    script = llama_cpp_source_dir() / CONVERT_SCRIPT

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        cmd = [sys.executable, str(script), str(hf_dir), "--outfile", tmp, "--outtype", outtype]
        logger.info("running %s", " ".join(cmd))
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
            raise ConversionError(f"{script.name} failed on {hf_dir} (exit {proc.returncode}):\n{tail}")
        if out.exists() and not force:  # appeared while we worked
            raise ConversionError(f"{out} already exists; pass --force to overwrite it")
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    logger.info("wrote %s (%s)", out, outtype)
    return out
