"""Training over a GGUF base's quantized weights, never dequantized whole: the torch dequantizers.

    dequantize(data, qtype, n_cols)     torch: raw GGUF rows uint8 [..., row_bytes] -> float32 [..., n_cols]

The dequantizers follow ggml's block layouts (gguf-py's numpy `gguf.quants` is their reference,
tests/test_quantized_training.py compares them bit for bit); they run wherever torch does.
"""

from __future__ import annotations

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from loraflow.errors import FormatError

QK_K = 256


# -- the dequantizers: blocks uint8 [n, type_size] -> float32 [n, block_size] -----------------------

def _f16(b: torch.Tensor) -> torch.Tensor:
    """[n, 2] uint8 -> [n, 1] float32 (a little-endian float16 per row)."""
    return b.contiguous().view(torch.float16).float()


def _shifts(*values: int, device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8, device=device)


def _nibbles(qs: torch.Tensor, width: int) -> torch.Tensor:
    """Low then high 4 bits of each run of `width` bytes: [n, m*width] -> [n, m, 2, width]."""
    n = qs.shape[0]
    return (qs.reshape(n, -1, 1, width) >> _shifts(0, 4, device=qs.device).reshape(1, 1, 2, 1)) & 0x0F


def _bits(b: torch.Tensor, shifts: tuple, width: int, mask: int) -> torch.Tensor:
    """Fields of each run of `width` bytes at `shifts`: [n, m*width] -> [n, m, len(shifts), width]."""
    n = b.shape[0]
    s = _shifts(*shifts, device=b.device).reshape(1, 1, len(shifts), 1)
    return (b.reshape(n, -1, 1, width) >> s) & mask


def _q4_0(b):
    n = b.shape[0]
    d, qs = _f16(b[:, :2]), b[:, 2:]
    q = _nibbles(qs, 16).reshape(n, 32).float() - 8
    return d * q


def _q4_1(b):
    n = b.shape[0]
    d, m, qs = _f16(b[:, :2]), _f16(b[:, 2:4]), b[:, 4:]
    q = _nibbles(qs, 16).reshape(n, 32).float()
    return d * q + m


def _q5_high(qh):
    """The 32 fifth bits of a Q5_0/Q5_1 block: 4 bytes, little-endian -> [n, 32]."""
    n = qh.shape[0]
    return _bits(qh, tuple(range(8)), 1, 1).reshape(n, 4, 8).reshape(n, 32)


def _q5_0(b):
    n = b.shape[0]
    d, qh, qs = _f16(b[:, :2]), b[:, 2:6], b[:, 6:]
    q = (_nibbles(qs, 16).reshape(n, 32) | (_q5_high(qh) << 4)).float() - 16
    return d * q


def _q5_1(b):
    n = b.shape[0]
    d, m, qh, qs = _f16(b[:, :2]), _f16(b[:, 2:4]), b[:, 4:8], b[:, 8:]
    q = (_nibbles(qs, 16).reshape(n, 32) | (_q5_high(qh) << 4)).float()
    return d * q + m


def _q8_0(b):
    d, x = _f16(b[:, :2]), b[:, 2:].contiguous().view(torch.int8).float()
    return x * d


