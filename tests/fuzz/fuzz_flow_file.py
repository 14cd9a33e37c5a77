"""Coverage-guided fuzzing (atheris, libFuzzer) of everything that reads a flow file.

    pip install -e '.[fuzz]'
    python tests/fuzz/fuzz_flow_file.py [-max_total_time=600] [other libFuzzer flags]   (make fuzz)

Each input is written to a file and read the two ways a user's file is read:

1. the Python reader (`loraflow-convert inspect`, `export-lora`): loraflow.gguf_read.read_header,
   converter.flow_file.read_flow_file and converter.summary.inspect_gguf, whose code is
   instrumented for coverage. It may only refuse with a LoraFlowError; any other exception is a
   finding.
2. the runtime: FlowAdapter (what FlowLlama.set_flow calls) on a tiny llama model, in this
   process, so the C++ loader (llama_flow_adapter_init) runs on every input. A crash or abort
   there kills the fuzzer, which saves the input. The C++ code is not instrumented: libFuzzer
   steers by the Python reader's coverage, and the C++ loader sees the same inputs.

The first run builds the tiny model and two seed flow files (F32, and Q8_0 with F16) into
$LORAFLOW_CACHE/fuzz (needs the `train` extra for torch); the corpus grows in
$LORAFLOW_CACHE/fuzz/corpus and findings land in $LORAFLOW_CACHE/fuzz/findings/.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import atheris

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: fixtures, tiny_flow

with atheris.instrument_imports(include=["loraflow"]):
    from loraflow.converter.flow_file import read_flow_file
    from loraflow.converter.summary import inspect_gguf
    from loraflow.errors import FormatError, LoraFlowError
    from loraflow.gguf_read import read_header  # noqa: F401 - instrumented through the two above

from loraflow.models import cache_dir  # noqa: E402


def prepare(root: Path) -> tuple[Path, list[Path]]:
    """The tiny base model and the seed flow files, built once."""
    base = root / "llama-f32.gguf"
    seeds = [root / "seed-f32.gguf", root / "seed-q8_0.gguf"]
    if base.is_file() and all(s.is_file() for s in seeds):
        return base, seeds
    from fixtures import TinyModels, make_random_gate, make_tiny_lora

    from loraflow.converter.flow import convert_flow

    work = Path(tempfile.mkdtemp(dir=root))
    tm = TinyModels(work).get("llama")
    # small seeds (a few KB): two rank-1 LoRAs on q and down of layer 0, F32 and Q8_0
    loras = [(n, make_tiny_lora(tm.hf_dir, work / n, r=1, alpha=2, targets=("q_proj", "down_proj"), seed=i + 1,
                                layers=[0])) for i, n in enumerate(("lang", "math"))]
    gate = make_random_gate(tm.n_layer, 2, tm.n_embd, work / "gate", ["lang", "math"], seed=3)
    for seed, outtype in zip(seeds, ("f32", "q8_0")):
        convert_flow(tm.gguf, loras, gate, seed, outtype=outtype, force=True)
    tm.gguf.rename(base)
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
    path = Path(tempfile.mkdtemp(prefix="loraflow-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)) / "input.gguf"

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

    args = [sys.argv[0], f"-artifact_prefix={findings}/", "-max_len=16384", "-timeout=20", "-rss_limit_mb=3072",
            *sys.argv[1:], str(corpus)]
    atheris.Setup(args, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
