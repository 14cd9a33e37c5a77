"""Training over a GGUF base's quantized weights (gate_training/quantized.py).

- Every type's torch dequantizer gives gguf-py's numpy dequantize bit for bit: blocks gguf-py
  quantizes (the legacy types, BF16), and random blocks with finite scales (all block types,
  the K-quants included: gguf-py cannot quantize those).
- Other types are refused, naming the type and the tensor.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q  # noqa: E402

from loraflow.errors import FormatError  # noqa: E402
from loraflow.gate_training import quantized as qz  # noqa: E402

BLOCK_TYPES = (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)
NUMPY_QUANTIZES = (Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0)     # gguf-py quantizes these
# byte offsets of each block's float16 scales (d, and dmin or m), and a typical d: weights of a
# size a trained model has (RMS about 0.02 to 0.05)
F16_FIELDS = {Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q8_0: (0,), Q.Q2_K: (80, 82),
              Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}
TYPICAL_D = {Q.Q4_0: 5e-3, Q.Q4_1: 5e-3, Q.Q5_0: 2e-3, Q.Q5_1: 2e-3, Q.Q8_0: 3e-4, Q.Q2_K: 1e-3,
             Q.Q3_K: 3e-4, Q.Q4_K: 1e-4, Q.Q5_K: 5e-5, Q.Q6_K: 1.5e-5}


def random_blocks(qtype, n_rows: int, n_cols: int, rng) -> np.ndarray:
    """uint8 [n_rows, row_bytes]: random quants, random finite float16 scales about TYPICAL_D
    (a min field, where the type has one, about 7.5x that: it centres the weights)."""
    block, size = GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, (n_rows, n_cols // block, size), dtype=np.uint8)
    for i, at in enumerate(F16_FIELDS[qtype]):
        d = TYPICAL_D[qtype] * (7.5 if i else 1.0) * rng.uniform(0.5, 1.5, data.shape[:2])
        if qtype in (Q.Q4_1, Q.Q5_1) and i:
            d = -d                          # Q4_1/Q5_1's m is the block's minimum itself
        data[..., at:at + 2] = d.astype(np.float16)[..., None].view(np.uint8)
    return data.reshape(n_rows, -1)


def numpy_dequantize(raw: np.ndarray, qtype, n_cols: int) -> np.ndarray:
    if qtype == Q.F32:
        return raw.view(np.float32)
    if qtype == Q.F16:
        return raw.view(np.float16).astype(np.float32)
    return gguf.quants.dequantize(raw, qtype).reshape(raw.shape[0], n_cols)


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_random_blocks_dequantize_as_gguf_py(qtype):
    rng = np.random.default_rng(int(qtype))
    n_rows, n_cols = 24, 512
    raw = random_blocks(qtype, n_rows, n_cols, rng)
    ref = numpy_dequantize(raw.copy(), qtype, n_cols)
    assert np.isfinite(ref).all() and 0.003 < float(np.sqrt((ref ** 2).mean())) < 0.2
    got = qz.dequantize(torch.from_numpy(raw), qtype, n_cols)
    assert got.dtype == torch.float32 and got.shape == (n_rows, n_cols)
    assert np.array_equal(got.numpy(), ref)
    # any leading shape, and rows picked out of the matrix (the embedding's lookup)
    rows = torch.tensor([[3, 0], [23, 3]])
    assert np.array_equal(qz.dequantize(torch.from_numpy(raw)[rows], qtype, n_cols).numpy(), ref[rows.numpy()])


@pytest.mark.parametrize("qtype", (Q.F32, Q.F16, *NUMPY_QUANTIZES), ids=lambda t: t.name)
def test_quantized_weights_dequantize_as_gguf_py(qtype):
    rng = np.random.default_rng(int(qtype) + 100)
    w = (rng.standard_normal((16, 256)) * 0.02).astype(np.float32)
    w[0, :32] = 0                           # a block of zeros (d = 0)
    if qtype == Q.F32:
        raw = w.view(np.uint8)
    elif qtype == Q.F16:
        raw = w.astype(np.float16).view(np.uint8)
    else:
        raw = gguf.quants.quantize(w, qtype)
    ref = numpy_dequantize(raw.copy(), qtype, 256)
    got = qz.dequantize(torch.from_numpy(np.ascontiguousarray(raw)), qtype, 256)
    assert np.array_equal(got.numpy(), ref)
    assert np.abs(ref - w).max() < 0.02     # and they are the weights, quantized


@pytest.mark.parametrize("qtype", (Q.Q8_K, Q.IQ4_NL, Q.TQ2_0, Q.I8), ids=lambda t: t.name)
def test_other_types_are_refused_naming_type_and_tensor(qtype):
    with pytest.raises(FormatError, match=rf"blk\.3\.ffn_up\.weight is {qtype.name}\b.*--dequantize"):
        qz.check_type(qtype, "blk.3.ffn_up.weight")
    with pytest.raises(FormatError, match=qtype.name):
        qz.dequantize(torch.zeros(1, 256, dtype=torch.uint8), qtype, 256)
