#!/usr/bin/env bash
# The CUDA check, in one run on a machine with an NVIDIA GPU and no package index (the device
# tool's H200: python3 with torch, transformers, peft, pytest, cmake and nvcc). First, here:
#
#     runtime/native/cuda_prepare.sh                # fills .device/ (the source, wheels, tokenizers)
#
# then on the GPU machine, from the repository root, with .device carried:
#
#     bash runtime/native/cuda_check.sh             # logs and results under $OUT, else ./cuda-check
#
# 1. builds the patched runtime with CUDA for the present GPU's architecture only and without the
#    flash-attention kernels (neither test nor benchmark uses them), so it takes minutes;
# 2. the parity tests on four families (llama, qwen3, gemma3, phi3: LORAFLOW_CHECK_ARCHS) with
#    every layer on the GPU, then with the last one only (the scheduler splits the graph), and
#    tests/test_gpu_backend.py (layers and flow tensors on CUDA0);
# 3. the decode benchmark on a model of SmolLM2-135M's shape with random weights (Q4_1): bare base,
#    stock 2-LoRA, flow dynamic and static, every layer on the GPU.
# Each step's log goes to $OUT; the last lines of each are printed. A failing step does not stop
# the later ones; the exit status says whether all passed.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/cuda-check}
mkdir -p "$OUT"
D=$PWD/.device
PY=${PY:-python3}
[ -d "$D" ] || { echo "no .device/: run runtime/native/cuda_prepare.sh where there is a package index" >&2; exit 2; }
export PYTHONUNBUFFERED=1 LORAFLOW_CACHE=/tmp/loraflow-cache LORAFLOW_OFFLINE_WHEELS=$D/wheels
export LORAFLOW_TEST_TOKENIZERS=$D/tokenizers LORAFLOW_TEST_ARCHS=${LORAFLOW_CHECK_ARCHS:-llama,qwen3,gemma3,phi3}
status=0
step() {  # step NAME COMMAND...: run it, log to $OUT/NAME.log, show its tail
    echo "=== $1"
    local name=$1
    shift
    local t0=$SECONDS
    if "$@" > "$OUT/$name.log" 2>&1; then echo "--- $name: ok ($((SECONDS - t0)) s)"; else
        echo "--- $name: FAILED ($((SECONDS - t0)) s)"; status=1; fi
    tail -n 15 "$OUT/$name.log"
}

nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d '.')
mkdir -p "$LORAFLOW_CACHE/native/sdist"
cp "$D"/llama_cpp_python-*.tar.gz "$LORAFLOW_CACHE/native/sdist/"
export CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$cap -DGGML_CUDA_FA=OFF"
export CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
step build "$PY" runtime/native/build.py
step install "$PY" -m pip install --no-deps --no-build-isolation --no-index --find-links "$D/wheels" .

for ngl in -1 2; do  # all layers; the last layer and the output layer (the rest on the CPU: a split)
    step "parity-gpu-layers$ngl" env LORAFLOW_TEST_GPU_LAYERS=$ngl "$PY" -m pytest -q -s -p no:cacheprovider \
        tests/test_parity.py tests/test_gpu_backend.py
done

bench() {  # a SmolLM2-135M-shaped model with random weights, Q4_1, then the benchmark on the GPU
    "$PY" - "$D/smollm2" "$OUT/smollm2-random" <<'EOF' || return 1
import sys, torch, transformers
config = transformers.AutoConfig.from_pretrained(sys.argv[1])
torch.manual_seed(0)
model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
model.save_pretrained(sys.argv[2])
transformers.AutoTokenizer.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2])
EOF
    "$PY" -c "from loraflow.converter.cli import main; main()" base "$OUT/smollm2-random" \
        -o "$OUT/smollm2-random.Q4_1.gguf" --outtype q4_1 -q &&
    rm -rf "$OUT/smollm2-random" &&
    "$PY" -m benchmarks.decode --model "$OUT/smollm2-random.Q4_1.gguf" --gpu-layers -1 --threads 4 --reps 3 \
        --configs base,stock_static_patched,flow_dynamic,flow_static --out "$OUT/bench"
}
step bench bench
rm -f "$OUT/smollm2-random.Q4_1.gguf"
echo "=== all steps: $([ $status = 0 ] && echo passed || echo 'some FAILED')"
exit $status
