#!/usr/bin/env bash
# Prepare .device/ for runtime/native/cuda_check.sh, which runs on a machine with an NVIDIA GPU
# and no package index (the device tool's: python3 with torch, transformers, peft, pytest, cmake,
# nvcc, but not llama-cpp-python's source or the SmolLM2 wheel). Run it here, after `make install`:
#
#     runtime/native/cuda_prepare.sh          # then carry .device to the GPU machine
#
# .device/ (git-ignored, under the 64 MiB a device run carries):
#   llama_cpp_python-<version>.tar.gz   the pinned source distribution without what a CPU + CUDA
#                                       library build never reads (its git history, llama.cpp's docs,
#                                       tools, tests, examples, models, the other backends' sources)
#   wheels/                             pure-Python packages that machine lacks (python 3.12)
#   tokenizers/{smollm2,spm}/           the tiny test models' tokenizers (tests/fixtures.py; the check
#                                       leaves out qwen2, whose vocabulary alone is 17 MB)
#   smollm2/                            SmolLM2-135M-Instruct's config and tokenizer, for a model of
#                                       its shape with random weights (the decode benchmark there)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
D=.device
VERSION=$($PY -c "import importlib.util, sys; s = importlib.util.spec_from_file_location('b', 'runtime/native/build.py'); \
m = importlib.util.module_from_spec(s); s.loader.exec_module(m); print(m.LLAMA_CPP_PYTHON_VERSION)")
CACHE=${LORAFLOW_CACHE:-$HOME/.cache/loraflow}
SDIST=$CACHE/native/sdist/llama_cpp_python-$VERSION.tar.gz
[ -f "$SDIST" ] || { echo "no $SDIST: run make install first" >&2; exit 1; }

rm -rf "$D" && mkdir -p "$D/wheels" "$D/tokenizers"
grep -qsx '/.device/' .git/info/exclude || echo '/.device/' >> .git/info/exclude

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
tar -xzf "$SDIST" -C "$tmp"
T=$tmp/llama_cpp_python-$VERSION
L=$T/vendor/llama.cpp
rm -rf "$T/.git" "$L"/{docs,tools,tests,examples,pocs,app,benches,media,ci,models,vendor/miniaudio}
for backend in "$L"/ggml/src/ggml-*/; do  # only the CPU and CUDA backends are built there
    case $(basename "$backend") in ggml-cpu|ggml-cuda) ;; *) rm -rf "$backend" ;; esac
done
tar -czf "$D/llama_cpp_python-$VERSION.tar.gz" -C "$tmp" "llama_cpp_python-$VERSION"

# what llama-cpp-python and gguf-py need beyond that machine's packages (build backend included)
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform any -d "$D/wheels" "diskcache==5.6.3" "poetry-core==2.1.3"

$PY - "$D" <<'EOF'
import shutil, sys
from pathlib import Path
sys.path.insert(0, "tests")
from fixtures import tokenizer_dir
from loraflow.models import default_model_path

out = Path(sys.argv[1])
for arch, spm, kind in (("llama", False, "smollm2"), ("gemma2", True, "spm")):
    shutil.copytree(tokenizer_dir(arch, spm), out / "tokenizers" / kind)
import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

base = default_model_path()
config = transformers.AutoConfig.from_pretrained(str(base.parent), gguf_file=base.name)
config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
config.save_pretrained(str(out / "smollm2"))
for f in (out / "tokenizers" / "smollm2").iterdir():
    shutil.copy(f, out / "smollm2" / f.name)
EOF
du -sh "$D" "$D"/*