def _q2_k(b):
    n = b.shape[0]
    scales, qs, d, dmin = b[:, :16], b[:, 16:80], _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 0x0F).float()).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).reshape(n, 16, 1)
    q = _bits(qs, (0, 2, 4, 6), 32, 3).reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k(b):
    n = b.shape[0]
    hmask, qs, scales, d = b[:, :32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
    lo = _bits(scales[:, :8], (0, 4), 8, 0x0F).reshape(n, 16)
    hi = _bits(scales[:, 8:], (0, 2, 4, 6), 4, 0x03).reshape(n, 16)
    sc = (lo | (hi << 4)).float() - 32
    dl = (d * sc).reshape(n, 16, 1)
    ql = _bits(qs, (0, 2, 4, 6), 32, 3).reshape(n, 16, 16)
    qh = _bits(hmask, tuple(range(8)), 32, 1).reshape(n, 16, 16) ^ 1   # a set bit means no offset
    q = ql.float() - (qh << 2).float()
    return (dl * q).reshape(n, QK_K)


def _k_scale_min(scales):
    """Q4_K/Q5_K's 8 six-bit scales and mins packed in 12 bytes -> ([n, 8], [n, 8]) uint8."""
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _q4_k(b):
    n = b.shape[0]
    d, dmin, scales, qs = _f16(b[:, :2]), _f16(b[:, 2:4]), b[:, 4:16], b[:, 16:]
    sc, mn = _k_scale_min(scales)
    d = (d * sc.float()).reshape(n, 8, 1)
    dm = (dmin * mn.float()).reshape(n, 8, 1)
    q = _nibbles(qs, 32).reshape(n, 8, 32).float()
    return (d * q - dm).reshape(n, QK_K)


def _q5_k(b):
    n = b.shape[0]
    d, dmin, scales, qh, qs = _f16(b[:, :2]), _f16(b[:, 2:4]), b[:, 4:16], b[:, 16:48], b[:, 48:]
    sc, mn = _k_scale_min(scales)
    d = (d * sc.float()).reshape(n, 8, 1)
    dm = (dmin * mn.float()).reshape(n, 8, 1)
    ql = _nibbles(qs, 32).reshape(n, 8, 32)
    high = _bits(qh, tuple(range(8)), 32, 1).reshape(n, 8, 32)
    q = (ql | (high << 4)).float()
    return (d * q - dm).reshape(n, QK_K)


def _q6_k(b):
    n = b.shape[0]
    ql, qh, scales, d = b[:, :128], b[:, 128:192], b[:, 192:208], _f16(b[:, 208:210])
    d = (d * scales.contiguous().view(torch.int8).float()).reshape(n, 16, 1)
    low = _nibbles(ql, 64).reshape(n, 8, 32)
    high = _bits(qh, (0, 2, 4, 6), 32, 3).reshape(n, 8, 32)
    q = ((low | (high << 4)).float() - 32).reshape(n, 16, 16)
    return (d * q).reshape(n, QK_K)


_BLOCKS = {Q.Q4_0: _q4_0, Q.Q4_1: _q4_1, Q.Q5_0: _q5_0, Q.Q5_1: _q5_1, Q.Q8_0: _q8_0,
           Q.Q2_K: _q2_k, Q.Q3_K: _q3_k, Q.Q4_K: _q4_k, Q.Q5_K: _q5_k, Q.Q6_K: _q6_k}
_FLOATS = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}
SUPPORTED = tuple(_FLOATS) + tuple(_BLOCKS)


def check_type(qtype, tensor: str, source="") -> Q:
    """`qtype` as a GGMLQuantizationType if quantized training supports it, else a FormatError
    naming it and the tensor."""
    qtype = Q(int(qtype))
    if qtype not in SUPPORTED:
        raise FormatError(f"{source}{': ' if source else ''}tensor {tensor} is {qtype.name}, which training over "
                          f"quantized weights does not support (it does {', '.join(t.name for t in SUPPORTED)}); "
                          "train-gate --dequantize loads it through transformers instead")
    return qtype


def row_bytes(qtype, n_cols: int) -> int:
    block, size = GGML_QUANT_SIZES[Q(int(qtype))]
    if n_cols % block:
        raise FormatError(f"a row of {n_cols} values is not whole {Q(int(qtype)).name} blocks of {block}")
    return n_cols // block * size


def dequantize(data: torch.Tensor, qtype, n_cols: int) -> torch.Tensor:
    """Raw GGUF rows, uint8 [..., row_bytes], of `qtype` -> float32 [..., n_cols], on data's device."""
    qtype = Q(int(qtype))
    lead = data.shape[:-1]
    if qtype in _FLOATS:
        return data.contiguous().view(_FLOATS[qtype]).float().reshape(*lead, n_cols)
    if qtype not in _BLOCKS:
        check_type(qtype, "?")
    _, size = GGML_QUANT_SIZES[qtype]
    return _BLOCKS[qtype](data.reshape(-1, size)).reshape(*lead, n_cols)
