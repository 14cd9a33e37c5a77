"""The LoRA-Flow GGUF schema: every key and tensor name, defined once.

The writer (loraflow.converter), the Python readers and the C++ loader in the
llama.cpp patch (runtime/native/src/llama-flow.cpp)
all follow these names; docs/FORMAT.md describes them.
"""

FORMAT_VERSION = 1

# general.* keys are gguf-py's; these are ours.
KEY_GENERAL_TYPE = "general.type"              # = "adapter"
KEY_GENERAL_ARCH = "general.architecture"      # base model arch, e.g. "llama"
KEY_ADAPTER_TYPE = "adapter.type"              # = ADAPTER_TYPE (stock llama.cpp refuses it)
ADAPTER_TYPE = "lora_flow"

KEY_VERSION = "loraflow.version"               # uint32
KEY_N_LAYER = "loraflow.n_layer"               # uint32, base model layers
KEY_N_EMBD = "loraflow.n_embd"                 # uint32, base model hidden size
KEY_ADAPTER_COUNT = "loraflow.adapter.count"   # uint32 k
KEY_ADAPTER_NAMES = "loraflow.adapter.names"   # [string] * k, slot order
KEY_ADAPTER_RANKS = "loraflow.adapter.ranks"   # [uint32] * k
KEY_ADAPTER_ALPHAS = "loraflow.adapter.alphas" # [float32] * k
KEY_ADAPTER_SCALES = "loraflow.adapter.scales" # [float32] * k, s_i folded into flow_b
KEY_GATE_TEMPERATURE = "loraflow.gate.temperature"  # float32 T
KEY_GATE_INPUT = "loraflow.gate.input"         # string, = GATE_INPUT
GATE_INPUT = "layer_input"                     # residual stream entering the layer, before its norm
# string "sha256:<64 lowercase hex>": SHA-256 of every other key and value and every tensor's
# name, type, shape and bytes, in file order (docs/FORMAT.md, *Digest*; loraflow/digest.py).
# Files written before it existed have none and still load.
KEY_DIGEST = "loraflow.digest"
DIGEST_PREFIX = "sha256:"

# Per adapted base weight `blk.{bid}.{module}.weight`:
#   flow_a  ggml [n_in, R]  (numpy [R, n_in]),  rows of adapter 0, then 1, ...
#   flow_b  ggml [R, n_out] (numpy [n_out, R]), columns scaled by s_i
# with R = sum(ranks); an adapter that does not cover the module has zero rows/columns.
TENSOR_FLOW_A = "blk.{bid}.{module}.flow_a"
TENSOR_FLOW_B = "blk.{bid}.{module}.flow_b"
TENSOR_BASE_WEIGHT = "blk.{bid}.{module}.weight"
# Per layer, F32: gate weight ggml [n_embd, k] (numpy [k, n_embd]) and bias [k].
TENSOR_GATE_WEIGHT = "blk.{bid}.flow_gate.weight"
TENSOR_GATE_BIAS = "blk.{bid}.flow_gate.bias"

# An adapted module is any matrix of a decoder layer, named as llama.cpp names it (attn_q,
# attn_qkv, ffn_up, ...): where a PEFT LoRA goes is decided by llama.cpp's own converter
# (converter/lora_layout.py), which architectures are accepted by the base model (the C++ loader).
MODULE_PATTERN = r"[a-z][a-z0-9_]*"


def module_sort_key(module: str) -> tuple[int, str]:
    """llama.cpp's own order of a layer's tensors (gguf-py's MODEL_TENSOR), unknown names last."""
    return (_MODULE_ORDER.get(module, len(_MODULE_ORDER)), module)


def _module_order() -> dict[str, int]:
    import gguf

    order = {}
    for i, name in enumerate(gguf.TENSOR_NAMES.values()):
        if name.startswith("blk.{bid}."):
            order.setdefault(name[len("blk.{bid}."):], i)
    return order


_MODULE_ORDER = _module_order()

# LoRA tensor types a flow file may hold (gguf GGMLQuantizationType names); gates are always F32.
LORA_TENSOR_TYPES = ("F32", "F16", "Q8_0")

# What the graph computes, with the integer the C API takes (llama-flow.h's enum llama_flow_mode;
# tests/test_layout.py checks that they agree). `average` and `single:<name>` are static weights
# chosen by the Python side (loraflow.modes).
MODES = {"off": 0, "dynamic": 1, "static": 2}

# Our own gate checkpoint (safetensors): per layer i
GATE_CKPT_FILE = "gate.safetensors"
GATE_CKPT_WEIGHT = "layers.{i}.weight"         # [k, n_embd]
GATE_CKPT_BIAS = "layers.{i}.bias"             # [k]
GATE_CKPT_META_ADAPTERS = "adapters"           # metadata: JSON list of names
GATE_CKPT_META_TEMPERATURE = "temperature"     # metadata: float as string
GATE_CKPT_META_DIGESTS = "adapter_digests"     # metadata: JSON list, each LoRA's PeftAdapter.digest()
# The paper's released gates (torch file)
PAPER_GATE_WEIGHT = "encoder.layers.{i}.lora_fusion_gate.weight"  # [k, n_embd]
PAPER_GATE_BIAS = "encoder.layers.{i}.weight_bias"                # [1, k]
