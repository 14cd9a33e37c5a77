"""Coverage-guided fuzzing (atheris, libFuzzer) of everything that reads a flow file.

    pip install -e '.[fuzz]'
    PYTHONPATH=tests python tests/fuzz/fuzz_flow_file.py [-max_total_time=600] [other libFuzzer flags]   (make fuzz)
    PYTHONPATH=tests python tests/fuzz/fuzz_flow_file.py FINDING...                                     (run inputs once)

Each input is written to a file and read the two ways a user's file is read:

1. the Python reader (`loraflow-convert inspect`, `export-lora`): loraflow.gguf_read.read_header,
   converter.flow_file.read_flow_file and converter.summary.inspect_gguf, whose code is
   instrumented for coverage. It may only refuse with a LoraFlowError; any other exception is a
   finding.
2. the runtime: FlowAdapter (what FlowLlama.set_flow calls) on a tiny llama model, in this
   process, so the C++ loader (llama_flow_adapter_init) runs on every input. A crash or abort
   there kills the fuzzer, which saves the input. The C++ code is not instrumented: libFuzzer
   steers by the Python reader's coverage, and the C++ loader sees the same inputs.

The first run builds the tiny llama model of the tests (needs the `train` extra for torch) and two
seed flow files (F32, and Q8_0 with F16) into $LORAFLOW_CACHE/fuzz; the corpus grows in
$LORAFLOW_CACHE/fuzz/corpus and findings land in $LORAFLOW_CACHE/fuzz/findings/.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import atheris

HERE = Path(__file__).resolve().parent

with atheris.instrument_imports(include=["loraflow"]):
    from loraflow.converter.flow_file import read_flow_file
    from loraflow.converter.summary import inspect_gguf
    from loraflow.errors import FormatError, LoraFlowError
    from loraflow.gguf_read import read_header  # noqa: F401 - instrumented through the two above

from loraflow.models import cache_dir


def prepare(root: Path) -> tuple[Path, list[Path]]:
    """The tiny base model (tests/fixtures.py; needs torch, once) and two small seed flow files
    (a few KB: two rank-1 LoRAs on q and down of layer 0, random gates), F32 and Q8_0 with F16."""
    from loraflow import synthetic
    from loraflow.converter.flow import convert_flow

    base = root / "llama-f32.gguf"
    if not base.is_file():
        from fixtures import TinyModels

        TinyModels(Path(tempfile.mkdtemp(dir=root))).get("llama").gguf.rename(base)
    seeds = [root / "seed-f32.gguf", root / "seed-q8_0.gguf"]
    if not all(s.is_file() for s in seeds):
        work = Path(tempfile.mkdtemp(dir=root))
        n_layer, n_embd, shapes = synthetic.base_gguf_shapes(base)
        shapes = {key: v for key, v in shapes.items() if key[0] == 0 and key[1] in ("q_proj", "down_proj")}
        names = ["lang", "math"]
        loras = [(n, str(synthetic.write_random_peft_adapter(work / n, shapes, r=1, alpha=2, seed=i + 1,
                                                             targets=("q_proj", "down_proj"))))
                 for i, n in enumerate(names)]
        gate = synthetic.write_gate_checkpoint(work / "gate.safetensors",
                                               synthetic.random_gate(n_layer, 2, n_embd, seed=3), names)
        for seed, outtype in zip(seeds, ("f32", "q8_0")):
            convert_flow(base, loras, gate, seed, outtype=outtype, force=True)
        shutil.rmtree(work)
    return base, seeds


def main() -> None:
    root = cache_dir("fuzz")
    base, seeds = prepare(root)
    corpus = root / "corpus"
    corpus.mkdir(exist_ok=True)
    for s in seeds:
        (corpus / s.name).write_bytes(s.read_bytes())
    findings = root / "findings"
    findings.mkdir(exist_ok=True)

    import ctypes

    import llama_cpp

    from loraflow.runtime.adapter import FlowAdapter

    # llama.cpp logs every refusal: silence it
    quiet = llama_cpp.llama_log_callback(lambda level, text, user: None)
    llama_cpp.llama_log_set(quiet, ctypes.c_void_p(0))
    params = llama_cpp.llama_model_default_params()
    model = llama_cpp.llama_model_load_from_file(str(base).encode(), params)
    if not model:
        sys.exit(f"cannot load {base}")
    tmp = tempfile.mkdtemp(prefix="loraflow-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    atexit.register(shutil.rmtree, tmp, True)
    path = Path(tmp) / "input.gguf"

    def one_input(data: bytes) -> None:
        path.write_bytes(data)
        try:
            read_flow_file(path)
            inspect_gguf(path)
        except LoraFlowError:
            pass
        try:
            FlowAdapter(model, path).free()
        except FormatError:
            pass

    # files given on the command line (a finding) are run once; otherwise the corpus is fuzzed
    replay = any(not a.startswith("-") for a in sys.argv[1:])
    args = [sys.argv[0], f"-artifact_prefix={findings}/", "-max_len=16384", "-timeout=20", "-rss_limit_mb=3072",
            *sys.argv[1:], *([] if replay else [str(corpus)])]
    atheris.Setup(args, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
