"""One adapter of a LoRA-Flow file back out as a stock llama.cpp LoRA GGUF.

What llama.cpp's convert_lora_to_gguf.py writes and src/llama-adapter.cpp reads:
`general.type = adapter`, `adapter.type = lora`, `adapter.lora.alpha` (float32) and, per
adapted base weight `blk.N.<module>.weight`, the pair `blk.N.<module>.weight.lora_a`
(ggml [n_in, r], numpy [r, n_in]) and `.lora_b` (ggml [r, n_out], numpy [n_out, r]).
llama.cpp scales a pair by alpha / r (r = lora_a's ne[1]).

The flow file stores s_i * B_i with the rows of llama's q/k already in llama.cpp's order
(which convert_lora_to_gguf.py produces too), so the export takes adapter i's slot, divides
B by s_i, and writes alpha = s_i * r_i: llama.cpp's alpha / r then equals s_i, for rsLoRA
(s = alpha / sqrt(r)) as for plain LoRA. Modules the adapter did not cover (its zero padding)
are left out. Q8_0 and F16 flow tensors are dequantized first.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import gguf
import numpy as np

from loraflow.converter.flow_file import read_flow_file
from loraflow.converter.output import atomic_output, check_output
from loraflow.errors import ConversionError

logger = logging.getLogger("loraflow.converter")

EXPORT_OUTTYPES = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
}
TENSOR_LORA_A = "blk.{bid}.{module}.weight.lora_a"
TENSOR_LORA_B = "blk.{bid}.{module}.weight.lora_b"


def export_lora(flow_path, adapter: str, out, outtype: str = "f32", force: bool = False) -> Path:
    """Write adapter `adapter` of the flow file `flow_path` as a stock llama.cpp LoRA GGUF `out`."""
    out = Path(out)
    if outtype not in EXPORT_OUTTYPES:
        raise ConversionError(f"outtype {outtype!r} is not one of {', '.join(EXPORT_OUTTYPES)}")
    check_output(out, force, [flow_path])
    flow = read_flow_file(flow_path)
    slot = flow.slot(adapter)
    r, scale = flow.ranks[slot], flow.scales[slot]
    if not (math.isfinite(scale) and scale != 0):
        raise ConversionError(f"{flow.path}: adapter {adapter!r} has scale {scale}; a stock LoRA cannot "
                              "express it (llama.cpp scales by alpha / r)")

    pairs = []
    for layer, module in flow.pairs:
        ab = flow.adapter_pair(slot, layer, module, unscale=True)
        if ab is None:
            continue
        a, b = ab
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise ConversionError(f"{flow.path}: adapter {adapter!r} holds NaN or infinite values "
                                  f"on blk.{layer}.{module}")
        pairs.append((layer, module, a, b))
    if not pairs:
        raise ConversionError(f"{flow.path}: adapter {adapter!r} covers no module (all its rows are zero)")

    qtype = EXPORT_OUTTYPES[outtype]
    with atomic_output(out, force) as tmp:
        writer = gguf.GGUFWriter(tmp, arch=flow.arch)
        try:
            writer.add_type(gguf.GGUFType.ADAPTER)
            writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
            writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(scale * r))
            writer.add_name(adapter)
            for layer, module, a, b in pairs:
                writer.add_tensor(TENSOR_LORA_A.format(bid=layer, module=module), gguf.quants.quantize(a, qtype))
                writer.add_tensor(TENSOR_LORA_B.format(bid=layer, module=module), gguf.quants.quantize(b, qtype))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    logger.info("wrote %s: adapter %r of %s, rank %d, alpha %g, %d LoRA pairs, %s", out, adapter, flow.path,
                r, scale * r, len(pairs), outtype)
    return out
